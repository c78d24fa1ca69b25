"""Sublayer units: each block's attention and MLP branch searched separately (sleb.units)."""

from __future__ import annotations

import pytest
import torch

import sleb
from sleb.arch import BlockRunner, find_blocks
from sleb.config import SearchOptions
from sleb.errors import BadInput, SlebError
from sleb.units import BranchRunner, UnitSpace, remove_units

from oracle import brute_force_units, loss_sum_units
from tiny_models import family_model, random_windows

SPEC_FAMILIES = ["llama", "qwen2", "gemma2", "gpt2", "phi3"]


def _assert_same_search(result, order, steps):
    assert result.removed == order
    for record, expected in zip(result.steps, steps):
        assert set(record.scores) == set(expected)
        for u, score in expected.items():
            assert record.scores[u] == pytest.approx(score, rel=1e-5)


@pytest.mark.spec
@pytest.mark.parametrize("family", SPEC_FAMILIES)
def test_sublayer_search_equals_brute_force(family):
    model = family_model(family)
    windows = random_windows(3, 16)
    result = sleb.search(model, windows, 3, unit="sublayer", progress=False, cache_bytes=10**8)
    order, steps = brute_force_units(model, windows, 3, "sublayer")
    assert result.unit == "sublayer"
    _assert_same_search(result, order, steps)
    assert result.dense_loss == pytest.approx(loss_sum_units(model, windows), rel=1e-5)


@pytest.mark.spec
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_attention_search_equals_brute_force(family):
    model = family_model(family)
    windows = random_windows(3, 16, seed=1)
    result = sleb.search(model, windows, 2, unit="attention", progress=False)
    order, steps = brute_force_units(model, windows, 2, "attention")
    _assert_same_search(result, order, steps)
    assert all(u % 2 == 0 for u in result.removed)


@pytest.mark.spec
def test_racing_at_confidence_one_picks_as_the_exact_unit_search():
    model = family_model("llama", layers=6)
    windows = random_windows(8, 16, seed=2)
    exact = sleb.search(model, windows, 4, unit="sublayer", progress=False)
    raced = sleb.search(model, windows, 4, unit="sublayer", racing=True, confidence=1.0, min_windows=2,
                        progress=False)
    assert raced.removed == exact.removed
    for r, e in zip(raced.steps, exact.steps):
        assert r.scores[r.removed] == pytest.approx(e.scores[e.removed], rel=1e-9)


def test_batching_and_cache_do_not_change_unit_scores():
    model = family_model("qwen2")
    windows = random_windows(4, 16, seed=3)
    a = sleb.search(model, windows, 2, unit="sublayer", progress=False, cache_bytes=0)
    b = sleb.search(model, windows, 2, unit="sublayer", progress=False, batch_size=2, cache_bytes=10**8)
    assert a.removed == b.removed
    for x, y in zip(a.steps, b.steps):
        for u in x.scores:
            assert x.scores[u] == pytest.approx(y.scores[u], rel=1e-5)


@pytest.mark.parametrize("family, words", [("gpt_neox", "parallel residual"), ("opt", "children with weight")])
def test_families_whose_branches_cannot_be_skipped_exactly_are_refused(family, words):
    model = family_model(family)
    with pytest.raises(SlebError, match=words):
        sleb.search(model, random_windows(2, 16), 1, unit="sublayer", progress=False)


def test_unit_space_ids_labels_and_barriers():
    options = SearchOptions(early_barrier=1, latter_barrier=1)
    sub = UnitSpace("sublayer", 4)
    assert sub.count == 8 and sub.label(5) == "2.mlp" and sub.label(4) == "2.attn"
    assert sub.unit_id(3, "mlp") == 7
    assert sub.candidates(range(8), options) == [2, 3, 4, 5]
    assert UnitSpace("attention", 4).candidates(range(8), options) == [2, 4]
    assert UnitSpace("block", 4).candidates(range(4), options) == [1, 2]
    assert sub.max_remove(options) == 4


def test_remove_units_matches_the_searched_model():
    model = family_model("llama")
    windows = random_windows(3, 16, seed=4)
    result = sleb.search(model, windows, 3, unit="sublayer", progress=False)
    expected = loss_sum_units(model, windows, skip=result.removed)
    before = sum(p.numel() for p in model.parameters())
    remove_units(model, result.removed, "sublayer")
    from oracle import loss_sum

    assert loss_sum(model, windows) == pytest.approx(expected, rel=1e-5)
    assert loss_sum(model, windows) == pytest.approx(result.steps[-1].scores[result.removed[-1]] , rel=1e-5)
    assert sum(p.numel() for p in model.parameters()) < before


def test_remove_units_deletes_a_block_that_loses_both_branches():
    model = family_model("llama")
    windows = random_windows(2, 16)
    expected = loss_sum_units(model, windows, skip=[2, 3, 6])
    remove_units(model, [2, 3, 6], "sublayer")
    assert len(find_blocks(model).modules) == 4 and model.config.num_hidden_layers == 4
    from oracle import loss_sum

    assert loss_sum(model, windows) == pytest.approx(expected, rel=1e-5)


def test_bad_unit_settings_are_refused():
    model = family_model("llama")
    windows = random_windows(2, 16)
    with pytest.raises(BadInput, match="unknown unit"):
        sleb.search(model, windows, 1, unit="head", progress=False)
    with pytest.raises(BadInput, match="sublayer units"):
        sleb.search(model, windows, 7, unit="sublayer", progress=False)
    with pytest.raises(BadInput, match="per-parameter ranks sleb's step scores"):
        sleb.search(model, windows, 1, unit="sublayer", metric="cosine", unit_score="per-parameter", progress=False)


def test_unit_checkpoint_resumes_and_refuses_a_block_checkpoint(tmp_path):
    model = family_model("llama")
    windows = random_windows(2, 16)
    path = tmp_path / "ck.json"
    first = sleb.search(model, windows, 1, unit="sublayer", checkpoint=path, progress=False)
    again = sleb.search(model, windows, 2, unit="sublayer", checkpoint=path, progress=False)
    assert again.removed[0] == first.removed[0] and len(again.removed) == 2
    block_path = tmp_path / "block.json"
    sleb.search(model, windows, 1, checkpoint=block_path, progress=False)
    with pytest.raises(BadInput, match="unit"):
        sleb.search(model, windows, 1, unit="sublayer", checkpoint=block_path, progress=False)
    # #29: the other directions were resumed: a block search took a sublayer checkpoint, a plain
    # sublayer search a per-parameter one.
    with pytest.raises(BadInput, match="unit 'sublayer' there vs 'block' now"):
        sleb.search(model, windows, 1, checkpoint=path, progress=False)
    scored = tmp_path / "per-parameter.json"
    sleb.search(model, windows, 1, unit="sublayer", unit_score="per-parameter", checkpoint=scored, progress=False)
    with pytest.raises(BadInput, match="unit_score 'per-parameter' there vs 'loss' now"):
        sleb.search(model, windows, 1, unit="sublayer", checkpoint=scored, progress=False)
    racing = tmp_path / "racing.json"
    sleb.search(model, windows, 1, racing=sleb.Racing(confidence=0.8), checkpoint=racing, progress=False)
    with pytest.raises(BadInput, match="racing"):
        sleb.search(model, windows, 1, racing=sleb.Racing(confidence=0.9), checkpoint=racing, progress=False)


def test_branch_runner_composes_to_the_block():
    model = family_model("gemma2")
    windows = random_windows(1, 16)
    runner = BranchRunner(model)
    hidden = runner.embed(windows)
    plain = hidden
    for b in range(len(runner.blocks.modules)):
        plain = BlockRunner.block(runner, b, plain, windows)
    units = hidden
    for u in range(runner.num_units):
        units = runner.block(u, units, windows)
    assert torch.allclose(units, plain, atol=1e-5, rtol=1e-5)


def test_budgets_count_sublayer_units_by_parameters():
    from sleb.budgets import budgeted_search
    from sleb.sizes import block_params

    model = family_model("llama", layers=6)
    windows = random_windows(3, 16, seed=5)
    runner = BranchRunner(model)
    branches = runner.prepare(windows[:1])
    blocks = find_blocks(model).modules
    # A unit's parameters: its branch and the norm in front of it (the saved DeciLM model drops both).
    norm = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}
    assert branches.norms == {kind: (name,) for kind, name in norm.items()}
    size = {2 * b + k: sum(p.numel() for m in (branches.name(kind), norm[kind])
                           for p in getattr(blocks[b], m).parameters())
            for b in range(6) for k, kind in enumerate(("attn", "mlp"))}
    assert sum(size.values()) == sum(block_params(model))
    result = budgeted_search(model, windows, sleb.Budget(ratio=0.3), options=SearchOptions(unit="sublayer"),
                             progress=False)
    goal = 0.3 * sum(block_params(model))
    removed = sum(size[u] for u in result.removed)
    assert removed >= goal and removed - size[result.removed[-1]] < goal  # the first count that meets it
    assert result.unit == "sublayer" and result.budget["stopped_by"] == "ratio"
    assert result.budget["parameters_after"] == sum(p.numel() for p in model.parameters()) - removed
    exact = budgeted_search(model, windows, sleb.Budget(remove=3), options=SearchOptions(unit="attention"),
                            progress=False)
    assert len(exact.removed) == 3 and all(u % 2 == 0 for u in exact.removed)
    with pytest.raises(BadInput, match="whole blocks"):
        budgeted_search(model, windows, sleb.Budget(remove=2), options=SearchOptions(unit="sublayer"),
                        refine=sleb.Refinement(beam=2), progress=False)


@pytest.mark.spec
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_parameter_unit_score_equals_brute_force(family):
    model = family_model(family)
    windows = random_windows(3, 16, seed=6)
    runner = BranchRunner(model)
    branches = runner.prepare(windows[:1])
    blocks = find_blocks(model).modules
    sizes = {2 * b + k: sum(p.numel() for p in getattr(blocks[b], branches.name(kind)).parameters())
             for b in range(len(blocks)) for k, kind in enumerate(("attn", "mlp"))}
    assert len(set(sizes.values())) == 2  # attention and MLP differ in size
    result = sleb.search(model, windows, 3, unit="sublayer", unit_score="per-parameter", progress=False)
    order, steps = brute_force_units(model, windows, 3, "sublayer", sizes=sizes)
    _assert_same_search(result, order, steps)
    with pytest.raises(BadInput, match="exact search"):
        sleb.search(model, windows, 1, unit="sublayer", unit_score="per-parameter", racing=True, progress=False)
    with pytest.raises(BadInput, match="blocks are all alike"):
        SearchOptions(unit_score="per-parameter")


@pytest.mark.spec
def test_one_shot_criteria_rank_branch_units_as_the_oracle():
    """ppl-oneshot (Metric2) over units: the dense loss with each unit skipped; cosine (Metric1 / block influence)
    over units: 1 - cos(unit input, unit output). Both equal plain computations from hooks."""
    from oracle import unit_cosine_scores

    model = family_model("llama", layers=5)
    windows = random_windows(3, 16, seed=3)
    oneshot = sleb.search(model, windows, 3, metric="ppl-oneshot", unit="sublayer", progress=False)
    cands = [u for u in range(10) if 1 <= u // 2 <= 3]
    expected = {u: loss_sum_units(model, windows, skip=[u]) for u in cands}
    assert oneshot.unit == "sublayer" and set(oneshot.steps[0].scores) == set(cands)
    for u, loss in expected.items():
        assert oneshot.steps[0].scores[u] == pytest.approx(loss, rel=1e-5)
    assert oneshot.removed == sorted(expected, key=lambda u: (expected[u], u))[:3]
    # The loss of every count's set is measured on the pruned model.
    assert oneshot.count_losses[2] == pytest.approx(loss_sum_units(model, windows, skip=oneshot.removed[:2]), rel=1e-5)

    cosine = sleb.search(model, windows, 2, metric="cosine", unit="attention", progress=False)
    scores = unit_cosine_scores(model, windows)
    assert set(cosine.steps[0].scores) == {2, 4, 6}
    for u in (2, 4, 6):
        assert cosine.steps[0].scores[u] == pytest.approx(scores[u], rel=1e-4, abs=1e-6)
    assert cosine.removed == sorted((2, 4, 6), key=lambda u: (scores[u], u))[:2]


@pytest.mark.parametrize("metric", ["angular", "contiguous-cosine"])
def test_contiguous_window_criteria_refuse_units(metric):
    model = family_model("llama", layers=5)
    with pytest.raises(BadInput, match="contiguous windows of whole blocks"):
        sleb.search(model, random_windows(2, 8), 1, metric=metric, unit="sublayer", progress=False)

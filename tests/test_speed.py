"""The measured cost model (--speed-at, sleb.timing), the per-second unit score and --target-speedup in it."""

from __future__ import annotations

import json

import pytest
import torch

import sleb
from sleb.config import SearchOptions
from sleb.errors import BadInput
from sleb.settings import parse_speed_at
from sleb.sizes import MeasuredCost, Sizer
from sleb.timing import _workload, check_speed_at, measure_costs
from sleb.units import UNIT_KINDS

from helpers import CALIB_WORDS, invoke
from tiny_models import family_model, random_windows, tiny_tokenizer


def test_speed_at_specs():
    assert parse_speed_at("prefill:512") == ("prefill", 512)
    assert parse_speed_at("generation:1024") == ("generation", 1024)
    for bad in ("prefill", "generation:", "generation:0", "decode:8", "prefill:1.5", "prefill:-3", ":8"):
        with pytest.raises(BadInput, match="prefill:N or generation:N"):
            parse_speed_at(bad)
    with pytest.raises(BadInput, match="prefill:N or generation:N"):
        SearchOptions(unit="sublayer", speed_at="gen:8")
    config = family_model("llama").config  # max_position_embeddings 64
    check_speed_at("prefill:64", config)
    with pytest.raises(BadInput, match="needs 65 positions; the model's context is 64"):
        check_speed_at("generation:64", config)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_measure_costs_times_every_block_and_unit(family):
    model = family_model(family)
    branches = UNIT_KINDS["sublayer"].branches(model)
    for spec in ("prefill:16", "generation:16"):
        cost = measure_costs(model, spec, branches, warmup=1, rounds=3, min_seconds=0)
        assert cost.spec == spec and len(cost.block_seconds) == 5 and len(cost.branch_seconds) == 5
        assert all(s > 0 for s in cost.block_seconds) and all(a > 0 and m > 0 for a, m in cost.branch_seconds)
        assert cost.total_seconds > 0 and cost.embedding_seconds > 0 and cost.head_seconds > 0
        info = cost.info
        assert info["device"] == "cpu" and info["dtype"] == "float32" and info["rounds"] == 3
        assert {"torch_threads", "torch", "plain_seconds", "how"} <= set(info)
        table = cost.to_dict()
        assert table["speed_at"] == spec and len(table["attention_seconds"]) == 5
        json.dumps(table)
    blocks_only = measure_costs(model, "prefill:8", None, warmup=0, rounds=3, min_seconds=0)
    assert blocks_only.branch_seconds is None and "attention_seconds" not in blocks_only.to_dict()


def test_a_generation_step_runs_at_the_named_context():
    """Every timed step sees exactly N tokens of cache: the cache is cut back after each."""
    model = family_model("llama")
    seen = []
    attention = model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1] if "hidden_states" in kwargs
                                                 else args[0].shape[1]), with_kwargs=True)
    try:
        run, reset = _workload(model, "generation", 12, seed=0)
        lengths = []
        for _ in range(3):
            with torch.inference_mode():
                out = run()
            lengths.append(out["cache"].get_seq_length())
            reset()
    finally:
        handle.remove()
    assert seen == [12, 1, 1, 1]  # the untimed prefill, then one token a step
    assert lengths == [13, 13, 13]


def _measured(blocks, branches, total, spec="generation:16"):
    return MeasuredCost(spec.split(":")[0], int(spec.split(":")[1]), tuple(blocks), total,
                        None if branches is None else tuple(branches), info={"device": "cpu", "rounds": 3})


def test_sizer_prices_removals_in_measured_seconds():
    model = family_model("llama", layers=3)
    branches = UNIT_KINDS["sublayer"].branches(model)
    # Block i: attention 3, MLP 2, the rest of the block 1 (its call, the residual adds); 4 outside.
    cost = _measured([6, 6, 6], [(3, 2)] * 3, 22)
    sizer = Sizer.of(model, 16, branches, measured=cost)
    assert sizer.block_flops == [3, 2, 3, 2, 3, 2] and sizer.block_rest_cost == [1, 1, 1]
    assert sizer.speedup([2]) == pytest.approx(22 / 19)
    assert sizer.speedup([2, 3]) == pytest.approx(22 / 16)  # both branches: the block goes, its rest too
    assert "measured speedup at generation:16" == sizer.cost_name
    blocks = Sizer.of(model, 16, measured=cost)
    assert blocks.speedup([1]) == pytest.approx(22 / 16)
    assert Sizer.of(model, 16).cost_name == "ideal FLOP speedup at context 16"


@pytest.fixture()
def tiny_source(tmp_path):
    folder = tmp_path / "m"
    family_model("llama", layers=6, intermediate_size=256).save_pretrained(folder)
    tiny_tokenizer(words=400).save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text(CALIB_WORDS)
    return folder, text


def _prune(folder, text, out, *args):
    return invoke("prune", folder, "-o", out, "--calib", text, "--nsamples", 4, "--seqlen", 16, *args)


def test_cli_records_the_cost_table_and_prints_the_speedups(tiny_source, tmp_path):
    folder, text = tiny_source
    out = tmp_path / "out"
    result = _prune(folder, text, out, "--unit", "sublayer", "--remove", 2, "--speed-at", "prefill:16")
    assert result.exit_code == 0, result.output
    assert "speedup at prefill:16 in transformers: predicted" in result.output and "measured" in result.output
    run = json.loads((out / "sleb_report.json").read_text())
    speed = run["speed"]
    assert speed["speed_at"] == "prefill:16" and len(speed["block_seconds"]) == 6
    assert set(speed["unit_seconds"]) == {f"{b}.{k}" for b in range(6) for k in ("attn", "mlp")}
    assert {"device", "dtype", "torch_threads", "torch", "rounds", "warmup"} <= set(speed["measured"])
    assert speed["predicted_speedup"] == pytest.approx(run["budget"]["predicted_speedup"]) and speed["measured_speedup"] > 0
    assert run["config"]["search"]["speed_at"] == "prefill:16"
    from sleb.report import render
    from sleb.runfile import RunRecord

    markdown = render(RunRecord.read(out), {}, {}, None, None, 8)
    assert "## Speed (measured cost model)" in markdown and "| 5 |" in markdown
    assert "at prefill:16 in transformers on cpu (float32" in markdown


def test_bad_speed_settings_are_refused_before_the_model_loads(tiny_source, tmp_path, monkeypatch):
    folder, text = tiny_source

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(sleb.loading, "load", no_load)
    out = tmp_path / "out"
    cases = [
        (["--speed-at", "prefill:x"], "prefill:N or generation:N"),
        (["--speed-at", "generation:64"], "needs 65 positions"),
        (["--speed-at", "generation:8", "--compensate", "linear", "--compensate-aware", "--remove", "1"],
         "--speed-at applies only with a search without --compensate-aware"),
    ]
    for extra, words in cases:
        args = extra if "--remove" in extra else ["--unit", "sublayer", "--target-speedup", "1.05", *extra]
        result = _prune(folder, text, out, *args)
        assert result.exit_code != 0 and words in result.output, (extra, result.output)
    gguf = _prune(folder, text, tmp_path / "out.gguf", "--remove", "1", "--speed-at", "generation:8")
    assert gguf.exit_code != 0 and "this source is a Hugging Face model" in gguf.output
    assert not out.exists()


def test_a_target_no_removal_reaches_is_refused_before_the_search(tiny_source, tmp_path, monkeypatch):
    folder, text = tiny_source
    from sleb import budgets

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran")

    monkeypatch.setattr(budgets, "search", no_search)
    result = _prune(folder, text, tmp_path / "out", "--unit", "attention", "--target-speedup", "50",
                    "--speed-at", "generation:8")
    assert result.exit_code != 0
    assert "--target-speedup 50.0 cannot be met: removing every candidate attention unit gives" in result.output
    assert "measured speedup at generation:8" in result.output


# -- the per-second unit score against the oracle --------------------------------------------------------
from oracle import brute_force_per_second, cost_after, loss_sum_units, swap_refine_units  # noqa: E402


def _assert_same_search(result, order, steps):
    assert result.removed == order
    for record, expected in zip(result.steps, steps):
        assert set(record.scores) == set(expected)
        for u, score in expected.items():
            assert record.scores[u] == pytest.approx(score, rel=1e-5)


def _flop_costs(model, context):
    """Each unit's FLOPs per token, counted plainly: 2 per weight of its module, and for attention the score and
    value products over half the context (query heads x head size wide)."""
    from oracle import branch_module, decoder_blocks

    cfg = model.config
    heads = cfg.num_attention_heads
    width = heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    costs = {}
    for b, block in enumerate(decoder_blocks(model)):
        for k, kind in enumerate(("attn", "mlp")):
            params = sum(p.numel() for p in branch_module(block, kind).parameters())
            costs[2 * b + k] = 2.0 * params + (2 * 2 * (context / 2) * width if kind == "attn" else 0.0)
    return costs


@pytest.mark.spec
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2"])
def test_per_second_in_flops_equals_brute_force(family):
    model = family_model(family)
    windows = random_windows(3, 16, seed=7)
    costs = _flop_costs(model, 16)
    dense = Sizer.of(model, 16, UNIT_KINDS["sublayer"].branches(model)).dense_flops
    result = sleb.search(model, windows, 4, unit="sublayer", unit_score="per-second", progress=False)
    order, steps = brute_force_per_second(model, windows, costs, dense, num_remove=4)
    _assert_same_search(result, order, steps)


def _synthetic(model, spec="generation:16"):
    """A measured table with fixed numbers (timings are noisy; the rule is what is tested): attention units
    dear in the later blocks, MLP units alike, each block's rest 0.5."""
    n = len(model.model.layers) if hasattr(model, "model") and hasattr(model.model, "layers") else \
        len(model.transformer.h)
    branches = tuple((1.0 + 0.7 * b, 1.3) for b in range(n))
    blocks = tuple(a + m + 0.5 for a, m in branches)
    return _measured(blocks, branches, sum(blocks) + 3.0, spec)


@pytest.mark.spec
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_second_in_measured_seconds_equals_brute_force(family):
    model = family_model(family, layers=5)
    windows = random_windows(3, 16, seed=8)
    measured = _synthetic(model)
    sizer = Sizer.of(model, 16, UNIT_KINDS["sublayer"].branches(model), measured=measured)
    costs = dict(enumerate(sizer.block_flops))
    rest = {b: 0.5 for b in range(5)}
    result = sleb.search(model, windows, 5, unit="sublayer", unit_score="per-second", costs=sizer, progress=False)
    order, steps = brute_force_per_second(model, windows, costs, measured.total_seconds, rest, num_remove=5)
    _assert_same_search(result, order, steps)


@pytest.mark.spec
@pytest.mark.parametrize("family, unit, target", [("llama", "sublayer", 1.3), ("llama", "sublayer", 1.6),
                                                   ("qwen2", "attention", 1.3), ("gemma2", "sublayer", 1.45),
                                                   ("gpt2", "sublayer", 1.2)])
def test_target_speedup_per_second_with_refinement_equals_brute_force(family, unit, target):
    """The search stops once the cost model meets the target; swaps and drops within the target then lower the
    loss (each move scored by the exact loss), as the oracle does."""
    from sleb.budgets import budgeted_search

    model = family_model(family, layers=6)
    windows = random_windows(3, 16, seed=9)
    measured = _synthetic(model)
    sizer = Sizer.of(model, 16, UNIT_KINDS["sublayer"].branches(model), measured=measured)
    costs, rest, dense = dict(enumerate(sizer.block_flops)), {b: 0.5 for b in range(6)}, measured.total_seconds
    options = SearchOptions(unit=unit, unit_score="per-second", speed_at="generation:16")
    result = budgeted_search(model, windows, sleb.Budget(target_speedup=target, speedup_context=16), options=options,
                             measured=measured, progress=False)
    greedy, steps = brute_force_per_second(model, windows, costs, dense, rest, unit=unit, target=target)
    assert result.refine["greedy_removed"] == greedy
    for record, expected in zip(result.steps, steps):
        for u, score in expected.items():
            assert record.scores[u] == pytest.approx(score, rel=1e-5)
    meets = lambda s: dense / cost_after(s, costs, dense, rest) >= target - 1e-12  # noqa: E731
    refined, loss = swap_refine_units(model, windows, greedy, meets, unit=unit)
    assert sorted(result.removed) == refined
    assert result.refine["loss"] == pytest.approx(loss, rel=1e-5)
    assert loss_sum_units(model, windows, skip=result.removed) == pytest.approx(loss, rel=1e-5)
    assert result.budget["predicted_speedup"] == pytest.approx(dense / cost_after(refined, costs, dense, rest))
    assert result.budget["predicted_speedup"] >= target - 1e-12
    assert result.speed["speed_at"] == "generation:16" and result.budget["speed_at"] == "generation:16"
    if target != 1.3 or unit != "sublayer":  # greedy's ratios were myopic here: the refinement found a better set
        assert refined != sorted(greedy) and loss < result.refine["greedy_loss"]
    if target == 1.6:  # 7 units by greedy, 5 after swaps and drops
        assert len(greedy) == 7 and len(result.removed) == 5


@pytest.mark.spec
def test_refine_swap_over_units_with_a_count_equals_brute_force():
    """--refine swap with --unit and --remove N: exchanges only (N stays), as the oracle."""
    from sleb.budgets import budgeted_search
    from oracle import brute_force_units

    model = family_model("llama", layers=6)
    windows = random_windows(3, 16, seed=10)
    result = budgeted_search(model, windows, sleb.Budget(remove=3), options=SearchOptions(unit="sublayer"),
                             refine=sleb.Refinement(method="swap"), progress=False)
    greedy, _ = brute_force_units(model, windows, 3, "sublayer")
    refined, loss = swap_refine_units(model, windows, greedy, lambda s: True, drops=False)
    assert result.refine["greedy_removed"] == greedy
    assert sorted(result.removed) == refined and len(result.removed) == 3 and refined != sorted(greedy)
    assert result.refine["loss"] == pytest.approx(loss, rel=1e-5)


def test_refine_seconds_applies_to_per_seconds_own_refinement():
    from sleb.config import PruneConfig
    from sleb.settings import Budget, Refinement

    speed = SearchOptions(unit="sublayer", unit_score="per-second")
    PruneConfig("m", "o", Budget(target_speedup=1.2), search=speed, refine=Refinement(seconds=5)).validate()
    with pytest.raises(BadInput, match="--refine-seconds applies only with --refine swap, or --unit-score per-second"):
        PruneConfig("m", "o", Budget(remove=2), search=speed, refine=Refinement(seconds=5)).validate()


def test_rounds_run_while_the_minimum_time_has_not_passed():
    from sleb.timing import _more

    assert _more(2, 7, 50, 100.0, 10.0, 60.0)  # at least 3, whatever the time
    assert _more(5, 7, 50, 30.0, 10.0, 60.0) and not _more(5, 7, 50, 61.0, 10.0, 60.0)
    assert _more(20, 7, 50, 9.0, 10.0, 60.0) and not _more(20, 7, 50, 10.5, 10.0, 60.0)
    assert not _more(50, 7, 50, 1.0, 10.0, 60.0)
    model = family_model("llama", layers=2)
    cost = measure_costs(model, "generation:8", None, warmup=0, rounds=3, min_seconds=30.0, max_rounds=9)
    assert cost.info["rounds"] == 9  # a cheap shape gets up to max_rounds within min_seconds


def test_block_search_to_a_measured_target(tiny_source, tmp_path, monkeypatch):
    """The block path end to end, on a fixed table (a tiny model's blocks are a few percent of its time, and
    this machine's timings move by more than that)."""
    from sleb import timing

    folder, text = tiny_source
    out = tmp_path / "blocks"
    monkeypatch.setattr(timing, "measure_costs", lambda model, spec, branches=None, **kw: _measured(
        [1.0] * 6, None, 9.0, spec))
    result = _prune(folder, text, out, "--target-speedup", "1.1", "--speed-at", "prefill:16")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "sleb_report.json").read_text())
    assert run["budget"]["stopped_by"] == "target-speedup" and run["budget"]["predicted_speedup"] == pytest.approx(9 / 8)
    assert "measured speedup at prefill:16" in run["budget"]["reason"]
    assert "attention_seconds" not in run["speed"] and set(run["speed"]["unit_seconds"]) == {str(b) for b in range(6)}
    assert "target 1.1x" in result.output


def test_speed_at_is_refused_under_torchrun_and_with_from_report(monkeypatch):
    from sleb import distributed
    from sleb.config import PruneConfig
    from sleb.settings import Budget

    speed = SearchOptions(unit="sublayer", speed_at="generation:8")
    with pytest.raises(BadInput, match="--from-report applies a recorded order.*--speed-at"):
        PruneConfig("m", "o", Budget(remove=1), search=speed, from_report="x").validate()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(BadInput, match="without torchrun"):
        PruneConfig("m", "o", Budget(remove=1), search=speed).validate()


def test_a_resumed_per_second_search_goes_on_with_its_recorded_cost_table(tmp_path, monkeypatch):
    from sleb import timing
    from sleb.budgets import budgeted_search

    model = family_model("llama", layers=6)
    windows = random_windows(3, 16, seed=9)
    measured = _synthetic(model)
    options = SearchOptions(unit="sublayer", unit_score="per-second", speed_at="generation:16")
    path = tmp_path / "ck.json"
    first = budgeted_search(model, windows, sleb.Budget(remove=2), options=options, measured=measured,
                            checkpoint=path, progress=False)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(timing, "measure_costs", no_timing)
    again = budgeted_search(model, windows, sleb.Budget(remove=4), options=options, checkpoint=path, progress=False)
    assert again.removed[:2] == first.removed
    assert again.speed["block_seconds"] == list(measured.block_seconds)
    whole = budgeted_search(model, windows, sleb.Budget(remove=4), options=options, measured=measured, progress=False)
    assert again.removed == whole.removed
    assert MeasuredCost.from_dict(measured.to_dict()) == measured


def test_per_second_settings_that_cannot_work_are_refused_and_a_plain_search_times_itself():
    model = family_model("llama", layers=4)
    windows = random_windows(2, 16)
    with pytest.raises(BadInput, match="per-second ranks units of different sizes"):
        SearchOptions(unit_score="per-second")
    with pytest.raises(BadInput, match="racing races the calibration loss; unit_score per-second"):
        sleb.search(model, windows, 1, unit="sublayer", unit_score="per-second", racing=True, progress=False)
    with pytest.raises(BadInput, match="--unit-score per-second ranks sleb's step scores"):
        sleb.search(model, windows, 1, unit="sublayer", unit_score="per-second", metric="cosine", progress=False)
    result = sleb.search(model, windows, 2, unit="sublayer", unit_score="per-second", speed_at="generation:8",
                         progress=False)
    assert len(result.removed) == 2 and result.speed["speed_at"] == "generation:8"
    assert len(result.speed["attention_seconds"]) == 4


def test_the_budget_reason_names_the_refined_set():
    from sleb.budgets import budgeted_search

    model = family_model("llama", layers=6)
    windows = random_windows(3, 16, seed=9)
    options = SearchOptions(unit="sublayer", unit_score="per-second", speed_at="generation:16")
    result = budgeted_search(model, windows, sleb.Budget(target_speedup=1.6, speedup_context=16), options=options,
                             measured=_synthetic(model), progress=False)
    assert "is met after 7 removals" in result.budget["reason"]
    assert "; refined by swaps to 5 units" in result.budget["reason"] and result.budget["removed"] == 5


def test_the_spread_of_many_rounds_ignores_the_stalled_tenth_at_each_end():
    from sleb.timing import relative_spread as _spread

    assert _spread([1.0, 1.2, 0.9]) == pytest.approx(0.15)  # few rounds: the whole range
    rounds = [1.0] * 18 + [0.98, 1.02] + [5.0, 9.0] + [0.1, 0.2]  # 24 rounds, 2 stalled and 2 odd at each end
    assert _spread(rounds) == pytest.approx(0.02)
    assert _spread([1.0] * 9 + [3.0]) == pytest.approx(0.0)  # from 10 rounds on, one outlier at an end is trimmed

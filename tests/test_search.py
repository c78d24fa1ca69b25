"""The fast search against the brute-force oracle, on many families and on the real model."""

from __future__ import annotations

import json

import pytest
import torch

import sleb
from sleb.arch import BlockRunner, next_token_losses

from tiny_models import FAMILIES, family_model, random_windows
from oracle import brute_force_sleb, loss_sum


@pytest.mark.spec
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_runner_reproduces_the_model(family):
    """Embeddings, every block and the head, run piecewise, give the model's own loss."""
    model = family_model(family)
    windows = random_windows()
    runner = BlockRunner(model)
    hidden = runner.embed(windows)
    for i in range(len(runner.blocks.modules)):
        hidden = runner.block(i, hidden, windows)
    piecewise = runner.window_losses(hidden, windows)
    with torch.no_grad():
        whole = next_token_losses(model(input_ids=windows, use_cache=False).logits, windows)
    torch.testing.assert_close(piecewise, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.spec
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_search_matches_brute_force(family):
    model = family_model(family)
    windows = random_windows(n=3, seqlen=12)
    order, steps = brute_force_sleb(model, windows, num_remove=2)
    result = sleb.search(model, windows, 2, batch_size=2, progress=False)
    assert result.removed == order
    for record, expected in zip(result.steps, steps):
        assert set(record.scores) == set(expected)
        for block, score in expected.items():
            assert record.scores[block] == pytest.approx(score, rel=1e-5, abs=1e-5)
    assert result.dense_loss == pytest.approx(loss_sum(model, windows), rel=1e-5)


@pytest.mark.spec
def test_state_cache_and_batching_do_not_change_scores():
    model = family_model("llama", layers=7)
    windows = random_windows(n=4, seqlen=10)
    plain = sleb.search(model, windows, 3, cache_bytes=0, progress=False)
    cached = sleb.search(model, windows, 3, batch_size=3, progress=False)
    assert cached.removed == plain.removed
    for a, b in zip(plain.steps, cached.steps):
        for block in a.scores:
            assert b.scores[block] == pytest.approx(a.scores[block], rel=1e-6)


def test_barriers_and_candidates():
    model = family_model("llama", layers=6)
    windows = random_windows(n=2, seqlen=8)
    result = sleb.search(model, windows, 2, early_barrier=2, latter_barrier=1, progress=False)
    assert set(result.steps[0].scores) == {2, 3, 4}
    assert all(b not in (0, 1, 5) for b in result.removed)
    with pytest.raises(sleb.SlebError, match="candidates"):
        sleb.search(model, windows, 5, progress=False)
    with pytest.raises(sleb.SlebError, match="3 of them are candidates"):
        sleb.search(model, windows, 4, early_barrier=2, progress=False)


@pytest.mark.spec
def test_ties_go_to_the_lowest_index():
    """Candidates made exact identities (zero output projections) tie; the lowest index goes first."""
    model = family_model("llama", layers=6)
    with torch.no_grad():
        for i in (1, 2, 3, 4):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    result = sleb.search(model, random_windows(n=2, seqlen=8), 2, progress=False)
    assert len(set(result.steps[0].scores.values())) == 1
    assert result.removed == [1, 2]


def test_checkpoint_resumes_without_redoing_steps(tmp_path):
    model = family_model("qwen3", layers=6)
    windows = random_windows(n=2, seqlen=8)
    ckpt = tmp_path / "runs" / "search.json"  # its folder does not exist yet
    first = sleb.search(model, windows, 1, checkpoint=ckpt, progress=False)
    saved = json.loads(ckpt.read_text())
    assert saved["format"] == "sleb-checkpoint/1" and saved["result"]["removed"] == first.removed
    resumed = sleb.search(model, windows, 3, checkpoint=ckpt, progress=False)
    fresh = sleb.search(model, windows, 3, progress=False)
    assert resumed.removed == fresh.removed
    assert resumed.steps[0].seconds == first.steps[0].seconds  # step 0 came from the file
    with pytest.raises(sleb.SlebError, match="another search"):
        sleb.search(model, random_windows(n=2, seqlen=8, seed=1), 1, checkpoint=ckpt, progress=False)


def test_resumed_search_reports_every_count(tmp_path):
    """A checkpoint whose result carries per-count losses (e.g. rebuilt from a run's report) for fewer
    removals: the resumed search's calibration perplexity covers every count, from its step scores."""
    model = family_model("qwen3", layers=6)
    windows = random_windows(n=2, seqlen=8)
    ckpt = tmp_path / "search.json"
    sleb.search(model, windows, 1, checkpoint=ckpt, progress=False)
    saved = json.loads(ckpt.read_text())
    first = saved["result"]
    first["count_losses"] = [first["dense_loss"], first["steps"][0]["scores"][str(first["removed"][0])]]
    ckpt.write_text(json.dumps(saved))
    resumed = sleb.search(model, windows, 3, checkpoint=ckpt, progress=False)
    fresh = sleb.search(model, windows, 3, progress=False)
    assert [resumed.calibration_ppl(k) for k in range(4)] == pytest.approx([fresh.calibration_ppl(k) for k in range(4)])


@pytest.mark.spec
@pytest.mark.slow
def test_real_model_matches_brute_force(smollm2):
    """SmolLM2-135M on offline Wikipedia text: same order and scores as the paper's loop."""
    model, tokenizer = smollm2
    windows = sleb.calibration(tokenizer, "gensim-wiki", nsamples=2, seqlen=32, seed=0)
    order, steps = brute_force_sleb(model, windows, num_remove=2)
    result = sleb.search(model, windows, 2, batch_size=2, progress=False)
    assert result.removed == order
    for record, expected in zip(result.steps, steps):
        for block, score in expected.items():
            assert record.scores[block] == pytest.approx(score, rel=1e-4)


@pytest.mark.spec
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_matches_brute_force(dtype):
    model = family_model("llama", layers=6).to("cuda", dtype)
    windows = random_windows(n=3, seqlen=12)
    order, steps = brute_force_sleb(model, windows, num_remove=2)
    result = sleb.search(model, windows, 2, batch_size=3, progress=False)
    assert result.removed == order
    for record, expected in zip(result.steps, steps):
        for block, score in expected.items():
            assert record.scores[block] == pytest.approx(score, rel=2e-2)

"""Each criterion against an independent implementation of its definition, budgets and bad input.

The independent implementations run plain full-model forwards and capture each block's input and
output with hooks; nothing from sleb's block runner or scorer is used.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM  # noqa: F401

import sleb
from oracle import brute_force_sleb, decoder_blocks, loss_sum
from tiny_models import tiny_config
from tiny_models import tiny_model as tiny_llama
from sleb.budgets import Budget, budgeted_search
from sleb.sizes import Sizer
from sleb.errors import SlebError
from sleb.sizes import forward_flops_per_token
from sleb.result import removal_set


def tiny_model(layers: int = 6, seed: int = 0, vocab: int = 100):
    return tiny_llama(tiny_config(vocab_size=vocab, layers=layers, context=2048), seed=seed)


@pytest.fixture(scope="module")
def model():
    return tiny_model(8)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(1))


# -- independent implementations --------------------------------------------------------------------
@torch.no_grad()
def boundaries(model, windows) -> list[torch.Tensor]:
    """Per window: [L + 1, tokens, hidden], the state entering each block and leaving the last one."""
    blocks = decoder_blocks(model)
    out = []
    for row in windows:
        states = {}

        def pre(module, args, kwargs, i):
            states[i] = (args[0] if args else kwargs["hidden_states"])[0].clone()

        def post(module, args, kwargs, output, i):
            states[i + 1] = (output[0] if isinstance(output, tuple) else output)[0].clone()

        handles = [b.register_forward_pre_hook(lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True)
                   for i, b in enumerate(blocks)]
        handles.append(blocks[-1].register_forward_hook(
            lambda m, a, k, o, i=len(blocks) - 1: post(m, a, k, o, i), with_kwargs=True))
        try:
            model(input_ids=row[None], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        out.append(torch.stack([states[i] for i in range(len(blocks) + 1)]).double())
    return out


def oracle_cosine(model, windows, n):
    states = boundaries(model, windows)
    L = len(decoder_blocks(model))
    bi = {}
    for b in range(1, L - 1):
        sims = [F.cosine_similarity(s[b], s[b + 1], dim=-1).mean().item() for s in states]
        bi[b] = 1 - sum(sims) / len(sims)
    return sorted(bi, key=lambda b: (bi[b], b))[:n]


def oracle_angular(model, windows, n, tokens="last"):
    states = boundaries(model, windows)
    L = len(decoder_blocks(model))
    best = None
    for start in range(1, L - n):  # blocks start..start+n-1, all candidates (first and last kept)
        d = 0.0
        for s in states:
            a, b = (s[start][-1:], s[start + n][-1:]) if tokens == "last" else (s[start], s[start + n])
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            d += (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
        if best is None or d < best[0] - 1e-12:
            best = (d, start)
    return list(range(best[1], best[1] + n))


def oracle_oneshot(model, windows, n):
    L = len(decoder_blocks(model))
    scores = {c: loss_sum(model, windows, skip=[c]) for c in range(1, L - 1)}
    return sorted(scores, key=lambda c: (scores[c], c))[:n]


# -- criteria -------------------------------------------------------------------------------------------
@pytest.mark.spec
@pytest.mark.parametrize("n", [1, 3])
def test_cosine_matches_independent_block_influence(model, windows, n):
    result = sleb.search(model, windows, n, metric="cosine", progress=False)
    assert sorted(result.removed) == sorted(oracle_cosine(model, windows, n))
    assert result.removed == oracle_cosine(model, windows, n)  # order: lowest BI first
    alias = sleb.search(model, windows, n, metric="block-influence", progress=False)
    assert alias.removed == result.removed and alias.metric == "cosine"


@pytest.mark.spec
@pytest.mark.parametrize("tokens", ["last", "all"])
def test_angular_matches_independent_window_search(model, windows, tokens):
    result = sleb.search(model, windows, 4, metric="angular", angular_tokens=tokens, progress=False)
    for n in range(1, 5):
        assert removal_set(result, n) == oracle_angular(model, windows, n, tokens), n


@pytest.mark.spec
def test_ppl_oneshot_matches_dense_single_removals(model, windows):
    result = sleb.search(model, windows, 3, metric="ppl-oneshot", progress=False)
    assert result.removed == oracle_oneshot(model, windows, 3)
    # Its first pick is SLEB's first pick (same measurement on the dense model).
    assert result.removed[0] == brute_force_sleb(model, windows, 1)[0][0]


def test_last_and_random(model, windows):
    assert sleb.search(model, windows, 3, metric="last", progress=False).removed == [6, 5, 4]
    r1 = sleb.search(model, windows, 3, metric="random", seed=3, progress=False).removed
    assert r1 == random.Random(3).sample(range(1, 7), 6)[:3]
    assert r1 == sleb.search(model, windows, 3, metric="random", seed=3, progress=False).removed
    seen = {tuple(sleb.search(model, windows, 3, metric="random", seed=s, progress=False).removed) for s in range(5)}
    assert len(seen) > 1


@pytest.mark.parametrize("metric", ["sleb", "cosine", "angular", "ppl-oneshot", "last"])
def test_report_shape_and_count_losses(model, windows, metric):
    result = sleb.search(model, windows, 3, metric=metric, progress=False)
    assert len(result.removed) == 3 and len(result.steps) == 3
    assert all(isinstance(s.scores, dict) and s.scores for s in result.steps)
    for k in range(4):
        expected = loss_sum(model, windows, skip=removal_set(result, k))
        assert result.calibration_ppl(k) == pytest.approx(math.exp(expected / len(windows)), rel=1e-4)
    again = sleb.SearchResult.from_dict(result.to_dict())
    assert again.removed == result.removed and again.calibration_ppl(3) == result.calibration_ppl(3)


@pytest.mark.spec
def test_sleb_metric_still_matches_brute_force(model, windows):
    order, _ = brute_force_sleb(model, windows, 3)
    assert sleb.search(model, windows, 3, progress=False).removed == order


# -- budgets -----------------------------------------------------------------------------------------------
def test_target_params_and_speedup(model, windows):
    L = 8
    dense = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in decoder_blocks(model)[0].parameters())
    r = budgeted_search(model, windows, Budget(target_params=(dense - 2.5 * per_block) / dense), progress=False)
    assert len(r.removed) == 3 and r.budget["stopped_by"] == "target-params"
    assert r.budget["parameters_after"] == dense - 3 * per_block
    assert r.removed == sleb.search(model, windows, 3, progress=False).removed
    absolute = budgeted_search(model, windows, Budget(target_params=dense - 1.5 * per_block), progress=False)
    assert len(absolute.removed) == 2

    # Speedup: the smallest count whose FLOP-model speedup reaches the target, computed independently.
    full = forward_flops_per_token(model, 16)["total"]
    target = 1.3
    expected = next(k for k in range(1, L - 1) if full / Sizer.of(model, 16).flops(list(range(1, 1 + k))) >= target)
    s = budgeted_search(model, windows, Budget(target_speedup=target, speedup_context=16), progress=False)
    assert len(s.removed) == expected and s.budget["ideal_speedup"] >= target
    assert s.budget["stopped_by"] == "target-speedup"


@pytest.mark.parametrize("metric", ["cosine", "last"])
def test_max_ppl_increase_stops_before_exceeding(model, windows, metric):
    full = sleb.search(model, windows, 6, metric=metric, progress=False)
    ratios = [full.calibration_ppl(k) / full.calibration_ppl(0) for k in range(7)]
    assert max(ratios[1:]) > 1, "the fixture model should lose calibration ppl for some removal"
    x = 1 + (max(ratios[1:]) - 1) / 2
    first_over = next(k for k in range(1, 7) if ratios[k] > x)
    if first_over == 1:
        with pytest.raises(SlebError, match="no block can be removed"):
            budgeted_search(model, windows, Budget(max_ppl_increase=x), metric=metric, progress=False)
        return
    r = budgeted_search(model, windows, Budget(max_ppl_increase=x), metric=metric, progress=False)
    assert removal_set(r, len(r.removed)) == removal_set(full, first_over - 1)
    assert r.budget["stopped_by"] == "max-ppl-increase"
    assert r.calibration_ppl() <= x * r.calibration_ppl(0)


def test_sleb_search_stops_when_asked(model, windows):
    full = sleb.search(model, windows, 4, progress=False)
    r = sleb.search(model, windows, 4, stop_when=lambda res: len(res.removed) == 2, progress=False)
    assert r.removed == full.removed[:2]


def test_ceiling_caps_a_size_target(model, windows):
    full = sleb.search(model, windows, 5, progress=False)
    big = 1 + 1e6
    r = budgeted_search(model, windows, Budget(remove=4, max_ppl_increase=big), progress=False)
    assert r.removed == full.removed[:4] and r.budget["stopped_by"] == "remove"


@pytest.mark.parametrize(
    "budget, message",
    [
        (Budget(target_params=0.01), "cannot be met"),
        (Budget(target_speedup=50), "cannot be met"),
        (Budget(target_speedup=0.9), "above 1"),
        (Budget(remove=6), "removes every candidate"),
        (Budget(max_ppl_increase=1e9), "removes every candidate"),
        (Budget(max_ppl_increase=0.5), "above 1"),
        (Budget(remove=2, ratio=0.2), "at most one"),
        (Budget(), "give a budget"),
    ],
)
def test_bad_budgets(model, windows, budget, message):
    with pytest.raises(SlebError, match=message):
        budgeted_search(model, windows, budget, progress=False)


def test_unknown_metric(model, windows):
    with pytest.raises(SlebError, match="unknown metric 'foo'"):
        sleb.search(model, windows, 2, metric="foo", progress=False)

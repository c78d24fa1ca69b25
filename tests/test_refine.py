"""Beam search and swap refinement: never worse than greedy, and correct against exhaustive search."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM  # noqa: F401

from oracle import brute_force_sleb, loss_sum
from tiny_models import tiny_config
from tiny_models import tiny_model as tiny_llama
from sleb.budgets import budgeted_search
from sleb.config import Budget, Refinement
from sleb.result import count_loss


def tiny_model(seed: int, layers: int = 6):
    return tiny_llama(tiny_config(vocab_size=100, layers=layers, context=2048, initializer_range=0.2), seed=seed)


def windows(seed: int):
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.spec
@pytest.mark.parametrize("seed", [0])
def test_beam_and_swap_never_worse_than_greedy_and_reach_the_optimum(seed):
    model, calib, count = tiny_model(seed), windows(seed), 2
    cands = range(1, 5)
    exhaustive = {s: loss_sum(model, calib, skip=list(s)) for s in itertools.combinations(cands, count)}
    optimum = min(exhaustive.values())
    greedy_order, _ = brute_force_sleb(model, calib, count)
    greedy_loss = exhaustive[tuple(sorted(greedy_order))]

    beam = budgeted_search(model, calib, Budget(remove=count), refine=Refinement(beam=2), progress=False)
    assert beam.refine["greedy_removed"] == greedy_order
    assert beam.refine["greedy_loss"] == pytest.approx(greedy_loss, rel=1e-5)
    assert count_loss(beam, count) <= greedy_loss + 1e-6
    assert count_loss(beam, count) == pytest.approx(exhaustive[tuple(sorted(beam.removed))], rel=1e-5)
    # A beam as wide as the number of sets is exhaustive.
    wide = budgeted_search(model, calib, Budget(remove=count), refine=Refinement(beam=len(exhaustive)), progress=False)
    assert count_loss(wide, count) == pytest.approx(optimum, rel=1e-5)

    swap = budgeted_search(model, calib, Budget(remove=count), refine=Refinement("swap"), progress=False)
    refined = tuple(sorted(swap.removed))
    assert swap.refine["loss"] == pytest.approx(exhaustive[refined], rel=1e-5)
    assert exhaustive[refined] <= greedy_loss + 1e-6
    # The refined set is a local optimum: no single exchange lowers the loss.
    for r in refined:
        for k in set(cands) - set(refined):
            neighbour = tuple(sorted(set(refined) - {r} | {k}))
            assert exhaustive[neighbour] >= exhaustive[refined] - 1e-6
    # Smaller counts keep greedy's sets.
    from sleb.result import removal_set

    assert removal_set(swap, 1) == sorted(greedy_order[:1])

"""Searches that beat greedy SLEB: beam search and swap refinement.

Greedy removal is not optimal: two blocks that are each harmless can be harmful together, and an
early choice cannot be undone. Both methods here score candidate sets with the core's prefix-tree
scorer (`sleb.scoring.variant_losses`), all candidates of one step or round in a single call, and
both keep greedy's answer as a fallback, so neither can end with a higher calibration loss than
greedy SLEB at the same block count:

* `beam_search` keeps the `width` best removal sets at each step (plus greedy's own path), and
  expands all of them in one scoring call.
* `refine_swap` starts from a removal set and tries exchanging every removed block with every
  kept candidate block; the best exchange that lowers the calibration loss is applied, and rounds
  repeat until no exchange helps or the time budget ends. It works on branch units too (`result.unit`),
  where units differ in size: there, with `drops`, putting a removed unit back is a move as well (a
  greedy search by a ratio may overshoot a size target), and every move must stay `feasible`.

Both record greedy's and the refined set's calibration loss in `SearchResult.refine`.
"""

from __future__ import annotations

import dataclasses

import math
import time
from typing import Callable

import torch

from .arch import BlockRunner
from .units import UnitSpace, unit_runner
from .progress import progress_bar
from .settings import SearchOptions
from .errors import BadInput
from .result import SearchResult, StepRecord, count_loss, removal_set
from .scoring import variant_losses

# A swap must lower the loss by more than this fraction to count (guards against float noise).
RELATIVE_TOLERANCE = 1e-9


def _kept(num_blocks: int, removed) -> list[int]:
    gone = set(removed)
    return [b for b in range(num_blocks) if b not in gone]


def _count_losses(result: SearchResult) -> list[float]:
    return [count_loss(result, k) for k in range(len(result.removed) + 1)]


def _refine_record(result: SearchResult) -> dict:
    """The refinement record, started from the greedy set if this is the first refinement."""
    if result.refine is not None:
        return dict(result.refine, stages=list(result.refine["stages"]))
    count = len(result.removed)
    loss = count_loss(result, count)
    return {
        "start": f"the {result.metric} search's set (greedy for sleb)",
        "greedy_removed": removal_set(result, count),
        "greedy_loss": loss,
        "greedy_calibration_ppl": math.exp(loss / result.nsamples),
        "stages": [],
    }


@torch.no_grad()
def beam_search(
    model,
    calib: torch.Tensor,
    count: int,
    *,
    width: int,
    options: SearchOptions = SearchOptions(),
    base: SearchResult | None = None,
    feasible: Callable[[list[int]], bool] | None = None,
    progress: bool = True,
) -> SearchResult:
    """SLEB's loss with a beam: keep the `width` lowest-loss removal sets at each of `count` steps.

    Greedy's path (the lowest-loss child of greedy's previous set, ties to the lowest block) is
    always kept alongside the beam, so the final set's loss is never above greedy's. Sets reached
    by different orders are the same model and are kept once. `base` is a greedy result for the
    same windows whose report fields (budget, fingerprint) carry over.
    """
    started = time.perf_counter()
    runner = BlockRunner(model)
    num_blocks = len(runner.blocks.modules)
    batch_size = options.batch_size
    cands = options.candidates(range(num_blocks))
    # A beam entry: (removal order, per-step candidate scores along the path, losses along the path)
    dense = float(variant_losses(runner, calib, [list(range(num_blocks))], batch_size=batch_size)[0])
    beams: list[tuple[tuple[int, ...], list[dict[int, float]], list[float]]] = [((), [], [dense])]
    greedy = beams[0]
    for step in progress_bar(range(count), desc=f"beam {width}", disable=not progress, dynamic_ncols=True):
        parents = beams if any(b[0] == greedy[0] for b in beams) else beams + [greedy]
        variants, owners = [], []
        for p, (order, _, _) in enumerate(parents):
            alive = _kept(num_blocks, order)
            for c in cands:
                if c not in order:
                    variants.append([b for b in alive if b != c])
                    owners.append((p, c))
        losses = variant_losses(runner, calib, variants, batch_size=batch_size)
        scores: list[dict[int, float]] = [{} for _ in parents]
        for (p, c), loss in zip(owners, losses.tolist()):
            scores[p][c] = loss
        children = {}
        for p, (order, history, path_losses) in enumerate(parents):
            for c, loss in scores[p].items():
                key = tuple(sorted(order + (c,)))
                entry = (order + (c,), history + [scores[p]], path_losses + [loss])
                if key not in children or (loss, entry[0]) < (children[key][2][-1], children[key][0]):
                    children[key] = entry
            if order == greedy[0]:
                pick = min(scores[p], key=lambda c: (scores[p][c], c))
                greedy = (order + (pick,), history + [scores[p]], path_losses + [scores[p][pick]])
        ranked = sorted(children.items(), key=lambda item: (item[1][2][-1], item[0]))
        if step == count - 1 and feasible is not None:
            ranked = [item for item in ranked if feasible(list(item[0]))]
        beams = [entry for _, entry in ranked[:width]]
    final = min(beams + [greedy], key=lambda b: (b[2][-1], tuple(sorted(b[0]))))
    order, history, path_losses = final
    seconds = time.perf_counter() - started

    annotations = base.annotations() if base is not None else {}
    greedy_result = SearchResult.for_windows(calib, num_blocks, options, "sleb", removed=list(greedy[0]),
                                             dense_loss=dense, count_losses=greedy[2])
    record = _refine_record(base if base is not None else greedy_result)
    record["greedy_removed"] = list(greedy[0])  # greedy as measured here, in removal order
    record["greedy_loss"] = greedy[2][-1]
    record["greedy_calibration_ppl"] = math.exp(greedy[2][-1] / calib.shape[0])
    record["stages"].append({
        "method": "beam", "width": width, "removed": list(order), "loss": path_losses[-1],
        "calibration_ppl": math.exp(path_losses[-1] / calib.shape[0]), "seconds": seconds,
    })
    record.update(removed=list(order), loss=path_losses[-1], calibration_ppl=math.exp(path_losses[-1] / calib.shape[0]))
    annotations["refine"] = record
    annotations.pop("sets_by_count", None)
    return SearchResult.for_windows(
        calib, num_blocks, options, "sleb",
        removed=list(order),
        steps=[StepRecord(k, order[k], history[k], seconds / max(1, count)) for k in range(count)],
        dense_loss=dense,
        seconds=(base.seconds if base is not None else 0.0) + seconds,
        count_losses=path_losses,
        **annotations,
    )


def check_seconds(max_seconds: float | None) -> None:
    """A time budget must be a positive, finite number of seconds (0, a negative or NaN would end refinement
    before its first round, unnoticed); run before any model loads."""
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise BadInput(f"--refine-seconds must be a positive number of seconds, got {max_seconds}")


@torch.no_grad()
def refine_swap(
    model,
    calib: torch.Tensor,
    result: SearchResult,
    *,
    feasible: Callable[[list[int]], bool] | None = None,
    max_seconds: float | None = None,
    max_rounds: int | None = None,
    options: SearchOptions = SearchOptions(),
    progress: bool = True,
    drops: bool = False,
) -> SearchResult:
    """Improve a removal set by exchanging removed blocks with kept candidate blocks.

    Each round scores every (removed r, kept candidate k) exchange in one prefix-tree call and
    applies the one with the lowest loss if it lowers the current loss; rounds repeat until none
    does, `max_rounds` rounds ran, or `max_seconds` have passed (checked before each round). The
    loss only ever goes down, so the result is never worse than the set it started from. The
    refined set is recorded for its count in `sets_by_count`; smaller counts keep the
    starting search's sets.

    Args:
        result: the search to refine, on the same windows (its last count is refined).
        feasible: a test every exchanged set must pass (e.g. a parameter budget).
        drops: also try putting each removed unit back (a set one smaller; it must pass `feasible`). The
            moves of a round are every (removed, kept candidate) exchange, then every drop; the lowest loss
            wins, ties to the lowest removed id and then the lowest kept one (a drop counts as -1).
    """
    check_seconds(max_seconds)
    started = time.perf_counter()
    runner = unit_runner(model, result.unit)
    space = UnitSpace(result.unit, result.num_blocks)
    count = len(result.removed)
    cands = space.candidates(range(space.count), SearchOptions(early_barrier=result.early_barrier,
                                                               latter_barrier=result.latter_barrier))
    start = removal_set(result, count)
    order = list(result.removed) if sorted(result.removed) == sorted(start) else start  # keep the removal order
    losses = _count_losses(result)
    current = losses[count]
    swaps, rounds, stopped = [], 0, "no exchange lowers the calibration loss"
    bar = progress_bar(desc="swap refine", disable=not progress, dynamic_ncols=True, unit="round")
    while True:
        if max_seconds is not None and time.perf_counter() - started >= max_seconds:
            stopped = f"time budget of {max_seconds:g} s ended"
            break
        if max_rounds is not None and rounds >= max_rounds:
            stopped = f"{max_rounds} rounds ran"
            break
        gone = set(order)
        exchanges = []
        for r in sorted(gone):
            for k in cands:
                if k in gone:
                    continue
                new = sorted(gone - {r} | {k})
                if feasible is None or feasible(new):
                    exchanges.append((r, k, new))
        for r in sorted(gone) if drops and len(gone) > 1 else ():
            new = sorted(gone - {r})
            if feasible is None or feasible(new):
                exchanges.append((r, -1, new))
        if not exchanges:
            stopped = "no exchange is possible"
            break
        scored = variant_losses(runner, calib, [space.kept(new) for _, _, new in exchanges],
                                batch_size=options.batch_size).tolist()
        rounds += 1
        bar.update(1)
        best = min(range(len(exchanges)), key=lambda i: (scored[i], exchanges[i][0], exchanges[i][1]))
        if not scored[best] < current - RELATIVE_TOLERANCE * abs(current):
            break
        r, k, _ = exchanges[best]
        if k < 0:
            order.remove(r)
        else:
            order[order.index(r)] = k
        swaps.append({"out": r, "in": k if k >= 0 else None, "loss": scored[best],
                      "calibration_ppl": math.exp(scored[best] / result.nsamples)})
        current = scored[best]
        bar.set_postfix(loss=f"{current:.4f}")
    bar.close()
    seconds = time.perf_counter() - started

    record = _refine_record(result)
    record["stages"].append({
        "method": "swap", "removed": list(order), "loss": current, "calibration_ppl": math.exp(current / result.nsamples),
        "rounds": rounds, "swaps": swaps, "stopped": stopped, "seconds": seconds,
    })
    record.update(removed=list(order), loss=current, calibration_ppl=math.exp(current / result.nsamples))
    # Smaller counts keep the starting search's sets (the refined order's prefixes are not them); drops
    # leave fewer removals than the search made.
    final = len(order)
    sets = {str(k): sorted(removal_set(result, k)) for k in range(1, final)}
    sets[str(final)] = sorted(order)
    losses = losses[:final + 1]
    losses[final] = current
    return dataclasses.replace(
        result,
        removed=order,
        steps=list(result.steps[:final]),
        seconds=result.seconds + seconds,
        refine=record,
        sets_by_count=sets,
        count_losses=losses,
    )

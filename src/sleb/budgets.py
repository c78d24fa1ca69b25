"""Budgets: how many blocks to remove, said the way a deployment thinks of it.

A budget is one *size target* -- `remove` N blocks, a `ratio` of the blocks (rounded up, as the
paper), `target_params` (a fraction of the dense parameters, or an absolute count when above 1) or
`target_speedup` (the ideal speedup of `sleb.sizes`, the FLOP model `sleb bench` reports) -- and/or
a *ceiling*, `max_ppl_increase` X: stop before the calibration perplexity would exceed X times the
dense model's. The search removes blocks in its criterion's order until the size target is met,
or until the next removal would break the ceiling, whichever comes first; the report's
``budget`` entry says which budget stopped it and why.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Callable

import torch

from .arch import find_blocks
from .criteria import get_criterion
from .settings import Budget, Racing, Refinement, SearchOptions
from .errors import BadInput, SlebError
from .fingerprint import model_fingerprint
from .result import SearchResult, removal_set, truncate
from .greedy import recorded_costs
from .search import search
from .sizes import MeasuredCost, Sizer, block_params
from .timing import cost_model
from .units import unit_kind

def removal_bounds(savings: list[float], total: float, limit: float) -> tuple[int, int] | None:
    """Fewest removals that can bring `total` to <= `limit` (removing the largest savings first) and
    fewest that surely do (removing the smallest first); None when even removing all cannot."""
    if total - sum(savings) > limit:
        return None
    ascending, descending = sorted(savings), sorted(savings, reverse=True)
    lo = next(k for k in range(len(savings) + 1) if total - sum(descending[:k]) <= limit)
    hi = next(k for k in range(len(savings) + 1) if total - sum(ascending[:k]) <= limit)
    return lo, hi


def fmt_params(n: float) -> str:
    """A parameter count for people: `21.24M`, or `1,234` below 100k."""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def ratio_params(model, ratio: float) -> tuple[float, int]:
    """What `--ratio R` asks a branch-unit search to remove: R x the blocks' parameters (what whole-block SLEB
    would remove at that ratio). Returns (parameters to remove, the blocks' parameters)."""
    blocks_total = sum(block_params(model))
    return ratio * blocks_total, blocks_total


def first_meeting(result: SearchResult, meets: Callable[[list[int]], bool], start: int = 1) -> int | None:
    """The fewest removals, from `start`, whose set (`removal_set`) meets a size target; None when no count the
    search recorded does."""
    return next((k for k in range(start, len(result.removed) + 1) if meets(removal_set(result, k))), None)


# -- the budgeted search --------------------------------------------------------------------------
def budgeted_search(
    model,
    calib: torch.Tensor,
    budget: Budget,
    *,
    metric: str = "sleb",
    refine: Refinement = Refinement(),
    options: SearchOptions = SearchOptions(),
    racing: Racing | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    on_status: Callable[[str], None] | None = None,
    measured: MeasuredCost | None = None,
) -> SearchResult:
    """Search with a budget, then optionally improve the set (`refine.beam` width, `refine.method="swap"`).

    The cost model of `target_speedup` and of `options.unit_score` per-second is the FLOP ideal, or with
    `options.speed_at` the measured one: timed here before the search (`sleb.timing.measure_costs`), or
    `measured` when given (a table timed before, at the same `speed_at`).

    `racing` (None: the exact search) and `checkpoint` go to a step-wise criterion unchanged.
    Returns the result truncated to the count the budget allows, with `budget` saying
    which budget stopped the search and why, and `refine` comparing greedy with the
    refined set when one was asked for.
    """
    criterion = get_criterion(metric)
    metric = criterion.name
    early_barrier, latter_barrier = options.early_barrier, options.latter_barrier
    budget.validate()
    target = budget.size_target()
    beam = refine.beam
    if refine.method not in (None, "swap"):
        raise SlebError(f"unknown refinement {refine.method!r}; available: swap")
    if beam is not None and beam < 1:
        raise SlebError(f"--beam must be at least 1, got {beam}")
    if beam is not None and metric != "sleb":
        raise SlebError(f"--beam searches SLEB's loss step by step; it does not apply to --metric {metric}")
    num_blocks = len(find_blocks(model).modules)
    kind = unit_kind(options.unit)
    space = kind.space(num_blocks)
    cands = space.candidates(range(space.count), options)
    if not cands:
        raise SlebError(f"no candidate blocks: {num_blocks} blocks, barriers first {early_barrier}, last {latter_barrier}")
    if beam is not None and "--beam" in kind.unsupported:
        raise BadInput(f"--beam works on whole blocks; not with --unit {kind.name}")
    branches = kind.branches(model, calib[:1])
    ratio_by_size = target == "ratio" and kind.ratio_of_parameters
    by_size = target in ("target_params", "target_speedup") or ratio_by_size
    per_second = options.unit_score == "per-second"
    # The one cost model: timed now with --speed-at (before the search), else the FLOP ideal; a resumed
    # per-second search goes on with the table its checkpoint recorded.
    if measured is None and options.speed_at is not None and per_second and checkpoint is not None:
        measured = recorded_costs(checkpoint)
        if measured is not None and on_status:
            on_status(f"using the cost table recorded in {checkpoint} (timed when the search started)")
    if on_status and options.speed_at is not None and measured is None:
        on_status(f"timing every {kind.noun} at {options.speed_at} (the measured cost model)")
    if measured is not None and measured.spec != options.speed_at:
        raise BadInput(f"the measured costs are at {measured.spec}, the search's --speed-at is {options.speed_at}")
    sizer = (cost_model(model, budget.speedup_context, branches, options.speed_at, measured)
             if by_size or per_second or options.speed_at is not None else None)

    # Count bounds for the size target.
    lo, hi = 1, len(cands)
    meets: Callable[[list[int]], bool] = lambda removed: True  # noqa: E731
    describe = ""
    if target == "remove" or (target == "ratio" and not ratio_by_size):
        n = budget.remove if target == "remove" else budget.count(num_blocks)
        lo = hi = n
        describe = f"--remove {n}" if target == "remove" else f"--ratio {budget.ratio} of {num_blocks} blocks = {n}"
    elif target in ("target_params", "ratio"):
        if target == "ratio":  # branch units: a fraction of the blocks' parameters
            goal, blocks_total = ratio_params(model, budget.ratio)
            limit = sizer.dense_params - goal
        else:
            limit = budget.target_params * sizer.dense_params if budget.target_params <= 1 else budget.target_params
        describe = (f"--target-params {budget.target_params} ({fmt_params(limit)} of "
                    f"{fmt_params(sizer.dense_params)} parameters)" if target == "target_params" else
                    f"--ratio {budget.ratio} of the blocks' {fmt_params(blocks_total)} parameters "
                    f"({fmt_params(limit)} of {fmt_params(sizer.dense_params)} left)")
        bounds = removal_bounds([sizer.unit_sizes[b] for b in cands], sizer.dense_params, limit)
        if bounds is None:
            raise SlebError(f"{describe} cannot be met: removing every candidate {kind.noun} still leaves "
                            f"{fmt_params(sizer.params(cands))} of {fmt_params(sizer.dense_params)}")
        lo, hi = bounds
        if hi == 0:
            raise SlebError(f"the dense model ({fmt_params(sizer.dense_params)} parameters) already meets {describe}; "
                            "nothing to remove")
        meets = lambda removed: sizer.params(removed) <= limit  # noqa: E731
    elif target == "target_speedup":
        limit = sizer.dense_flops / budget.target_speedup
        if sizer.speedup(cands) < budget.target_speedup - 1e-12:
            raise BadInput(
                f"--target-speedup {budget.target_speedup} cannot be met: removing every candidate {kind.noun} gives "
                f"{sizer.speedup(cands):.3f}x ({sizer.cost_name}; barriers: first {early_barrier}, last "
                f"{latter_barrier})")
        # A unit saves at most its cost and its block's rest (the rest only once its sibling is gone too).
        # (only where both branches are candidates: `--unit attention` never removes a whole block)
        rest = sizer.block_rest_cost if len(kind.candidate_branches) == 2 and sizer.block_rest_cost else None
        upper = [sizer.block_flops[u] + (rest[space.block_of(u)] if rest else 0.0) for u in cands]
        lo = removal_bounds(upper, sizer.dense_flops, limit)[0]
        bounds = removal_bounds([sizer.block_flops[u] for u in cands], sizer.dense_flops, limit)
        hi = bounds[1] if bounds is not None else len(cands)
        meets = lambda removed: sizer.speedup(removed) >= budget.target_speedup - 1e-12  # noqa: E731
        describe = f"--target-speedup {budget.target_speedup} ({sizer.cost_name})"
    if lo >= len(cands):
        raise SlebError(
            f"{describe} removes every candidate {kind.noun} ({len(cands)} of {space.size_phrase()}; the first "
            f"{early_barrier} and last {latter_barrier} blocks are kept); choose a smaller budget"
        )

    ceiling = budget.max_ppl_increase

    def over_ceiling(result: SearchResult, k: int) -> bool:
        return ceiling is not None and result.calibration_ppl(k) > ceiling * result.calibration_ppl(0)

    def stop_when(r: SearchResult) -> bool:
        # A step-wise search's sets are nested: the first that meets a size target is the one kept.
        return (ceiling is not None and over_ceiling(r, len(r.removed))) or (by_size and meets(list(r.removed)))

    if on_status:
        on_status(f"searching with {metric} for up to {hi} removals")
    stepwise = {"stop_when": stop_when, "checkpoint": checkpoint, "on_status": on_status} if criterion.stepwise else {}
    if racing is not None:  # a one-shot criterion refuses it in one line
        stepwise["racing"] = racing
    if per_second:
        stepwise["costs"] = sizer
    if checkpoint is not None and not criterion.stepwise:
        raise BadInput(f"--checkpoint applies to step-wise criteria (sleb); {metric} ranks the blocks in one pass")
    result = search(model, calib, hi, metric=metric, options=options, progress=progress, **stepwise)
    searched = len(result.removed)

    # The count: the first that meets the size target, capped by the ceiling.
    k_target = first_meeting(result, meets, lo) if target else None
    first_over = next((k for k in range(1, searched + 1) if over_ceiling(result, k)), None)
    dense_ppl = result.calibration_ppl(0)
    if first_over is not None and (k_target is None or first_over <= k_target):
        count = first_over - 1
        ppl = result.calibration_ppl(first_over)
        stopped_by = "max-ppl-increase"
        reason = (f"removing {first_over} blocks would raise calibration perplexity to {ppl:.3f}, above "
                  f"{ceiling} x dense {dense_ppl:.3f} = {ceiling * dense_ppl:.3f}")
        if count == 0:
            raise SlebError(f"no block can be removed within --max-ppl-increase {ceiling}: {reason}")
    elif k_target is not None:
        count = k_target
        stopped_by = target.replace("_", "-")
        reason = f"{describe} is met after {count} removals"
        if sizer is not None:
            chosen = removal_set(result, count)
            reason += f" ({fmt_params(sizer.params(chosen))} parameters, " \
                      f"{'predicted' if sizer.measured else 'ideal'} speedup {sizer.speedup(chosen):.3f}x)"
    else:
        count = searched  # ceiling only, and it never binds: every candidate would go
        stopped_by, reason = "max-ppl-increase", "never exceeded"
    if count >= len(cands):
        raise SlebError(
            f"the budget removes every candidate {kind.noun} ({len(cands)} of {space.size_phrase()})"
            + (f": calibration perplexity stays within {ceiling} x dense" if ceiling is not None else "")
            + "; choose a tighter budget"
        )

    result = truncate(result, count)
    result.model_fingerprint = model_fingerprint(model)
    # Greedy by a ratio is myopic: with a size target, --unit-score per-second refines its set by swaps and
    # drops of units within the target, every move scored by the exact loss.
    swap = refine.method == "swap" or (per_second and by_size and criterion.stepwise)
    if beam is not None or swap:
        from .refine import beam_search, refine_swap

        def feasible(removed_set: list[int]) -> bool:
            return meets(removed_set) if by_size else True

        if beam is not None:
            if on_status:
                on_status(f"beam search (width {beam}) for {count} removals")
            result = beam_search(model, calib, count, width=beam, options=options, base=result, progress=progress)
        if swap:
            if on_status:
                on_status(f"refining the {count}-{kind.short_noun} set by swaps")
            # Unasked (per-second's own refinement), it takes at most as long as the search did (30 s at least).
            seconds = refine.seconds if refine.method == "swap" or refine.seconds else max(result.seconds, 30.0)
            result = refine_swap(model, calib, result, feasible=feasible, max_seconds=seconds,
                                 options=options, progress=progress, drops=by_size and not kind.whole_blocks)
    removed = list(result.removed)
    flop = Sizer.of(model, budget.speedup_context, branches)
    sizer = sizer or flop
    if swap and result.refine["stages"][-1]["swaps"]:  # the set changed: say what it is now
        reason += (f"; refined by swaps to {len(removed)} {kind.short_noun}s ({fmt_params(sizer.params(removed))} "
                   f"parameters, {'predicted' if sizer.measured else 'ideal'} speedup {sizer.speedup(removed):.3f}x)")
    result.budget = {
        "requested": {k: v for k, v in asdict(budget).items() if v is not None},
        "stopped_by": stopped_by,
        "reason": reason,
        "removed": len(removed),
        "parameters_before": sizer.dense_params,
        "parameters_after": sizer.params(removed),
        "ideal_speedup": flop.speedup(removed),
        "speedup_context": budget.speedup_context,
    }
    if sizer.measured is not None:
        result.budget.update(predicted_speedup=sizer.speedup(removed), speed_at=sizer.measured.spec)
        result.speed = speed_entry(sizer, removed, space)
    return result


def speed_entry(sizer: Sizer, removed: list[int], space) -> dict:
    """The run file's `speed` entry: the measured cost table (by unit label), how it was measured, and the
    speedup it predicts for `removed`."""
    entry = sizer.measured.to_dict()
    entry["unit_seconds"] = {space.label(u): sizer.block_flops[u] for u in range(space.count)}
    entry["predicted_speedup"] = sizer.speedup(removed)
    return entry

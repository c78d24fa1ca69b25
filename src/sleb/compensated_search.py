"""Compensation-aware selection: a greedy SLEB search that judges each step with its compensation fitted.

Plain SLEB, then `sleb.compensate`, picks the blocks as if nothing would be compensated.
`aware_search` goes past the paper (`--compensate-aware`): at each step it re-scores SLEB's best
`top_k` candidates with the compensation of the enlarged set fitted (`sleb.compensate.Fitter`,
whose memo re-fits only the runs that changed) and removes the one whose compensated calibration
loss is lowest.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .arch import input_device
from .compensate import Fitter
from .errors import SlebError
from .progress import progress_bar
from .settings import Compensation, SearchOptions
from .result import SearchResult, StepRecord
from .scoring import StateCache, default_cache_budget, variant_losses


def aware_search(
    model,
    calib: torch.Tensor,
    num_remove: int,
    *,
    compensation: Compensation = Compensation(method="linear", aware=True),
    options: SearchOptions = SearchOptions(),
    cosine_steps: int = 300,
    cosine_lr: float = 1e-4,
    cosine_tokens: int = 65536,
    plain: SearchResult | None = None,
    on_step: Callable[[SearchResult], None] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Compensation-aware SLEB: greedy removal where each step is judged *with* its compensation.

    `compensation` says how (its `method` is the objective, `top_k` and `ridge` as `sleb.Compensation`),
    `options` the shared search settings (batch size, barriers, seed). At each step every candidate is
    scored as SLEB does (the loss of the plain model with the
    blocks removed so far and the candidate skipped); the `top_k` best are then re-scored with the
    compensation of the enlarged set fitted, and the one with the lowest compensated calibration
    loss goes (ties: lowest index). SLEB's scores depend only on the removed set, so they are
    taken from `plain` (an earlier plain SLEB search on the same windows) for as long as the sets
    agree, and hidden states are cached between steps as in `sleb.search`. The model is left as it
    was; apply the result with `compensate` and `remove_blocks`.

    Returns a SearchResult whose step scores are SLEB's plain scores, whose
    ``count_losses`` are the compensated calibration losses, and whose
    `compensation_aware` records every re-scored candidate.
    """
    objective, top_k, ridge = compensation.method or "linear", compensation.top_k, compensation.ridge
    batch_size, early_barrier, latter_barrier = options.batch_size, options.early_barrier, options.latter_barrier
    if top_k < 1:
        raise SlebError(f"top_k must be at least 1, got {top_k}")
    started = time.perf_counter()
    fitter = Fitter(model, calib, objective=objective, ridge=ridge, batch_size=batch_size, cosine_steps=cosine_steps,
                     cosine_lr=cosine_lr, cosine_tokens=cosine_tokens, seed=options.seed, progress=False)
    n = fitter.num_units
    if not 1 <= num_remove <= n - early_barrier - latter_barrier:
        raise SlebError(f"cannot remove {num_remove} of {n} blocks with barriers {early_barrier}/{latter_barrier}")
    result = SearchResult.for_windows(calib, n, options, "sleb")
    cache = StateCache(default_cache_budget(input_device(model)))
    log: list[dict] = []
    result.compensation_aware = {"objective": objective, "top_k": top_k, "ridge": ridge, "steps": log}
    bar = progress_bar(range(num_remove), desc="compensation-aware SLEB", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        for step in bar:
            step_start = time.perf_counter()
            alive = [b for b in range(n) if b not in set(result.removed)]
            cands = options.candidates(alive)
            fitter.restore()  # SLEB's scores are those of the plain model (and keep the state cache valid)
            same_set = plain is not None and sorted(plain.removed[:step]) == sorted(result.removed)
            if same_set and step < len(plain.steps) and set(plain.steps[step].scores) == set(cands):
                scores = dict(plain.steps[step].scores)
                if step == 0:
                    result.dense_loss = plain.dense_loss
            else:
                variants = [[b for b in alive if b != c] for c in cands] + ([alive] if step == 0 else [])
                losses = variant_losses(fitter.runner, calib, variants, batch_size=batch_size, cache=cache)
                scores = {c: float(losses[i]) for i, c in enumerate(cands)}
                if step == 0:
                    result.dense_loss = float(losses[-1])
            if step == 0:
                result.count_losses.append(result.dense_loss)
            shortlist = sorted(cands, key=lambda c: (scores[c], c))[:top_k]
            rescored = {}
            for c in shortlist:
                fitter.apply(result.removed + [c])
                rescored[c] = fitter.loss(result.removed + [c])
            best = min(shortlist, key=lambda c: (rescored[c], c))
            result.removed.append(best)
            result.count_losses.append(rescored[best])
            result.steps.append(StepRecord(step, best, scores, time.perf_counter() - step_start))
            log.append({"step": step, "sleb_pick": shortlist[0], "picked": best,
                        "compensated_losses": {str(c): v for c, v in rescored.items()}})
            result.seconds = time.perf_counter() - started
            bar.set_postfix(removed=best, ppl=f"{result.calibration_ppl():.2f}")
            if on_step is not None:
                on_step(result)
    finally:
        fitter.restore()
        bar.close()
    return result


__all__ = ["aware_search"]

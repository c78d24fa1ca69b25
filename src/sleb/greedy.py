"""SLEB's own criterion, step by step: remove the block whose absence hurts least, re-measure, repeat.

At each step every alive unit except the barriers' is a candidate; its score is the sum over
calibration windows of the mean next-token cross-entropy of the current model with it skipped (the
paper's Metric3). The lowest score goes (ties to the lowest index). Racing (`sleb.racing`) may stop
scoring candidates that cannot win. A checkpoint written after every step lets a stopped search
resume; it records every setting that changes the picks. `sleb.search.search` dispatches here for
`metric="sleb"` (through the criteria registry, `sleb.criteria`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .arch import BlockRunner, input_device
from .distributed import agree, is_main
from .errors import BadInput
from .fingerprint import model_fingerprint, same_model
from .outputs import atomic_write_text
from .progress import progress_bar
from .racing import check_racing, likeliest, race_step, survival_prior
from .result import SearchResult, StepRecord
from .scoring import StateCache, boundary_stats, check_finite_dense, default_cache_budget, variant_losses, window_batches
from .settings import Racing, SearchOptions, differing_settings
from .sizes import MeasuredCost, Sizer
from .timing import cost_model
from .units import UnitSpace, unit_runner

CHECKPOINT_FORMAT = "sleb-checkpoint/1"


def checkpoint_settings(metric: str, options: SearchOptions, racing: Racing | None, nsamples: int,
                        seqlen: int) -> dict:
    """The settings that change a step-wise search's picks, as a checkpoint records them: the criterion,
    barriers, unit and unit score, racing's statistics, the windows' shape and the seed that drew them
    (their tokens and the model are checked once loaded). Batch size and cache do not change picks: a
    resumed run may change them (e.g. after running out of memory)."""
    return {"metric": metric, "early_barrier": options.early_barrier, "latter_barrier": options.latter_barrier,
            "unit": options.unit, "unit_score": options.unit_score, "speed_at": options.speed_at,
            "nsamples": nsamples, "seqlen": seqlen,
            "seed": options.seed, "racing": asdict(racing) if racing is not None else None}


# What checkpoints of sleb before these entries meant by leaving them out.
_CHECKPOINT_DEFAULTS = {"unit": "block", "unit_score": "loss", "speed_at": None}


def _checkpoint_identity(model, result: SearchResult, options: SearchOptions, racing: Racing | None) -> dict:
    """What must match for a checkpoint to be resumed: the model, the windows and every setting that
    changes the picks."""
    settings = checkpoint_settings(result.metric, options, racing, result.nsamples, result.seqlen)
    settings.update(calibration_sha256=result.calibration_sha256, dtype=str(model.dtype))
    return {"model": model_fingerprint(model), "settings": settings}


def _write_checkpoint(path: Path, identity: dict, result: SearchResult) -> None:
    atomic_write_text(path, json.dumps({"format": CHECKPOINT_FORMAT, **identity, "result": result.to_dict()}))


def recorded_costs(path) -> MeasuredCost | None:
    """The measured cost table an existing checkpoint's search ranked by (None: no file, or no table), so that a
    resumed per-second search goes on with the same costs."""
    path = Path(path)
    if not path.exists():
        return None
    speed = _read_checkpoint(path)["result"].get("speed")
    return MeasuredCost.from_dict(speed) if speed else None


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise BadInput(f"checkpoint {path} is not a file")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a sleb checkpoint")
        SearchResult.from_dict(saved["result"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise BadInput(f"checkpoint {path} is empty, corrupt or not a sleb checkpoint ({err}); give another "
                       "--checkpoint path to start the search over") from err
    return saved


def _check_settings(path: Path, saved: dict, ours: dict) -> None:
    theirs = {**_CHECKPOINT_DEFAULTS, **(saved.get("settings") or {})}
    # (an entry older checkpoints did not record, such as the seed, is left to the windows' token hash)
    shown = differing_settings(theirs, ours)
    if shown:
        raise BadInput(f"checkpoint {path} belongs to another search ({shown}); use another --checkpoint file")


def check_checkpoint(path: str | os.PathLike, settings: dict) -> None:
    """Before any model loads: refuse an existing checkpoint written with other `checkpoint_settings`."""
    path = Path(path)
    if path.exists():
        _check_settings(path, _read_checkpoint(path), settings)


def _resume(path: Path | None, identity: dict, fresh: SearchResult) -> SearchResult:
    """Continue from a checkpoint written by an identical search; refuse anything else in one line."""
    if path is None or not path.exists():
        return fresh
    saved = _read_checkpoint(path)
    if not same_model(saved.get("model") or {}, identity["model"]):
        raise BadInput(f"checkpoint {path} was written by a search of another model (its weights differ); "
                       "use another --checkpoint file")
    _check_settings(path, saved, identity["settings"])
    return SearchResult.from_dict(saved["result"])


@torch.no_grad()
def set_losses(model, calib: torch.Tensor, removal_sets: list[list[int]], *, unit: str = "block",
               batch_size: int = 1) -> list[float]:
    """The calibration loss (sum over windows of the mean next-token cross-entropy, as a search scores)
    of the model with each set of units skipped: what an applied order costs, measured."""
    runner = unit_runner(model, unit)
    space = UnitSpace(unit, len(runner.blocks.modules))
    variants = [[u for u in range(space.count) if u not in set(chosen)] for chosen in removal_sets]
    return [float(loss) for loss in variant_losses(runner, calib, variants, batch_size=batch_size)]


def per_cost(increase: float, cost: float) -> float:
    """A branch candidate's rank under a unit score by size: loss increase per unit of `cost` saved (parameters,
    FLOPs or seconds); a decrease ranks by decrease times cost (the bigger unit that helps goes first)."""
    return increase / max(cost, 1e-30) if increase > 0 else increase * cost


def per_parameter(increase: float, parameters: int) -> float:
    """A branch candidate's rank under unit_score per-parameter: loss increase per parameter removed; a
    decrease ranks by decrease times size (the bigger unit that helps goes first)."""
    return per_cost(increase, max(parameters, 1))


def _racing_guesses(runner: BlockRunner, calib: torch.Tensor, cands: list[int], result: SearchResult,
                    batch_size: int, count: int) -> list[int]:
    """Likely leaders a racing step completes first (the best one is its reference), chosen without
    looking at this step's window scores (so the test can use every window).

    From the second step on, the previous step's longest-surviving remaining candidates; in the first,
    the blocks whose input and output hidden states are most alike (Metric1, one dense pass over all the
    windows): on SmolLM2 the scores of the first few windows pick a worse reference far more often.
    """
    if result.steps:
        previous = result.steps[-1]
        guesses = likeliest(survival_prior(previous.scores, previous.windows), cands, count)
        if guesses:
            return guesses
    stats = boundary_stats(runner, calib, batch_size)
    return likeliest({c: 1.0 - float(stats.cos_all[c, c + 1]) for c in cands}, cands, count)


@torch.no_grad()
def greedy_sleb(
    model,
    calib: torch.Tensor,
    num_remove: int,
    options: SearchOptions,
    *,
    checkpoint=None,
    cache_bytes: int | None = None,
    progress: bool = True,
    stop_when: Callable[[SearchResult], bool] | None = None,
    on_status: Callable[[str], None] | None = None,
    racing: Racing | None = None,
    costs: Sizer | None = None,
) -> SearchResult:
    """SLEB's own criterion, step-wise: `search(..., metric="sleb")` runs this (see `search` for the hooks).

    `costs`: the cost model `unit_score` per-second divides by (`sleb.timing.cost_model`; None: made here,
    timed when `options.speed_at` is set)."""
    unit = options.unit
    runner = unit_runner(model, unit)
    num_blocks = len(runner.blocks.modules)
    space = UnitSpace(unit, num_blocks)
    size = saved = None
    branches = runner.prepare(calib[:1])  # refuses a family whose branches cannot be skipped exactly, first
    if options.unit_score == "per-parameter":
        size = Sizer.of(model, calib.shape[1], branches).block_params
    elif options.unit_score == "per-second":
        costs = costs or cost_model(model, calib.shape[1], branches, options.speed_at)

        def saved(removed: list[int], unit: int) -> float:
            """The cost a unit's removal saves now (with its sibling gone, its block's rest too)."""
            return costs.flops(removed) - costs.flops([*removed, unit])
    if racing is not None:
        check_racing(racing)
    result = SearchResult.for_windows(calib, num_blocks, options, "sleb", unit=unit)
    if saved is not None and costs.measured is not None:  # a resumed search reuses this table (sleb.budgets)
        result.speed = costs.measured.to_dict()
    if racing is not None:
        result.racing = asdict(racing)
    path = Path(checkpoint) if checkpoint is not None else None
    identity = _checkpoint_identity(model, result, options, racing) if path is not None else {}
    result = _resume(path, identity, result)
    # Every rank reads the checkpoint: on several nodes it must be a file they all see.
    agree({"the steps resumed from --checkpoint": result.removed}, "put --checkpoint where every rank reads it")
    result.count_losses = []  # greedy SLEB's step scores are its count losses; a stale list would cut them short
    if result.steps and on_status:
        on_status(f"resuming the search from {path}: {len(result.steps)} of {num_remove} steps already done")
    if cache_bytes is None:
        cache_bytes = default_cache_budget(input_device(model))
    cache = StateCache(cache_bytes)
    batch_size = options.batch_size
    started = time.perf_counter() - result.seconds
    if math.isnan(result.dense_loss):
        # Measured before the first step (its hidden states fill the cache the first step reads) so
        # that a model with NaN weights stops here, not after a search over NaN scores.
        result.dense_loss = float(variant_losses(runner, calib, [list(range(space.count))], batch_size=batch_size,
                                                 cache=cache)[0])
    check_finite_dense(runner, calib, result.dense_loss)
    batches_here = len(window_batches(calib, batch_size))
    first_candidates = len(space.candidates(range(space.count), options))
    total = sum(first_candidates - s for s in range(num_remove))
    done = sum(len(s.scores) for s in result.steps[:num_remove])
    bar = progress_bar(
        total=total * batches_here,
        initial=done * batches_here,
        disable=not progress or not is_main(),
        desc="SLEB search",
        unit="cand",
        dynamic_ncols=True,
    )
    try:
        while len(result.removed) < num_remove:
            step_start = time.perf_counter()
            alive = [u for u in range(space.count) if u not in set(result.removed)]
            cands = space.candidates(alive, options)
            variants = [[b for b in alive if b != c] for c in cands]
            step = len(result.removed)
            bar.set_description(f"SLEB step {step + 1}/{num_remove}")

            def tick(index: int) -> None:
                if index < len(cands):
                    bar.update(1)
                    bar.set_postfix({unit: space.label(cands[index])}, refresh=False)

            if racing is not None:
                guesses = _racing_guesses(runner, calib, cands, result, batch_size, racing.guesses)
                race = race_step(runner, calib, dict(zip(cands, variants)), always=[], batch_size=batch_size,
                                 confidence=racing.confidence, min_windows=racing.min_windows,
                                 tolerance=racing.tolerance, reference=guesses, cache=cache,
                                 on_scored=lambda c: tick(cands.index(c)))
                bar.update(sum(batches_here - math.ceil(n / batch_size) for n in race.windows.values()))
                best = race.best
                record = StepRecord(step, best, race.scores, 0.0, race.windows, race.kinds, racing.confidence)
            else:
                losses = variant_losses(runner, calib, variants, batch_size=batch_size, on_variant=tick, cache=cache)
                scores = {c: float(losses[i]) for i, c in enumerate(cands)}
                base = result.dense_loss if not result.steps else result.steps[-1].scores[result.removed[-1]]
                if size is not None:
                    best = min(cands, key=lambda c: (per_parameter(scores[c] - base, size[c]), c))
                elif saved is not None:
                    best = min(cands, key=lambda c: (per_cost(scores[c] - base, saved(result.removed, c)), c))
                else:
                    best = min(cands, key=lambda c: (scores[c], c))
                record = StepRecord(step, best, scores, 0.0)
            record.seconds = time.perf_counter() - step_start
            result.removed.append(best)
            result.steps.append(record)
            result.seconds = time.perf_counter() - started
            if path is not None and is_main():
                _write_checkpoint(path, identity, result)
            if stop_when is not None and stop_when(result):
                break
    finally:
        bar.close()
    if len(result.removed) > num_remove:  # a checkpoint from a longer search: keep its prefix
        result.removed = result.removed[:num_remove]
        result.steps = result.steps[:num_remove]
    result.seconds = time.perf_counter() - started
    return result

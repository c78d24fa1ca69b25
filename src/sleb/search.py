"""The SLEB search: remove blocks greedily, re-measuring the calibration loss after each removal.

At each step every alive block except the first `early_barrier` and last `latter_barrier` alive
ones is a candidate. A candidate's score is the sum over calibration windows of the mean
next-token cross-entropy of the current model with that block skipped (the paper's Metric3).
The lowest score is removed (ties go to the lowest block index), and the search repeats until
`num_remove` blocks are gone. The search never edits the model: it returns the order, and
`sleb.remove_blocks` applies it.
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
from tqdm.auto import tqdm

from .arch import BlockRunner, find_blocks, input_device
from .criteria import boundary_stats, check_unit_support, get_criterion
from .errors import BadInput
from .fingerprint import model_fingerprint, same_model
from .outputs import atomic_write_text
from .config import Racing, SearchOptions
from .racing import check_racing, likeliest, race_step, survival_prior
from .result import SearchResult, StepRecord
from .distributed import agree, is_main
from .scoring import StateCache, check_finite_dense, default_cache_budget, variant_losses, window_batches
from .units import UnitSpace, unit_runner

CHECKPOINT_FORMAT = "sleb-checkpoint/1"


def _checkpoint_identity(model, result: SearchResult) -> dict:
    """What must match for a checkpoint to be resumed: the model, the windows and every setting that
    changes the scores (batch size and cache do not: a resumed run may change them, e.g. after OOM)."""
    return {
        "model": model_fingerprint(model),
        "settings": {"metric": result.metric, "early_barrier": result.early_barrier,
                     "latter_barrier": result.latter_barrier, "nsamples": result.nsamples, "seqlen": result.seqlen,
                     "calibration_sha256": result.calibration_sha256, "dtype": str(model.dtype),
                     "racing": result.racing, **({"unit": result.unit} if result.unit != "block" else {})},
    }


def _write_checkpoint(path: Path, identity: dict, result: SearchResult) -> None:
    atomic_write_text(path, json.dumps({"format": CHECKPOINT_FORMAT, **identity, "result": result.to_dict()}))


def _resume(path: Path | None, identity: dict, fresh: SearchResult) -> SearchResult:
    """Continue from a checkpoint written by an identical search; refuse anything else in one line."""
    if path is None or not path.exists():
        return fresh
    if not path.is_file():
        raise BadInput(f"checkpoint {path} is not a file")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a sleb checkpoint")
        result = SearchResult.from_dict(saved["result"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInput(f"checkpoint {path} is empty, corrupt or not a sleb checkpoint ({err}); "
                       "give another --checkpoint path to start the search over") from err
    if not same_model(saved.get("model") or {}, identity["model"]):
        raise BadInput(f"checkpoint {path} was written by a search of another model (its weights differ); "
                       "use another --checkpoint file")
    theirs, ours = saved.get("settings") or {}, identity["settings"]
    differ = [k for k in ours if theirs.get(k) != ours[k]]
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} there vs {ours[k]!r} now" for k in differ)
        raise BadInput(f"checkpoint {path} belongs to another search ({shown}); use another --checkpoint file")
    return result


@torch.no_grad()
def search(
    model,
    calib: torch.Tensor,
    num_remove: int,
    *,
    metric: str = "sleb",
    batch_size: int = 1,
    early_barrier: int = 1,
    latter_barrier: int = 1,
    checkpoint: str | os.PathLike | None = None,
    cache_bytes: int | None = None,
    progress: bool = True,
    seed: int = 0,
    angular_tokens: str = "last",
    stop_when: Callable[[SearchResult], bool] | None = None,
    on_status: Callable[[str], None] | None = None,
    racing: bool | Racing = False,
    confidence: float = Racing.confidence,
    min_windows: int = Racing.min_windows,
    tolerance: float = Racing.tolerance,
    unit: str = "block",
    unit_score: str = "loss",
) -> SearchResult:
    """Find which blocks to remove with SLEB (the paper's Metric3), greedily, one per step.

    Args:
        model: a Hugging Face causal LM (any device, dtype or device_map); it is not modified.
        calib: LongTensor [nsamples, seqlen] of calibration windows (see `sleb.calibration`).
        num_remove: how many blocks to remove.
        metric: the redundancy criterion, a name or alias in `sleb.criteria.CRITERIA`: `sleb`
            (Metric3, the default), `ppl-oneshot` (Metric2), `cosine` (Metric1, alias
            `block-influence`: ShortGPT's BI), `angular`, `last` or `random`.
        batch_size: windows per forward pass (speed only; results agree within float rounding).
        early_barrier, latter_barrier: how many of the first / last alive blocks are never removed.
        checkpoint: a JSON file written after every step; a search started with an existing
            checkpoint of the same model, windows and settings resumes where it stopped.
        cache_bytes: memory for hidden states kept between steps, which lets each step resume
            from the previous step's work (exact; speed only). None: an eighth of the free
            memory where the states live; 0: off.
        progress: show a progress bar (step, candidate, ETA).
        seed: seed of the `random` criterion.
        angular_tokens: `last` (default) or `all`: the tokens the `angular` criterion compares.
        stop_when: called with the result after every greedy step; returning True ends the search
            early (budgets such as a perplexity ceiling use it).
        on_status: called with one-line notes for people (e.g. that a checkpoint is resumed).
        racing: True, or a `sleb.Racing` (then `confidence`, `min_windows` and `tolerance` are
            its own): score windows batch by batch and stop scoring candidates that cannot win (the
            free exact cut) or that the sequential paired test finds worse than the leader with
            `confidence`; see `sleb.racing`. Each step records the windows every candidate got
            and which scores are complete. The removed block's score is always complete.
        confidence: racing's confidence per step that its pick is within `tolerance` of the best
            candidate; 1.0 keeps only the exact cut (the exact search's picks, fewer complete scores).
        min_windows: racing never drops a candidate on fewer windows than this.
        tolerance: racing's indifference zone, a fraction of the calibration loss: with
            `confidence`, the pick's score is within this fraction of the best candidate's. 0 asks
            for the best itself (slower on near-ties).
        unit: what is removed (`sleb.units`): `block` (SLEB's), `sublayer` (each block's attention
            and MLP branch are separate candidates; ids 2i and 2i + 1) or `attention` (attention
            branches only). Step-wise `sleb` only.
        unit_score: with branch units, `loss` (remove the unit whose absence gives the lowest loss, as
            for blocks) or `per-parameter` (the lowest loss increase per parameter removed; ties to the
            lowest id; a unit whose removal lowers the loss ranks by that decrease times its size).
            Exact search only.

    `checkpoint`, `cache_bytes`, `stop_when` and `racing` belong to step-wise criteria; a one-shot
    criterion refuses them rather than ignore them.

    Returns:
        SearchResult with the removal order, every step's candidate scores and timings.
    """
    criterion = get_criterion(metric)
    options = SearchOptions(batch_size, early_barrier, latter_barrier, seed, angular_tokens, unit, unit_score)
    num_blocks = len(find_blocks(model).modules)
    space = UnitSpace(unit, num_blocks)
    max_remove = space.max_remove(options)
    if not 1 <= num_remove <= max_remove:
        what, of_them = ("blocks", "of them") if unit == "block" else (f"{unit} units", f"{unit} units")
        raise BadInput(
            f"cannot remove {num_remove} {what}: the model has {num_blocks} blocks and {max_remove} {of_them} "
            f"are candidates (barriers: first {early_barrier}, last {latter_barrier})"
        )
    if unit_score != "loss" and racing:
        raise BadInput("racing races the calibration loss; unit_score per-parameter runs the exact search")
    check_unit_support(criterion.name, unit, unit_score, flag="metric")
    if calib.dim() != 2 or calib.numel() == 0:
        raise BadInput(f"calibration windows must be a [nsamples, seqlen] tensor, got shape {tuple(calib.shape)}")
    hooks = {"checkpoint": checkpoint, "cache_bytes": cache_bytes, "stop_when": stop_when,
             "racing": racing if isinstance(racing, Racing) else Racing(confidence, tolerance, min_windows) if racing
             else None}
    if criterion.stepwise:
        return criterion.run(model, calib, num_remove, options, progress=progress, on_status=on_status, **hooks)
    given = [name for name, value in hooks.items() if value is not None]
    if given:
        raise BadInput(f"only step-wise criteria (sleb) take {' and '.join(given)}; {criterion.name} ranks the blocks "
                       "in one pass")
    return criterion.run(model, calib, num_remove, options, progress=progress)


def per_parameter(increase: float, parameters: int) -> float:
    """A branch candidate's rank under unit_score per-parameter: loss increase per parameter removed; a
    decrease ranks by decrease times size (the bigger unit that helps goes first)."""
    return increase / max(parameters, 1) if increase > 0 else increase * parameters


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
) -> SearchResult:
    """SLEB's own criterion, step-wise: `search(..., metric="sleb")` runs this (see `search` for the hooks)."""
    unit = options.unit
    runner = unit_runner(model, unit)
    num_blocks = len(runner.blocks.modules)
    space = UnitSpace(unit, num_blocks)
    size = None
    if unit != "block":
        branches = runner.prepare(calib[:1])  # refuses a family whose branches cannot be skipped exactly, first
        if options.unit_score == "per-parameter":
            from .sizes import Sizer

            size = Sizer.of(model, calib.shape[1], branches).block_params
    if racing is not None:
        check_racing(racing)
    result = SearchResult.for_windows(calib, num_blocks, options, "sleb", unit=unit)
    if racing is not None:
        result.racing = asdict(racing)
    path = Path(checkpoint) if checkpoint is not None else None
    identity = _checkpoint_identity(model, result) if path is not None else {}
    if identity and options.unit_score != "loss":
        identity["settings"]["unit_score"] = options.unit_score
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
    bar = tqdm(
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
                if size is None:
                    best = min(cands, key=lambda c: (scores[c], c))
                else:
                    base = result.dense_loss if not result.steps else result.steps[-1].scores[result.removed[-1]]
                    best = min(cands, key=lambda c: (per_parameter(scores[c] - base, size[c]), c))
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

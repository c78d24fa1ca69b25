"""The SLEB search: remove blocks greedily, re-measuring the calibration loss after each removal.

At each step every alive block except the first `early_barrier` and last `latter_barrier` alive
ones is a candidate. A candidate's score is the sum over calibration windows of the mean
next-token cross-entropy of the current model with that block skipped (the paper's Metric3).
The lowest score is removed (ties go to the lowest block index), and the search repeats until
`num_remove` blocks are gone (`sleb.greedy`); other criteria rank the blocks in one pass
(`sleb.criteria`). The search never edits the model: it returns the order, and
`sleb.remove_blocks` applies it.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from typing import Callable

import torch

from .arch import find_blocks
from .criteria import check_unit_support, get_criterion
from .errors import BadInput
# The step-wise search's own parts, public here as before: the checkpoint identity, set losses, the ranks.
from .greedy import (CHECKPOINT_FORMAT, check_checkpoint, checkpoint_settings, greedy_sleb, per_cost, per_parameter,
                     set_losses)
from .sizes import Sizer
from .result import SearchResult
from .settings import Racing, SearchOptions
from .units import unit_kind

__all__ = ["search", "greedy_sleb", "set_losses", "per_parameter", "per_cost", "check_checkpoint", "checkpoint_settings",
           "CHECKPOINT_FORMAT"]


@torch.no_grad()
def search(
    model,
    calib: torch.Tensor,
    num_remove: int,
    *,
    metric: str = "sleb",
    options: SearchOptions | None = None,
    racing: bool | Racing | None = None,
    checkpoint: str | os.PathLike | None = None,
    cache_bytes: int | None = None,
    progress: bool = True,
    stop_when: Callable[[SearchResult], bool] | None = None,
    on_status: Callable[[str], None] | None = None,
    costs: Sizer | None = None,
    **settings,
) -> SearchResult:
    """Find which blocks to remove with SLEB (the paper's Metric3), greedily, one per step.

    Args:
        model: a Hugging Face causal LM (any device, dtype or device_map); it is not modified.
        calib: LongTensor [nsamples, seqlen] of calibration windows (see `sleb.calibration`).
        num_remove: how many blocks to remove.
        metric: the redundancy criterion, a name or alias in `sleb.criteria.CRITERIA`: `sleb`
            (Metric3, the default), `ppl-oneshot` (Metric2), `cosine` (Metric1, alias
            `block-influence`: ShortGPT's BI), `angular`, `last` or `random`.
        options: the settings every criterion shares (`sleb.SearchOptions`, whose fields hold the
            defaults); any of its fields may also be given as a keyword (below), which overrides it.
        settings: fields of `SearchOptions` (batch_size, early_barrier, latter_barrier, seed,
            angular_tokens, unit, unit_score) and, with `racing=True`, of `sleb.Racing` (confidence,
            tolerance, min_windows, guesses), described here:
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
            for blocks), `per-parameter` (the lowest loss increase per parameter removed; ties to the
            lowest id; a unit whose removal lowers the loss ranks by that decrease times its size) or
            `per-second` (the same per unit of cost saved in the cost model: FLOPs per token at the
            windows' length, or with `speed_at` measured seconds; a unit whose sibling is gone also
            saves its block's rest). Exact search only.
        speed_at: `prefill:N` or `generation:N`: the measured cost model of `per-second` (`sleb.timing`).
        costs: the cost model `per-second` divides by (a `sleb.sizes.Sizer`, e.g. from
            `sleb.timing.cost_model`); None: made from `speed_at` (timed now) or the FLOP ideal.

    `checkpoint`, `cache_bytes`, `stop_when` and `racing` belong to step-wise criteria; a one-shot
    criterion refuses them rather than ignore them.

    Returns:
        SearchResult with the removal order, every step's candidate scores and timings.
    """
    criterion = get_criterion(metric)
    options, racing = _settings(options, racing, settings)
    unit, unit_score = options.unit, options.unit_score
    early_barrier, latter_barrier = options.early_barrier, options.latter_barrier
    num_blocks = len(find_blocks(model).modules)
    kind = unit_kind(unit)
    space = kind.space(num_blocks)
    max_remove = space.max_remove(options)
    if not 1 <= num_remove <= max_remove:
        raise BadInput(
            f"cannot remove {num_remove} {kind.noun}s: the model has {space.size_phrase()} and {max_remove} of them "
            f"are candidates (barriers: first {early_barrier}, last {latter_barrier})"
        )
    if unit_score != "loss" and racing:
        raise BadInput(f"racing races the calibration loss; unit_score {unit_score} runs the exact search")
    check_unit_support(criterion.name, unit, unit_score, flag="metric")
    if calib.dim() != 2 or calib.numel() == 0:
        raise BadInput(f"calibration windows must be a [nsamples, seqlen] tensor, got shape {tuple(calib.shape)}")
    hooks = {"checkpoint": checkpoint, "cache_bytes": cache_bytes, "stop_when": stop_when, "racing": racing,
             "costs": costs}
    if criterion.stepwise:
        return criterion.run(model, calib, num_remove, options, progress=progress, on_status=on_status, **hooks)
    given = [name for name, value in hooks.items() if value is not None]
    if given:
        raise BadInput(f"only step-wise criteria (sleb) take {' and '.join(given)}; {criterion.name} ranks the blocks "
                       "in one pass")
    return criterion.run(model, calib, num_remove, options, progress=progress)


_OPTION_FIELDS = {f.name for f in fields(SearchOptions)}
_RACING_FIELDS = {f.name for f in fields(Racing)}


def _settings(options: SearchOptions | None, racing: bool | Racing | None,
              settings: dict) -> tuple[SearchOptions, Racing | None]:
    """The typed settings of a search: `options` (or the defaults) with keyword overrides, and the racing
    statistics (`racing=True` takes the defaults and any racing keywords; a `Racing` is used as it is)."""
    unknown = sorted(set(settings) - _OPTION_FIELDS - _RACING_FIELDS)
    if unknown:
        raise TypeError(f"search() got unexpected keyword arguments: {', '.join(unknown)}")
    options = replace(options or SearchOptions(), **{k: v for k, v in settings.items() if k in _OPTION_FIELDS})
    statistics = {k: v for k, v in settings.items() if k in _RACING_FIELDS}
    if statistics and racing is not True:
        raise BadInput(f"{', '.join(sorted(statistics))} set racing's statistics: give racing=True with them "
                       "(or set them in the Racing given as racing)")
    if racing is True:
        racing = Racing(**statistics)
    return options, racing or None

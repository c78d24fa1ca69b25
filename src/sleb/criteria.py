"""The registry of redundancy criteria, every one registered here, and the one-shot criteria.

Each criterion registers its name, aliases, a one-line summary (the CLI help is made from them)
and whether it works step by step: step-wise criteria re-measure after every removal and support
checkpoints, early stopping, the state cache and beam search; one-shot criteria rank the blocks in
one pass over the windows.

* ``sleb`` (SLEB's Metric3, the paper's method): the greedy search of `sleb.search`, which imports
  this module, so its entry here imports `sleb.search.greedy_sleb` when it first runs.

* ``ppl-oneshot`` (SLEB's Metric2): the calibration loss of the *dense* model with one block
  skipped, measured once; blocks are removed in ascending order of that loss.
* ``cosine`` (SLEB's Metric1; ShortGPT's Block Influence, alias ``block-influence``): a block's
  score is 1 - the mean cosine similarity between the hidden state entering and leaving it, over
  every token of every window; blocks are removed in ascending order of that score.
* ``angular`` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): to remove
  n blocks, the contiguous window of n candidate blocks whose input and output hidden states are
  closest in angular distance arccos(cos) / pi, averaged over windows on the last token (default)
  or over all tokens. The windows for different n are not nested, so the report records the set
  for every count (`SearchResult.sets_by_count`).
* ``contiguous-cosine`` (ReplaceMe's choice, Shopkhoev et al. 2025): to remove n blocks, the
  contiguous window of n candidate blocks whose input and output hidden states have the smallest
  mean cosine distance 1 - cos over all tokens. Not nested either (`sets_by_count`).
  It is the choice ReplaceMe makes before fitting its linear map (`sleb compare --compensate`).
* ``last``: the n candidate blocks just before the final (barrier) block(s).
* ``random``: a seeded random permutation of the candidate blocks.

With branch units (`SearchOptions.unit`, `sleb.units`), ppl-oneshot, cosine, last and random rank
attention and MLP branches the same way (a branch's input and output are the residual stream
before and after its add); the contiguous-window criteria rank whole blocks only (`units=False`).

Hidden states are compared where they enter and leave blocks, before any final norm. The
hidden-state criteria share one pass over the calibration windows: per window batch, the states at
every block boundary are kept (linear in tokens) and every pair of boundaries is compared token by
token, so no tokens x tokens matrix is ever formed.

Every criterion returns a `SearchResult` of the same shape as SLEB's: the removal order (for
nested criteria, the first k entries are the set for k blocks), a step record per removal with the
criterion's scores of the candidates still alive, and the calibration loss of the set picked for
every count (``count_losses``), measured with the core's prefix-tree scorer.
"""

from __future__ import annotations

import difflib
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BadInput
from .greedy import greedy_sleb
from .settings import SearchOptions
from .result import SearchResult, StepRecord
from .scoring import boundary_stats, check_finite_dense, variant_losses
from .units import UnitSpace, unit_kind, unit_runner


@dataclass(frozen=True)
class Criterion:
    """A way of choosing blocks. `run(model, calib, num_remove, options, **hooks)` returns a SearchResult;
    step-wise criteria also take the hooks `checkpoint`, `cache_bytes`, `stop_when`, `on_status`, `progress`."""

    name: str
    summary: str
    run: Callable[..., SearchResult]
    aliases: tuple[str, ...] = ()
    stepwise: bool = False
    units: bool = True  # ranks branch units too (`sleb.units`); contiguous-window criteria rank whole blocks


CRITERIA: dict[str, Criterion] = {}
_ALIASES: dict[str, str] = {}


def register(criterion: Criterion) -> Criterion:
    for name in (criterion.name, *criterion.aliases):
        if name in _ALIASES and _ALIASES[name] != criterion.name:
            raise ValueError(f"criterion name {name!r} is taken by {_ALIASES[name]!r}")
        _ALIASES[name] = criterion.name
    CRITERIA[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    """The criterion for a name or alias (case-insensitive); unknown names raise BadInput with suggestions."""
    key = name.lower() if isinstance(name, str) else name
    if key in _ALIASES:
        return CRITERIA[_ALIASES[key]]
    close = difflib.get_close_matches(str(key), list(_ALIASES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise BadInput(f"unknown metric {name!r}; {hint}available: {describe_criteria()}")


def canonical_metric(name: str) -> str:
    return get_criterion(name).name


def check_unit_support(metric: str, unit: str, unit_score: str, flag: str = "--metric") -> None:
    """Refuse, in one line, a criterion that cannot rank `unit` units, or a `unit_score` other than loss with a
    criterion that has no step scores to divide (`flag`: the option that named the criterion)."""
    criterion = get_criterion(metric)
    unit_kind(unit).check_criterion(metric, criterion.units, flag)
    if unit_score != "loss" and not criterion.stepwise:
        raise BadInput(f"--unit-score {unit_score} ranks sleb's step scores; {flag} {metric} ranks units by its own "
                       "score")


def describe_criteria() -> str:
    """One line per criterion for help texts: `name (aliases): summary`, step-wise criteria first."""
    ordered = sorted(CRITERIA.values(), key=lambda c: not c.stepwise)
    return "; ".join(f"{c.name}{' (' + ', '.join(c.aliases) + ')' if c.aliases else ''}: {c.summary}" for c in ordered)


def _ranked(scores: dict[int, float]) -> list[int]:
    return sorted(scores, key=lambda b: (scores[b], b))


def angular_windows(
    distances: torch.Tensor, num_blocks: int, max_count: int, early_barrier: int, latter_barrier: int
) -> tuple[dict[int, list[int]], dict[int, dict[int, float]]]:
    """For each n in 1..max_count, the contiguous candidate window with the smallest distance.

    Returns (sets_by_count, scores_by_count): the chosen blocks for each n, and each valid window
    start's distance for each n (ties go to the lowest start).
    """
    sets: dict[int, list[int]] = {}
    scores: dict[int, dict[int, float]] = {}
    for n in range(1, max_count + 1):
        starts = range(early_barrier, num_blocks - latter_barrier - n + 1)
        scores[n] = {s: float(distances[s, s + n]) for s in starts}
        best = min(scores[n], key=lambda s: (scores[n][s], s))
        sets[n] = list(range(best, best + n))
    return sets, scores


@dataclass
class Ranking:
    """What a one-shot criterion computes: the order (or the set per count) and its scores per step."""

    order: list[int]
    step_scores: list[dict[int, float]]
    step_removed: list[int]
    info: dict
    sets_by_count: dict[int, list[int]] | None = None


def _nested(scores: dict[int, float], order: list[int], num_remove: int, info: dict) -> Ranking:
    """A ranking whose set for k blocks is the first k of `order` (scores of the blocks still alive per step)."""
    order = order[:num_remove]
    steps = [{b: v for b, v in scores.items() if b not in set(order[:k])} for k in range(num_remove)]
    return Ranking(order, steps, order, info)


def _cosine(runner, calib, cands, num_remove, options) -> Ranking:
    stats = boundary_stats(runner, calib, options.batch_size)
    scores = {b: 1.0 - float(stats.cos_all[b, b + 1]) for b in cands}
    return _nested(scores, _ranked(scores), num_remove, {
        "score": "1 - mean cosine(block input, block output) over all tokens (lower goes first)",
        "scores": {str(b): v for b, v in scores.items()}})


def _contiguous(distances: torch.Tensor, num_blocks: int, num_remove: int, options: SearchOptions,
                info: dict) -> Ranking:
    """The ranking of a contiguous-window criterion from its boundary distances (one set per count)."""
    sets, window_scores = angular_windows(distances, num_blocks, num_remove, options.early_barrier,
                                          options.latter_barrier)
    info = {**info, "scores_by_count": {str(n): {str(s): v for s, v in sc.items()} for n, sc in window_scores.items()},
            "steps": "each step's scores are window starts for that many blocks; 'removed' is the start chosen"}
    return Ranking(sets[num_remove], [dict(window_scores[k + 1]) for k in range(num_remove)],
                   [sets[k + 1][0] for k in range(num_remove)], info, sets_by_count=sets)


def _angular(runner, calib, cands, num_remove, options) -> Ranking:
    stats = boundary_stats(runner, calib, options.batch_size)
    distances = stats.angular_last if options.angular_tokens == "last" else stats.angular_all
    return _contiguous(distances, len(runner.blocks.modules), num_remove, options, {
        "score": f"arccos(cos(window input, window output)) / pi on {options.angular_tokens} token(s); "
                 "the window with the smallest distance is removed",
        "tokens": options.angular_tokens})


def _contiguous_cosine(runner, calib, cands, num_remove, options) -> Ranking:
    stats = boundary_stats(runner, calib, options.batch_size)
    return _contiguous(1.0 - stats.cos_all, len(runner.blocks.modules), num_remove, options, {
        "score": "1 - mean cosine(window input, window output) over all tokens; the window with the smallest "
                 "distance is removed (ReplaceMe's choice)"})


def _ppl_oneshot(runner, calib, cands, num_remove, options) -> Ranking:
    alive = list(range(runner.num_units))
    losses = variant_losses(runner, calib, [[b for b in alive if b != c] for c in cands], batch_size=options.batch_size)
    scores = {c: float(losses[i]) for i, c in enumerate(cands)}
    return _nested(scores, _ranked(scores), num_remove, {
        "score": "calibration loss of the dense model with the block skipped (lower goes first)",
        "scores": {str(b): v for b, v in scores.items()}})


def _last(runner, calib, cands, num_remove, options) -> Ranking:
    return _nested({b: float(-b) for b in cands}, list(reversed(cands)), num_remove,
                   {"score": "minus the block index: the blocks just before the final block go first"})


def _random(runner, calib, cands, num_remove, options) -> Ranking:
    order = random.Random(options.seed).sample(cands, len(cands))
    return _nested({b: float(order.index(b)) for b in cands}, order, num_remove,
                   {"score": "position in a seeded random permutation", "seed": options.seed})


def one_shot(rank: Callable[..., Ranking], name: str):
    """Wrap a ranking function as a criterion run: dense check, ranking, and the loss of every count's set."""

    @torch.no_grad()
    def run(model, calib: torch.Tensor, num_remove: int, options: SearchOptions, progress: bool = True) -> SearchResult:
        started = time.perf_counter()
        runner = unit_runner(model, options.unit)
        num_blocks = len(runner.blocks.modules)
        everything = list(range(runner.num_units))
        dense = float(variant_losses(runner, calib, [everything], batch_size=options.batch_size)[0])
        check_finite_dense(runner, calib, dense)
        cands = UnitSpace(options.unit, num_blocks).candidates(everything, options)
        ranking = rank(runner, calib, cands, num_remove, options)
        # The calibration loss of the set picked for every count, scored by the prefix-tree runner.
        chosen = [ranking.sets_by_count[k] if ranking.sets_by_count else ranking.order[:k]
                  for k in range(1, num_remove + 1)]
        variants = [[b for b in everything if b not in set(s)] for s in chosen]
        count_losses = [dense] + [float(v) for v in variant_losses(runner, calib, variants,
                                                                   batch_size=options.batch_size)]
        seconds = time.perf_counter() - started
        annotations: dict = {"criterion": {"name": name, **ranking.info}}
        if ranking.sets_by_count is not None:
            annotations["sets_by_count"] = {str(k): v for k, v in ranking.sets_by_count.items()}
        steps = [StepRecord(k, ranking.step_removed[k], ranking.step_scores[k], seconds / num_remove)
                 for k in range(num_remove)]
        return SearchResult.for_windows(calib, num_blocks, options, name, removed=list(ranking.order), steps=steps,
                                        dense_loss=dense, seconds=seconds, count_losses=count_losses,
                                        unit=options.unit, **annotations)

    return run


register(Criterion("ppl-oneshot", "SLEB's Metric2, the loss with the block skipped, measured once on the dense model",
                   one_shot(_ppl_oneshot, "ppl-oneshot"), aliases=("metric2",)))
register(Criterion("cosine", "SLEB's Metric1 = ShortGPT's Block Influence, 1 - cos(block input, output)",
                   one_shot(_cosine, "cosine"), aliases=("block-influence", "bi", "metric1")))
register(Criterion("angular", "Gromov et al.: the contiguous window whose input and output are closest in angle",
                   one_shot(_angular, "angular"), units=False))
register(Criterion("contiguous-cosine", "ReplaceMe's choice: the contiguous window with the smallest 1 - cos(input, output)",
                   one_shot(_contiguous_cosine, "contiguous-cosine"), aliases=("replaceme",), units=False))
register(Criterion("last", "the blocks just before the final one", one_shot(_last, "last")))
register(Criterion("random", "a seeded random choice (seeded by --seed)", one_shot(_random, "random")))


register(Criterion("sleb", "SLEB's Metric3, re-measured after every removal (the paper's method)", greedy_sleb,
                   aliases=("metric3",), stepwise=True))

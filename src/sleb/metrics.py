"""Redundancy criteria besides SLEB's own, run the same way on the same calibration windows.

* ``ppl-oneshot`` (SLEB's Metric2): the calibration loss of the *dense* model with one block
  skipped, measured once; blocks are removed in ascending order of that loss.
* ``cosine`` (SLEB's Metric1; ShortGPT's Block Influence, alias ``block-influence``): a block's
  score is 1 - the mean cosine similarity between the hidden state entering and leaving it, over
  every token of every window; blocks are removed in ascending order of that score.
* ``angular`` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): to remove
  n blocks, the contiguous window of n candidate blocks whose input and output hidden states are
  closest in angular distance arccos(cos) / pi, averaged over windows on the last token (default)
  or over all tokens. The windows for different n are not nested, so the report records the set
  for every count (``extra["sets_by_count"]``).
* ``last``: the n candidate blocks just before the final (barrier) block(s).
* ``random``: a seeded random permutation of the candidate blocks.

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

import dataclasses

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arch import BlockRunner, find_blocks
from .data import token_sha256
from .errors import SlebError
from .scoring import variant_losses, window_batches
from .search import METRICS, SearchResult, StepRecord, canonical_metric

ONE_SHOT = tuple(m for m in METRICS if m != "sleb")
ANGULAR_TOKENS = ("last", "all")


@dataclass
class BoundaryStats:
    """What one pass over the calibration windows records about the hidden states at block boundaries.

    Boundary b is the hidden state entering block b (boundary L leaves the last block, before the
    final norm). Each matrix is [L + 1, L + 1], entry (i, j) for i < j compares boundaries i and j,
    averaged over windows.
    """

    cos_all: torch.Tensor  # mean over all tokens of cos(h_i, h_j)
    angular_all: torch.Tensor  # mean over all tokens of arccos(cos(h_i, h_j)) / pi
    angular_last: torch.Tensor  # arccos(cos(h_i, h_j)) / pi on each window's last token
    windows: int


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@torch.no_grad()
def boundary_stats(runner: BlockRunner, windows: torch.Tensor, batch_size: int = 1) -> BoundaryStats:
    """One pass of the dense model over `windows`, comparing every pair of block boundaries."""
    num_blocks = len(runner.blocks.modules)
    size = num_blocks + 1
    cos_all = torch.zeros(size, size, dtype=torch.float64)
    ang_all = torch.zeros(size, size, dtype=torch.float64)
    ang_last = torch.zeros(size, size, dtype=torch.float64)
    count = 0
    for batch in window_batches(windows, batch_size):
        hidden = runner.embed(batch)
        states = [hidden.float().cpu()]
        for b in range(num_blocks):
            hidden = runner.block(b, hidden, batch)
            current = hidden.float().cpu()
            for i, earlier in enumerate(states):
                cos = F.cosine_similarity(earlier, current, dim=-1).double()  # [batch, tokens]
                cos_all[i, b + 1] += cos.mean(dim=1).sum()
                ang_all[i, b + 1] += _angle(cos).mean(dim=1).sum()
                ang_last[i, b + 1] += _angle(cos[:, -1]).sum()
            states.append(current)
        count += batch.shape[0]
        del states, hidden
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        packed = torch.stack([cos_all, ang_all, ang_last]).to(runner.model.get_input_embeddings().weight.device)
        torch.distributed.all_reduce(packed)
        cos_all, ang_all, ang_last = packed.cpu()
        total = torch.tensor([count], device=packed.device)
        torch.distributed.all_reduce(total)
        count = int(total.item())
    return BoundaryStats(cos_all / count, ang_all / count, ang_last / count, count)


def candidate_blocks(num_blocks: int, early_barrier: int, latter_barrier: int) -> list[int]:
    """Blocks a criterion may remove: all but the first `early_barrier` and last `latter_barrier`."""
    return list(range(early_barrier, num_blocks - latter_barrier))


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


def criterion_search(
    model,
    calib: torch.Tensor,
    num_remove: int,
    *,
    metric: str,
    batch_size: int = 1,
    early_barrier: int = 1,
    latter_barrier: int = 1,
    seed: int = 0,
    angular_tokens: str = "last",
    progress: bool = True,
) -> SearchResult:
    """Run a one-shot criterion and return its removal order in SLEB's report shape.

    `sleb.search(..., metric=M)` calls this for every M except `sleb`; prefer that entry point.
    """
    metric = canonical_metric(metric)
    if metric not in ONE_SHOT:
        raise SlebError(f"{metric!r} is not a one-shot criterion; use sleb.search")
    if angular_tokens not in ANGULAR_TOKENS:
        raise SlebError(f"angular_tokens must be one of {', '.join(ANGULAR_TOKENS)}, got {angular_tokens!r}")
    started = time.perf_counter()
    runner = BlockRunner(model)
    num_blocks = len(find_blocks(model).modules)
    cands = candidate_blocks(num_blocks, early_barrier, latter_barrier)
    if not 1 <= num_remove <= len(cands):
        raise SlebError(f"cannot remove {num_remove} blocks: {len(cands)} of {num_blocks} blocks are candidates")

    criterion: dict = {"name": metric}
    sets_by_count: dict[int, list[int]] | None = None
    step_scores: list[dict[int, float]]
    dense_loss: float | None = None
    if metric in ("cosine", "angular"):
        stats = boundary_stats(runner, calib, batch_size)
        if metric == "cosine":
            scores = {b: 1.0 - float(stats.cos_all[b, b + 1]) for b in cands}
            order = _ranked(scores)
            criterion.update(score="1 - mean cosine(block input, block output) over all tokens (lower goes first)",
                             scores={str(b): v for b, v in scores.items()})
        else:
            distances = stats.angular_last if angular_tokens == "last" else stats.angular_all
            sets_by_count, window_scores = angular_windows(
                distances, num_blocks, num_remove, early_barrier, latter_barrier
            )
            order = sets_by_count[num_remove]
            criterion.update(
                score=f"arccos(cos(window input, window output)) / pi on {angular_tokens} token(s); "
                "the window with the smallest distance is removed",
                tokens=angular_tokens,
                scores_by_count={str(n): {str(s): v for s, v in sc.items()} for n, sc in window_scores.items()},
            )
    elif metric == "ppl-oneshot":
        alive = list(range(num_blocks))
        variants = [[b for b in alive if b != c] for c in cands] + [alive]
        losses = variant_losses(runner, calib, variants, batch_size=batch_size)
        scores = {c: float(losses[i]) for i, c in enumerate(cands)}
        dense_loss = float(losses[-1])
        order = _ranked(scores)
        criterion.update(score="calibration loss of the dense model with the block skipped (lower goes first)",
                         scores={str(b): v for b, v in scores.items()})
    elif metric == "last":
        order = list(reversed(cands))
        scores = {b: float(-b) for b in cands}
        criterion.update(score="minus the block index: the blocks just before the final block go first")
    else:  # random
        order = random.Random(seed).sample(cands, len(cands))
        scores = {b: float(order.index(b)) for b in cands}
        criterion.update(score="position in a seeded random permutation", seed=seed)

    if metric != "angular":
        order = order[:num_remove]
        step_scores = [{b: scores[b] for b in cands if b not in set(order[:k])} for k in range(num_remove)]
        step_removed = order
    else:
        step_scores = [{s: v for s, v in window_scores[k + 1].items()} for k in range(num_remove)]
        step_removed = [sets_by_count[k + 1][0] for k in range(num_remove)]
        criterion["steps"] = "each step's scores are window starts for that many blocks; 'removed' is the start chosen"

    # The calibration loss of the set picked for every count, scored by the prefix-tree runner.
    chosen = [sets_by_count[k] if sets_by_count else order[:k] for k in range(1, num_remove + 1)]
    variants = [list(range(num_blocks))] + [[b for b in range(num_blocks) if b not in set(s)] for s in chosen]
    if dense_loss is not None:  # already measured in the same pass
        variants = variants[1:]
    losses = [float(v) for v in variant_losses(runner, calib, variants, batch_size=batch_size)]
    count_losses = ([dense_loss] if dense_loss is not None else []) + losses

    seconds = time.perf_counter() - started
    extra: dict = {"criterion": criterion}
    if sets_by_count is not None:
        extra["sets_by_count"] = {str(k): v for k, v in sets_by_count.items()}
    return SearchResult(
        removed=list(order),
        num_blocks=num_blocks,
        steps=[StepRecord(k, step_removed[k], step_scores[k], seconds / num_remove) for k in range(num_remove)],
        dense_loss=count_losses[0],
        nsamples=calib.shape[0],
        seqlen=calib.shape[1],
        calibration_sha256=token_sha256(calib),
        metric=metric,
        early_barrier=early_barrier,
        latter_barrier=latter_barrier,
        seconds=seconds,
        extra=extra,
        count_losses=count_losses,
    )


def removal_set(result: SearchResult, count: int) -> list[int]:
    """The blocks a search picked for `count` removals (the order's prefix unless recorded per count)."""
    if not 0 <= count <= len(result.removed):
        raise SlebError(f"the search recorded {len(result.removed)} removals; cannot apply {count}")
    by_count = result.extra.get("sets_by_count") or {}
    if str(count) in by_count:
        return list(by_count[str(count)])
    return list(result.removed[:count])


def truncate(result: SearchResult, count: int) -> SearchResult:
    """The result as it stands after `count` removals (the set, steps and losses up to that count)."""
    chosen = removal_set(result, count)
    extra = dict(result.extra)
    if "sets_by_count" in extra:
        extra["sets_by_count"] = {k: v for k, v in extra["sets_by_count"].items() if int(k) <= count}
    if count < len(result.removed):
        extra["truncated_from"] = len(result.removed)
    return dataclasses.replace(
        result,
        removed=chosen,
        steps=result.steps[:count],
        extra=extra,
        count_losses=result.count_losses[: count + 1] if result.count_losses else [],
    )


def count_loss(result: SearchResult, count: int) -> float:
    """Calibration loss (sum over windows of mean CE) of the set picked for `count` removals."""
    if result.count_losses:
        return result.count_losses[count]
    return result.dense_loss if count == 0 else result.steps[count - 1].scores[result.removed[count - 1]]

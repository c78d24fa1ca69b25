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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .arch import BlockRunner, find_blocks, input_device
from .data import token_sha256
from .errors import SlebError
from .scoring import StateCache, default_cache_budget, distributed_shard, variant_losses, window_batches

# The redundancy criteria `search` accepts; all but `sleb` are implemented in `sleb.metrics`.
METRICS = ("sleb", "ppl-oneshot", "cosine", "angular", "last", "random")
# Other names accepted for a criterion (ShortGPT's Block Influence is SLEB's Metric1).
METRIC_ALIASES = {"block-influence": "cosine", "bi": "cosine", "metric1": "cosine", "metric2": "ppl-oneshot",
                  "metric3": "sleb"}


def canonical_metric(metric: str) -> str:
    """The registry name of a criterion (aliases resolved); unknown names raise SlebError."""
    name = METRIC_ALIASES.get(metric.lower(), metric.lower()) if isinstance(metric, str) else metric
    if name not in METRICS:
        known = ", ".join(METRICS) + " (aliases: " + ", ".join(f"{a}={b}" for a, b in METRIC_ALIASES.items()) + ")"
        raise SlebError(f"unknown metric {metric!r}; available: {known}")
    return name


@dataclass
class StepRecord:
    """One greedy step: every candidate's score (keyed by original block index) and the pick.

    A racing step (see `sleb.racing`) scores some candidates on fewer windows: `windows` then
    says how many each got, and `kinds` whether its score is `complete`, a `lower-bound` (the
    partial sum of a candidate cut because it could no longer win) or an `estimate` (the mean
    over its windows times the window count, for one the sequential test dropped). Empty
    `windows`/`kinds` and `confidence` None: an exact step, every score complete.
    """

    step: int
    removed: int
    scores: dict[int, float]
    seconds: float
    windows: dict[int, int] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)
    confidence: float | None = None


@dataclass
class SearchResult:
    """What a search found. Block indices are those of the model the search was given."""

    removed: list[int]
    num_blocks: int
    steps: list[StepRecord]
    dense_loss: float  # sum over windows of mean CE of the unpruned model
    nsamples: int
    seqlen: int
    calibration_sha256: str
    metric: str = "sleb"
    early_barrier: int = 1
    latter_barrier: int = 1
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # Calibration loss of the set the criterion picks for 0, 1, ... blocks. Empty for a plain SLEB
    # search, whose step scores already hold it (the chosen candidate's score).
    count_losses: list[float] = field(default_factory=list)

    @property
    def kept(self) -> list[int]:
        return [i for i in range(self.num_blocks) if i not in set(self.removed)]

    def calibration_ppl(self, num_removed: int | None = None) -> float:
        """Calibration perplexity after the first `num_removed` removals (all by default)."""
        k = len(self.removed) if num_removed is None else num_removed
        if self.count_losses:
            return math.exp(self.count_losses[k] / self.nsamples)
        loss = self.dense_loss if k == 0 else self.steps[k - 1].scores[self.removed[k - 1]]
        return math.exp(loss / self.nsamples)

    def to_dict(self) -> dict:
        data = asdict(self)
        for step in data["steps"]:
            for key in ("scores", "windows", "kinds"):
                step[key] = {str(k): v for k, v in step[key].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SearchResult":
        data = dict(data)
        data["steps"] = [
            StepRecord(s["step"], s["removed"], {int(k): v for k, v in s["scores"].items()}, s["seconds"],
                       {int(k): v for k, v in s.get("windows", {}).items()},
                       {int(k): v for k, v in s.get("kinds", {}).items()}, s.get("confidence"))
            for s in data["steps"]
        ]
        return cls(**data)


def candidates(alive: list[int], early_barrier: int, latter_barrier: int) -> list[int]:
    """Alive blocks that may be removed: all but the first `early` and last `latter` alive ones."""
    return alive[early_barrier : len(alive) - latter_barrier]


def _write_checkpoint(path: Path, result: SearchResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_dict()))
    os.replace(tmp, path)


def _resume(path: Path | None, fresh: SearchResult) -> SearchResult:
    """Continue from a checkpoint written by an identical search (same blocks and windows)."""
    if path is None or not path.is_file():
        return fresh
    saved = SearchResult.from_dict(json.loads(path.read_text()))
    same = (saved.num_blocks, saved.calibration_sha256, saved.metric, saved.early_barrier, saved.latter_barrier,
            saved.extra.get("racing")) == (
        fresh.num_blocks,
        fresh.calibration_sha256,
        fresh.metric,
        fresh.early_barrier,
        fresh.latter_barrier,
        fresh.extra.get("racing"),
    )
    if not same:
        raise SlebError(f"checkpoint {path} belongs to another search (model, windows or settings differ)")
    return saved


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
    racing: bool = False,
    confidence: float = 0.95,
    min_windows: int = 6,
) -> SearchResult:
    """Find which blocks to remove with SLEB (the paper's Metric3), greedily, one per step.

    Args:
        model: a Hugging Face causal LM (any device, dtype or device_map); it is not modified.
        calib: LongTensor [nsamples, seqlen] of calibration windows (see `sleb.calibration`).
        num_remove: how many blocks to remove.
        metric: the redundancy criterion: `sleb` (Metric3, the default), `ppl-oneshot` (Metric2),
            `cosine` (Metric1, alias `block-influence`: ShortGPT's BI), `angular`, `last` or
            `random`; see `sleb.metrics` for the one-shot criteria.
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
        racing: score windows batch by batch and stop scoring candidates that cannot win (the
            free exact cut) or that the sequential paired test finds worse than the leader with
            `confidence`; see `sleb.racing`. Each step records the windows every candidate got
            and which scores are complete. The removed block's score is always complete.
        confidence: racing's confidence per step that the best candidate is not dropped; 1.0
            keeps only the exact cut (the exact search's picks, fewer complete scores).
        min_windows: racing never drops a candidate on fewer windows than this.

    Returns:
        SearchResult with the removal order, every step's candidate scores and timings.
    """
    metric = canonical_metric(metric)
    num_blocks = len(find_blocks(model).modules)
    max_remove = num_blocks - early_barrier - latter_barrier
    if not 1 <= num_remove <= max_remove:
        raise SlebError(
            f"cannot remove {num_remove} blocks: the model has {num_blocks} blocks and {max_remove} of them "
            f"are candidates (barriers: first {early_barrier}, last {latter_barrier})"
        )
    if calib.dim() != 2 or calib.numel() == 0:
        raise SlebError(f"calibration windows must be a [nsamples, seqlen] tensor, got shape {tuple(calib.shape)}")
    if metric != "sleb":
        from .metrics import criterion_search

        return criterion_search(model, calib, num_remove, metric=metric, batch_size=batch_size,
                                early_barrier=early_barrier, latter_barrier=latter_barrier, seed=seed,
                                angular_tokens=angular_tokens, progress=progress)

    if racing:
        from .racing import check_racing

        check_racing(confidence, min_windows)
    runner = BlockRunner(model)
    if cache_bytes is None:
        cache_bytes = default_cache_budget(input_device(model))
    cache = StateCache(cache_bytes)
    result = SearchResult(
        removed=[],
        num_blocks=num_blocks,
        steps=[],
        dense_loss=float("nan"),
        nsamples=calib.shape[0],
        seqlen=calib.shape[1],
        calibration_sha256=token_sha256(calib),
        metric=metric,
        early_barrier=early_barrier,
        latter_barrier=latter_barrier,
    )
    if racing:
        result.extra["racing"] = {"confidence": confidence, "min_windows": min_windows}
    path = Path(checkpoint) if checkpoint is not None else None
    result = _resume(path, result)
    started = time.perf_counter() - result.seconds

    batches_here = len(window_batches(calib, batch_size))
    total = sum(
        len(candidates([b for b in range(num_blocks - s)], early_barrier, latter_barrier)) for s in range(num_remove)
    )
    done = sum(len(s.scores) for s in result.steps[:num_remove])
    bar = tqdm(
        total=total * batches_here,
        initial=done * batches_here,
        disable=not progress or distributed_shard()[0] != 0,
        desc="SLEB search",
        unit="cand",
        dynamic_ncols=True,
    )
    try:
        while len(result.removed) < num_remove:
            step_start = time.perf_counter()
            alive = [b for b in range(num_blocks) if b not in set(result.removed)]
            cands = candidates(alive, early_barrier, latter_barrier)
            variants = [[b for b in alive if b != c] for c in cands]
            need_dense = math.isnan(result.dense_loss)
            if need_dense:
                variants.append(alive)
            step = len(result.removed)
            bar.set_description(f"SLEB step {step + 1}/{num_remove}")

            def tick(index: int) -> None:
                if index < len(cands):
                    bar.update(1)
                    bar.set_postfix(block=cands[index], refresh=False)

            if racing:
                from .racing import race_step

                race = race_step(runner, calib, dict(zip(cands, variants)), always=variants[len(cands):],
                                 batch_size=batch_size, confidence=confidence, min_windows=min_windows, cache=cache,
                                 on_scored=lambda c: tick(cands.index(c)))
                bar.update(sum(batches_here - math.ceil(n / batch_size) for n in race.windows.values()))
                if need_dense:
                    result.dense_loss = race.always[0]
                best, record = race.best, StepRecord(step, race.best, race.scores, 0.0, race.windows, race.kinds,
                                                     confidence)
            else:
                losses = variant_losses(runner, calib, variants, batch_size=batch_size, on_variant=tick, cache=cache)
                if need_dense:
                    result.dense_loss = float(losses[-1])
                scores = {c: float(losses[i]) for i, c in enumerate(cands)}
                best = min(cands, key=lambda c: (scores[c], c))
                record = StepRecord(step, best, scores, 0.0)
            record.seconds = time.perf_counter() - step_start
            result.removed.append(best)
            result.steps.append(record)
            result.seconds = time.perf_counter() - started
            if path is not None and distributed_shard()[0] == 0:
                _write_checkpoint(path, result)
            if stop_when is not None and stop_when(result):
                break
    finally:
        bar.close()
    if len(result.removed) > num_remove:  # a checkpoint from a longer search: keep its prefix
        result.removed = result.removed[:num_remove]
        result.steps = result.steps[:num_remove]
    result.seconds = time.perf_counter() - started
    return result

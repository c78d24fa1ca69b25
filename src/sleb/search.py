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
from .errors import BadInput, CheckFailed, SlebError
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
    """One greedy step: every candidate's score (keyed by original block index) and the pick."""

    step: int
    removed: int
    scores: dict[int, float]
    seconds: float


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
            step["scores"] = {str(k): v for k, v in step["scores"].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SearchResult":
        data = dict(data)
        data["steps"] = [
            StepRecord(s["step"], s["removed"], {int(k): v for k, v in s["scores"].items()}, s["seconds"])
            for s in data["steps"]
        ]
        return cls(**data)


def candidates(alive: list[int], early_barrier: int, latter_barrier: int) -> list[int]:
    """Alive blocks that may be removed: all but the first `early` and last `latter` alive ones."""
    return alive[early_barrier : len(alive) - latter_barrier]


CHECKPOINT_FORMAT = "sleb-checkpoint/1"


def _checkpoint_identity(model, result: SearchResult) -> dict:
    """What must match for a checkpoint to be resumed: the model, the windows and every setting that
    changes the scores (batch size and cache do not: a resumed run may change them, e.g. after OOM)."""
    from .fingerprint import model_fingerprint

    return {
        "model": model_fingerprint(model),
        "settings": {"metric": result.metric, "early_barrier": result.early_barrier,
                     "latter_barrier": result.latter_barrier, "nsamples": result.nsamples, "seqlen": result.seqlen,
                     "calibration_sha256": result.calibration_sha256, "dtype": str(model.dtype)},
    }


def _write_checkpoint(path: Path, identity: dict, result: SearchResult) -> None:
    from .outputs import atomic_write_text

    atomic_write_text(path, json.dumps({"format": CHECKPOINT_FORMAT, **identity, "result": result.to_dict()}))


def _resume(path: Path | None, identity: dict, fresh: SearchResult) -> SearchResult:
    """Continue from a checkpoint written by an identical search; refuse anything else in one line."""
    from .fingerprint import same_model

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
                       "delete it to start the search over") from err
    if not same_model(saved.get("model") or {}, identity["model"]):
        raise BadInput(f"checkpoint {path} was written by a search of another model (its weights differ); "
                       "use another --checkpoint file")
    theirs, ours = saved.get("settings") or {}, identity["settings"]
    differ = [k for k in ours if theirs.get(k) != ours[k]]
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} there vs {ours[k]!r} now" for k in differ)
        raise BadInput(f"checkpoint {path} belongs to another search ({shown}); use another --checkpoint file")
    return result


def check_finite_dense(runner: BlockRunner, calib: torch.Tensor, loss: float) -> None:
    """Stop before searching when the dense model's calibration loss is NaN or infinite, naming the window."""
    if math.isfinite(loss):
        return
    bad = None
    for i in range(calib.shape[0]):
        window = calib[i : i + 1]
        hidden = runner.embed(window)
        for b in range(len(runner.blocks.modules)):
            hidden = runner.block(b, hidden, window)
        if not torch.isfinite(runner.window_losses(hidden, window)).all():
            bad = i
            break
    where = f"first at window {bad}" if bad is not None else "on this process's windows"
    raise CheckFailed(
        f"the dense model's calibration loss is {loss} ({where}): NaN or Inf weights, or overflow in "
        f"{str(runner.model.dtype).removeprefix('torch.')}; try --dtype float32 or bfloat16, or check the weights"
    )


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
        on_status: called with one-line notes for people (e.g. that a checkpoint is resumed).

    Returns:
        SearchResult with the removal order, every step's candidate scores and timings.
    """
    metric = canonical_metric(metric)
    if early_barrier < 0 or latter_barrier < 0:
        raise BadInput(f"barriers must be 0 or more, got early {early_barrier}, latter {latter_barrier}")
    num_blocks = len(find_blocks(model).modules)
    max_remove = num_blocks - early_barrier - latter_barrier
    if not 1 <= num_remove <= max_remove:
        raise SlebError(
            f"cannot remove {num_remove} blocks: the model has {num_blocks} blocks and {max_remove} of them "
            f"are candidates (barriers: first {early_barrier}, last {latter_barrier})"
        )
    if calib.dim() != 2 or calib.numel() == 0:
        raise SlebError(f"calibration windows must be a [nsamples, seqlen] tensor, got shape {tuple(calib.shape)}")
    runner = BlockRunner(model)
    if metric != "sleb":
        from .metrics import criterion_search

        check_finite_dense(runner, calib, float(variant_losses(runner, calib, [list(range(num_blocks))],
                                                               batch_size=batch_size)[0]))
        return criterion_search(model, calib, num_remove, metric=metric, batch_size=batch_size,
                                early_barrier=early_barrier, latter_barrier=latter_barrier, seed=seed,
                                angular_tokens=angular_tokens, progress=progress)

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
    path = Path(checkpoint) if checkpoint is not None else None
    identity = _checkpoint_identity(model, result) if path is not None else {}
    result = _resume(path, identity, result)
    if result.steps and on_status:
        on_status(f"resuming the search from {path}: {len(result.steps)} of {num_remove} steps already done")
    if cache_bytes is None:
        cache_bytes = default_cache_budget(input_device(model))
    cache = StateCache(cache_bytes)
    started = time.perf_counter() - result.seconds
    if math.isnan(result.dense_loss):
        # Measured before the first step (its hidden states fill the cache the first step reads) so
        # that a model with NaN weights stops here, not after a search over NaN scores.
        result.dense_loss = float(variant_losses(runner, calib, [list(range(num_blocks))], batch_size=batch_size,
                                                 cache=cache)[0])
    check_finite_dense(runner, calib, result.dense_loss)

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
            step = len(result.removed)
            bar.set_description(f"SLEB step {step + 1}/{num_remove}")

            def tick(index: int) -> None:
                if index < len(cands):
                    bar.update(1)
                    bar.set_postfix(block=cands[index], refresh=False)

            losses = variant_losses(runner, calib, variants, batch_size=batch_size, on_variant=tick, cache=cache)
            scores = {c: float(losses[i]) for i, c in enumerate(cands)}
            best = min(cands, key=lambda c: (scores[c], c))
            result.removed.append(best)
            result.steps.append(StepRecord(step, best, scores, time.perf_counter() - step_start))
            result.seconds = time.perf_counter() - started
            if path is not None and distributed_shard()[0] == 0:
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

"""What a search found, and the algebra on it: the one home of `SearchResult`.

A result holds the removal order (indices of the model the search was given), every step's
candidate scores, and the calibration loss of the set picked for each count. Criteria, budgets,
refinement, checkpoints and the run file all build, cut and serialize results with what is here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch

from .settings import SearchOptions
from .data import token_sha256
from .errors import SlebError
from .units import UnitSpace

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

    def to_dict(self) -> dict:
        data = {"step": self.step, "removed": self.removed, "seconds": self.seconds,
                "scores": {str(k): v for k, v in self.scores.items()}}
        if self.kinds:  # racing steps only: exact steps keep the plain shape
            data.update(windows={str(k): v for k, v in self.windows.items()},
                        kinds={str(k): v for k, v in self.kinds.items()}, confidence=self.confidence)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "StepRecord":
        return cls(int(data["step"]), int(data["removed"]), {int(k): float(v) for k, v in data["scores"].items()},
                   float(data.get("seconds", 0.0)), {int(k): int(v) for k, v in data.get("windows", {}).items()},
                   {int(k): v for k, v in data.get("kinds", {}).items()}, data.get("confidence"))


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
    # What `removed` counts (sleb.units): block indices, or branch ids (2i: block i's attention, 2i + 1: its MLP).
    unit: str = "block"
    early_barrier: int = 1
    latter_barrier: int = 1
    seconds: float = 0.0
    # Calibration loss of the set the criterion picks for 0, 1, ... blocks. Empty for a plain SLEB
    # search, whose step scores already hold it (the chosen candidate's score).
    count_losses: list[float] = field(default_factory=list)
    # What the criterion and the stages after it add (None: that stage did not run). Each is a
    # top-level entry of the run file under the same name (`sleb.runfile`).
    criterion: dict | None = None  # a one-shot criterion's name and ranking details (sleb.criteria)
    sets_by_count: dict[str, list[int]] | None = None  # the set per count, when sets are not nested
    racing: dict | None = None  # the racing settings of a raced search (sleb.settings.Racing)
    budget: dict | None = None  # which budget stopped the search, and why (sleb.budgets)
    speed: dict | None = None  # the measured cost model (--speed-at): the table, how measured (sleb.timing)
    refine: dict | None = None  # greedy vs refined set (sleb.refine)
    model_fingerprint: dict | None = None  # the searched model's weights (sleb.fingerprint)
    heldout_ppl: dict | None = None  # held-out perplexity, dense and pruned (sleb.pipeline)
    compensation: dict | None = None  # the fitted linear maps (sleb.compensate)
    compensation_aware: dict | None = None  # the compensated re-scoring (sleb.compensated_search)
    healing: dict | None = None  # what healing trained, on what, for how long, its loss curve (sleb.heal)
    distributed: dict | None = None  # world size, backend, what ranks agreed on (sleb.distributed)
    truncated_from: int | None = None  # the search's removal count, before a budget cut it
    from_report: dict | None = None  # the run file an applied order came from (sleb.runfile)

    @property
    def kept(self) -> list[int]:
        """Kept block indices (kept unit ids for a branch search)."""
        return UnitSpace(self.unit, self.num_blocks).kept(self.removed)

    def label(self, unit_id: int) -> str:
        """`12` for a block, `12.attn` / `12.mlp` for a branch unit (see `sleb.units`)."""
        return UnitSpace(self.unit, self.num_blocks).label(unit_id)

    def calibration_ppl(self, num_removed: int | None = None) -> float:
        """Calibration perplexity after the first `num_removed` removals (all by default)."""
        k = len(self.removed) if num_removed is None else num_removed
        if self.count_losses:
            return math.exp(self.count_losses[k] / self.nsamples)
        loss = self.dense_loss if k == 0 else self.steps[k - 1].scores[self.removed[k - 1]]
        return math.exp(loss / self.nsamples)

    @classmethod
    def for_windows(cls, calib: torch.Tensor, num_blocks: int, options: SearchOptions, metric: str,
                    **values) -> "SearchResult":
        """A result for a search over `calib` (window count, length and token hash filled in)."""
        values.setdefault("removed", [])
        values.setdefault("steps", [])
        values.setdefault("dense_loss", float("nan"))
        return cls(num_blocks=num_blocks, nsamples=calib.shape[0], seqlen=calib.shape[1],
                   calibration_sha256=token_sha256(calib), metric=metric, early_barrier=options.early_barrier,
                   latter_barrier=options.latter_barrier, **values)

    def annotations(self) -> dict:
        """The stage entries that are set (criterion, budget, refine, ...), by name."""
        return {name: getattr(self, name) for name in ANNOTATIONS if getattr(self, name) is not None}

    def to_dict(self) -> dict:
        """Plain JSON-able data: the one serializer of a result (checkpoints store it whole; the run file
        takes its fields from it, see `sleb.runfile`)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ANNOTATIONS}
        data["steps"] = [s.to_dict() for s in self.steps]
        data.update(self.annotations())
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SearchResult":
        data = dict(data)
        data["steps"] = [StepRecord.from_dict(s) for s in data["steps"]]
        data.update(data.pop("extra", None) or {})  # checkpoints of sleb 0.1 kept the annotations under "extra"
        return cls(**data)


ANNOTATIONS = ("criterion", "sets_by_count", "racing", "budget", "speed", "refine", "model_fingerprint", "heldout_ppl",
               "compensation", "compensation_aware", "healing", "distributed", "truncated_from", "from_report")


def removal_set(result: SearchResult, count: int) -> list[int]:
    """The blocks a search picked for `count` removals (the order's prefix unless recorded per count)."""
    if not 0 <= count <= len(result.removed):
        raise SlebError(f"the search recorded {len(result.removed)} removals; cannot apply {count}")
    by_count = result.sets_by_count or {}
    if str(count) in by_count:
        return list(by_count[str(count)])
    return list(result.removed[:count])


def truncate(result: SearchResult, count: int) -> SearchResult:
    """The result as it stands after `count` removals (the set, steps and losses up to that count)."""
    chosen = removal_set(result, count)
    return dataclasses.replace(
        result,
        removed=chosen,
        steps=result.steps[:count],
        sets_by_count=None if result.sets_by_count is None else
        {k: v for k, v in result.sets_by_count.items() if int(k) <= count},
        truncated_from=len(result.removed) if count < len(result.removed) else result.truncated_from,
        count_losses=result.count_losses[: count + 1] if result.count_losses else [],
    )


def count_loss(result: SearchResult, count: int) -> float:
    """Calibration loss (sum over windows of mean CE) of the set picked for `count` removals."""
    if result.count_losses:
        return result.count_losses[count]
    return result.dense_loss if count == 0 else result.steps[count - 1].scores[result.removed[count - 1]]

"""Budgets (how many blocks to remove, said the way a deployment thinks of it) and re-applying a search.

A budget is one *size target* -- `remove` N blocks, a `ratio` of the blocks (rounded up, as the
paper), `target_params` (a fraction of the dense parameters, or an absolute count when above 1) or
`target_speedup` (the ideal speedup of `sleb.flops`, the FLOP model `sleb bench` reports) -- and/or
a *ceiling*, `max_ppl_increase` X: stop before the calibration perplexity would exceed X times the
dense model's. The search removes blocks in its criterion's order until the size target is met,
or until the next removal would break the ceiling, whichever comes first; the report's
``budget`` entry says which budget stopped it and why.

`apply_report` re-applies the first N removals of an earlier search (its ``sleb_report.json``)
without searching again, after checking the report was made on the same model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .arch import LAYER_INDEX_ATTRIBUTES, find_blocks, per_layer_config_fields, text_config
from .errors import SlebError
from .flops import forward_flops_per_token
from .metrics import candidate_blocks, count_loss, removal_set, truncate
from .search import SearchResult, StepRecord, canonical_metric, search

SIZE_TARGETS = ("remove", "ratio", "target_params", "target_speedup")


@dataclass
class Budget:
    """How much to remove. Give one size target and/or `max_ppl_increase`."""

    remove: int | None = None
    ratio: float | None = None
    target_params: float | None = None  # fraction of the dense parameters (<= 1) or an absolute count
    target_speedup: float | None = None  # ideal (FLOP-model) speedup over the dense model
    max_ppl_increase: float | None = None  # ceiling on calibration ppl, as a multiple of the dense model's
    speedup_context: int = 2048  # context length at which the FLOP model counts attention

    def size_target(self) -> str | None:
        given = [name for name in SIZE_TARGETS if getattr(self, name) is not None]
        if len(given) > 1:
            raise SlebError(f"give at most one of --remove, --ratio, --target-params, --target-speedup (got {given})")
        return given[0] if given else None

    def validate(self) -> None:
        """Reject budgets no removal can meet, before any model work where possible."""
        target = self.size_target()
        if target is None and self.max_ppl_increase is None:
            raise SlebError("give a budget: --remove, --ratio, --target-params, --target-speedup or --max-ppl-increase")
        if self.remove is not None and self.remove < 1:
            raise SlebError(f"--remove must be at least 1, got {self.remove}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise SlebError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.target_params is not None and self.target_params <= 0:
            raise SlebError(f"--target-params must be positive (a fraction or a parameter count), got {self.target_params}")
        if self.target_speedup is not None and self.target_speedup <= 1:
            raise SlebError(f"--target-speedup must be above 1 (removing blocks cannot slow the model), got {self.target_speedup}")
        if self.max_ppl_increase is not None and self.max_ppl_increase <= 1:
            raise SlebError(
                f"--max-ppl-increase must be above 1: removing a block cannot be relied on to keep calibration "
                f"perplexity at or below {self.max_ppl_increase} x the dense model's"
            )


# -- model sizes ----------------------------------------------------------------------------------
def total_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def block_params(model) -> list[int]:
    return [sum(p.numel() for p in block.parameters()) for block in find_blocks(model).modules]


@contextlib.contextmanager
def pruned_view(model, removed: list[int]) -> Iterator:
    """Temporarily remove blocks in place (as `sleb.remove_blocks` does) and restore them after.

    Lets a pruned variant be evaluated or measured without copying the model.
    """
    from .export import remove_blocks

    blocks = find_blocks(model)
    original = blocks.modules
    cfg = text_config(model)
    saved_fields = {name: getattr(cfg, name) for name in per_layer_config_fields(cfg, len(original))}
    saved_layers = cfg.num_hidden_layers
    saved_indices = [
        (module, attr, getattr(module, attr))
        for block in original
        for module in block.modules()
        for attr in LAYER_INDEX_ATTRIBUTES
        if isinstance(getattr(module, attr, None), int)
    ]
    try:
        if removed:
            remove_blocks(model, list(removed))
        yield model
    finally:
        blocks.replace(original)
        cfg.num_hidden_layers = saved_layers
        for name, value in saved_fields.items():
            setattr(cfg, name, value)
        for module, attr, value in saved_indices:
            setattr(module, attr, value)


def flops_after(model, removed: list[int], context: int = 2048) -> float:
    """Forward FLOPs per token (sleb.flops) of the model with `removed` deleted."""
    with pruned_view(model, removed):
        return forward_flops_per_token(model, context)["total"]


@dataclass
class _Sizer:
    """Parameter count and ideal speedup of any removal set, from per-block savings (both additive)."""

    dense_params: int
    block_params: list[int]
    dense_flops: float
    block_flops: list[float]

    @classmethod
    def of(cls, model, context: int) -> "_Sizer":
        dense_flops = forward_flops_per_token(model, context)["total"]
        n = len(find_blocks(model).modules)
        saved = [dense_flops - flops_after(model, [b], context) for b in range(n)]
        return cls(total_params(model), block_params(model), dense_flops, saved)

    def params(self, removed) -> int:
        return self.dense_params - sum(self.block_params[b] for b in removed)

    def speedup(self, removed) -> float:
        return self.dense_flops / (self.dense_flops - sum(self.block_flops[b] for b in removed))


def _bounds(savings: list[float], total: float, limit: float) -> tuple[int, int] | None:
    """Fewest removals that can bring `total` to <= `limit` (removing the largest savings first) and
    fewest that surely do (removing the smallest first); None when even removing all cannot."""
    if total - sum(savings) > limit:
        return None
    ascending, descending = sorted(savings), sorted(savings, reverse=True)
    lo = next(k for k in range(len(savings) + 1) if total - sum(descending[:k]) <= limit)
    hi = next(k for k in range(len(savings) + 1) if total - sum(ascending[:k]) <= limit)
    return lo, hi


def _fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


# -- the budgeted search --------------------------------------------------------------------------
def model_fingerprint(model) -> dict:
    """A cheap identity of a model's blocks: their count, sizes and a checksum of each block's weights.

    The checksum (sum of |w| over the first 256 entries of every parameter) survives a change of
    dtype, so a report made in bfloat16 can be applied to the same model loaded in float32.
    """
    sums = []
    for block in find_blocks(model).modules:
        total = 0.0
        for p in block.parameters():
            total += p.detach().reshape(-1)[:256].double().abs().sum().item()
        sums.append(total)
    return {"blocks": len(sums), "block_params": block_params(model), "block_checksums": sums}


def same_fingerprint(a: dict, b: dict) -> bool:
    if a.get("blocks") != b.get("blocks") or a.get("block_params") != b.get("block_params"):
        return False
    x, y = torch.tensor(a["block_checksums"]), torch.tensor(b["block_checksums"])
    return bool(torch.allclose(x, y, rtol=1e-2, atol=1e-6))


def budgeted_search(
    model,
    calib: torch.Tensor,
    budget: Budget,
    *,
    metric: str = "sleb",
    refine: str | None = None,
    beam: int | None = None,
    refine_seconds: float | None = None,
    batch_size: int = 1,
    early_barrier: int = 1,
    latter_barrier: int = 1,
    seed: int = 0,
    angular_tokens: str = "last",
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    on_status: Callable[[str], None] | None = None,
    racing: bool = False,
    confidence: float = 0.95,
) -> SearchResult:
    """Search with a budget, then optionally improve the set (`beam` width, `refine="swap"`).

    Returns the result truncated to the count the budget allows, with ``extra["budget"]`` saying
    which budget stopped the search and why, and ``extra["refine"]`` comparing greedy with the
    refined set when one was asked for.
    """
    metric = canonical_metric(metric)
    budget.validate()
    target = budget.size_target()
    if refine not in (None, "swap"):
        raise SlebError(f"unknown refinement {refine!r}; available: swap")
    if beam is not None and beam < 1:
        raise SlebError(f"--beam must be at least 1, got {beam}")
    if beam is not None and metric != "sleb":
        raise SlebError(f"--beam searches SLEB's loss step by step; it does not apply to --metric {metric}")
    num_blocks = len(find_blocks(model).modules)
    cands = candidate_blocks(num_blocks, early_barrier, latter_barrier)
    if not cands:
        raise SlebError(f"no candidate blocks: {num_blocks} blocks, barriers first {early_barrier}, last {latter_barrier}")
    sizer = _Sizer.of(model, budget.speedup_context) if target in ("target_params", "target_speedup") else None

    # Count bounds for the size target.
    lo, hi = 1, len(cands)
    meets: Callable[[list[int]], bool] = lambda removed: True  # noqa: E731
    describe = ""
    if target == "remove" or target == "ratio":
        from .cli import blocks_for_ratio

        n = budget.remove if target == "remove" else blocks_for_ratio(budget.ratio, num_blocks)
        lo = hi = n
        describe = f"--remove {n}" if target == "remove" else f"--ratio {budget.ratio} of {num_blocks} blocks = {n}"
    elif target == "target_params":
        limit = budget.target_params * sizer.dense_params if budget.target_params <= 1 else budget.target_params
        bounds = _bounds([sizer.block_params[b] for b in cands], sizer.dense_params, limit)
        if bounds is None:
            raise SlebError(
                f"--target-params {budget.target_params} ({_fmt(limit)} parameters) cannot be met: removing every "
                f"candidate block still leaves {_fmt(sizer.params(cands))} of {_fmt(sizer.dense_params)}"
            )
        lo, hi = bounds
        if hi == 0:
            raise SlebError(f"the dense model ({_fmt(sizer.dense_params)} parameters) already meets --target-params; nothing to remove")
        meets = lambda removed: sizer.params(removed) <= limit  # noqa: E731
        describe = f"--target-params {budget.target_params} ({_fmt(limit)} of {_fmt(sizer.dense_params)} parameters)"
    elif target == "target_speedup":
        limit = sizer.dense_flops / budget.target_speedup
        bounds = _bounds([sizer.block_flops[b] for b in cands], sizer.dense_flops, limit)
        if bounds is None:
            raise SlebError(
                f"--target-speedup {budget.target_speedup} cannot be met: removing every candidate block gives an "
                f"ideal speedup of {sizer.speedup(cands):.3f}x (FLOP model at context {budget.speedup_context})"
            )
        lo, hi = bounds
        meets = lambda removed: sizer.speedup(removed) >= budget.target_speedup - 1e-12  # noqa: E731
        describe = f"--target-speedup {budget.target_speedup} (ideal FLOP speedup at context {budget.speedup_context})"
    if lo >= len(cands):
        raise SlebError(
            f"{describe} removes every candidate block ({len(cands)} of {num_blocks}; the first {early_barrier} and "
            f"last {latter_barrier} are kept); choose a smaller budget"
        )

    ceiling = budget.max_ppl_increase

    def over_ceiling(result: SearchResult, k: int) -> bool:
        return ceiling is not None and result.calibration_ppl(k) > ceiling * result.calibration_ppl(0)

    stop_when = (lambda r: over_ceiling(r, len(r.removed))) if ceiling is not None else None  # noqa: E731
    if on_status:
        on_status(f"searching with {metric} for up to {hi} removals")
    result = search(model, calib, hi, metric=metric, batch_size=batch_size, early_barrier=early_barrier,
                    latter_barrier=latter_barrier, seed=seed, angular_tokens=angular_tokens, stop_when=stop_when,
                    checkpoint=checkpoint, progress=progress, racing=racing, confidence=confidence)
    searched = len(result.removed)

    # The count: the first that meets the size target, capped by the ceiling.
    k_target = next((k for k in range(lo, searched + 1) if meets(removal_set(result, k))), None) if target else None
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
            reason += f" ({_fmt(sizer.params(removal_set(result, count)))} parameters, ideal speedup " \
                      f"{sizer.speedup(removal_set(result, count)):.3f}x)"
    else:
        count = searched  # ceiling only, and it never binds: every candidate would go
        stopped_by, reason = "max-ppl-increase", "never exceeded"
    if count >= len(cands):
        raise SlebError(
            f"the budget removes every candidate block ({len(cands)} of {num_blocks}): calibration perplexity stays "
            f"within {ceiling} x dense; choose a tighter budget"
        )

    result = truncate(result, count)
    removed = removal_set(result, count)
    sizer = sizer or _Sizer.of(model, budget.speedup_context)
    result.extra["budget"] = {
        "requested": {k: v for k, v in asdict(budget).items() if v is not None},
        "stopped_by": stopped_by,
        "reason": reason,
        "removed": count,
        "parameters_before": sizer.dense_params,
        "parameters_after": sizer.params(removed),
        "ideal_speedup": sizer.speedup(removed),
        "speedup_context": budget.speedup_context,
    }
    result.extra["model_fingerprint"] = model_fingerprint(model)

    if beam is not None or refine is not None:
        from .refine import beam_search, refine_swap

        def feasible(removed_set: list[int]) -> bool:
            return meets(removed_set) if target in ("target_params", "target_speedup") else True

        if beam is not None:
            if on_status:
                on_status(f"beam search (width {beam}) for {count} removals")
            result = beam_search(model, calib, count, width=beam, base=result, batch_size=batch_size,
                                 early_barrier=early_barrier, latter_barrier=latter_barrier, progress=progress)
        if refine == "swap":
            if on_status:
                on_status(f"refining the {count}-block set by swaps")
            result = refine_swap(model, calib, result, feasible=feasible, max_seconds=refine_seconds,
                                 batch_size=batch_size, progress=progress)
    return result


# -- re-applying a search ---------------------------------------------------------------------------
def load_report(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "sleb_report.json"
    if not p.is_file():
        raise SlebError(f"report not found: {p}")
    try:
        report = json.loads(p.read_text())
    except ValueError as err:
        raise SlebError(f"{p} is not a JSON report: {err}") from err
    if not isinstance(report, dict) or "removed" not in report or "blocks_before" not in report:
        raise SlebError(f"{p} is not a sleb search report (no 'removed' / 'blocks_before')")
    return report


def result_from_report(report: dict) -> SearchResult:
    """Rebuild the SearchResult a report was written from (enough to truncate and re-save it)."""
    calib = report.get("calibration") or {}
    nsamples = int(calib.get("nsamples") or 1)
    by_removed = report.get("calibration_ppl_by_removed") or []
    count_losses = [math.log(p) * nsamples for p in by_removed]
    extra = {k: report[k] for k in ("criterion", "sets_by_count", "budget", "refine", "model_fingerprint") if k in report}
    barriers = report.get("barriers") or {}
    return SearchResult(
        removed=list(report["removed"]),
        num_blocks=int(report["blocks_before"]),
        steps=[StepRecord(s["step"], s["removed"], {int(k): v for k, v in s["scores"].items()}, s["seconds"])
               for s in report.get("steps", [])],
        dense_loss=count_losses[0] if count_losses else float("nan"),
        nsamples=nsamples,
        seqlen=int(calib.get("seqlen") or 0),
        calibration_sha256=calib.get("sha256", ""),
        metric=report.get("metric", "sleb"),
        early_barrier=int(barriers.get("early", 1)),
        latter_barrier=int(barriers.get("latter", 1)),
        seconds=float(report.get("search_seconds", 0.0)),
        extra=extra,
        count_losses=count_losses,
    )


def apply_report(model, report: dict, count: int, source: str = "the report") -> SearchResult:
    """The first `count` removals of an earlier search, after checking it was made on this model."""
    num_blocks = len(find_blocks(model).modules)
    if int(report["blocks_before"]) != num_blocks:
        raise SlebError(
            f"{source} was made on a model with {report['blocks_before']} blocks; this model has {num_blocks}"
        )
    saved = report.get("model_fingerprint")
    if saved is not None and not same_fingerprint(saved, model_fingerprint(model)):
        raise SlebError(f"{source} was made on another model: the block weights' fingerprint differs")
    result = result_from_report(report)
    recorded = len(result.removed)
    if not 1 <= count <= recorded:
        raise SlebError(f"{source} records {recorded} removals; cannot apply {count}")
    out = truncate(result, count)
    out.extra["from_report"] = {"source": source, "applied": count, "recorded": recorded}
    return out


__all__ = ["Budget", "budgeted_search", "apply_report", "load_report", "result_from_report", "model_fingerprint",
           "pruned_view", "flops_after", "count_loss"]

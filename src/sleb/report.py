"""The run report (`sleb_report.json`) and the short human summary the CLI prints."""

from __future__ import annotations

import platform
from importlib import metadata

from .arch import find_blocks


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("sleb", "torch", "transformers", "accelerate", "safetensors", "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_report(model, result, fields: dict) -> dict:
    """Everything needed to reproduce and judge a run, as plain JSON-able data."""
    report = {
        "format": "sleb-report/1",
        "source": fields.pop("source", None),
        "blocks_before": result.num_blocks if result else None,
        "blocks_after": len(find_blocks(model).modules),
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    if result is not None:
        calibration = {
            "spec": fields.pop("calibration_spec", None),
            "nsamples": result.nsamples,
            "seqlen": result.seqlen,
            "seed": fields.pop("seed", None),
            "sha256": result.calibration_sha256,
        }
        report.update(
            removed=result.removed,
            kept=result.kept,
            metric=result.metric,
            barriers={"early": result.early_barrier, "latter": result.latter_barrier},
            calibration=calibration,
            calibration_ppl_before=result.calibration_ppl(0),
            calibration_ppl_after=result.calibration_ppl(),
            calibration_ppl_by_removed=[result.calibration_ppl(k) for k in range(len(result.removed) + 1)],
            steps=[
                {"step": s.step, "removed": s.removed, "seconds": s.seconds, "scores": {str(k): v for k, v in s.scores.items()},
                 # Racing steps: windows per candidate and which scores are complete / lower bounds / estimates.
                 **({"windows": {str(k): v for k, v in s.windows.items()}, "kinds": {str(k): v for k, v in s.kinds.items()},
                     "confidence": s.confidence} if s.kinds else {})}
                for s in result.steps
            ],
            search_seconds=result.seconds,
        )
        # Criterion details, per-count sets, budget, refinement and model fingerprint (sleb.metrics / budgets).
        report.update(result.extra)
    report.update(fields)
    report["versions"] = library_versions()
    return report


def summary(result) -> str:
    """A few lines for people: what went, and what it cost on the calibration text."""
    lines = [
        f"removed {len(result.removed)} of {result.num_blocks} blocks (in removal order): {result.removed}",
        f"kept blocks: {result.kept}",
        f"calibration perplexity: {result.calibration_ppl(0):.2f} dense -> {result.calibration_ppl():.2f} pruned"
        f" ({result.nsamples} windows of {result.seqlen} tokens)",
        f"search took {result.seconds:.1f} s",
    ]
    racing = [s for s in result.steps if s.kinds]
    if racing:
        scored = sum(sum(s.windows.values()) for s in racing)
        exact = sum(len(s.scores) for s in racing) * result.nsamples
        partial = sum(sum(k != "complete" for k in s.kinds.values()) for s in racing)
        lines.append(f"racing (confidence {racing[0].confidence}): scored {scored} of {exact} candidate windows; "
                     f"{partial} candidate scores are lower bounds or estimates (see the report's steps)")
    return "\n".join(lines)

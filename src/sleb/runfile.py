"""The run file, `sleb_report.json`: written, read and validated here, and nowhere else.

`sleb prune` writes one beside every checkpoint: what was removed and why (every step's candidate
scores), the calibration windows (spec, count, length, seed, token hash), the criterion, budget,
refinement and the dense model's fingerprint, and the library versions. `sleb report` draws it,
`--from-report` re-applies it, `sleb quantize` carries it over. (`sleb report`'s Markdown is
`sleb.report`.) Also here: the short summaries the CLI prints (of a search, of a compensation).
"""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .arch import find_blocks
from .settings import UNITS, SearchOptions
from .units import UnitSpace, unit_kind
from .errors import BadInput
from .fingerprint import model_fingerprint, same_model
from .result import ANNOTATIONS, SearchResult, StepRecord, removal_set

RUN_FILE = "sleb_report.json"
REPORT_SUFFIX = "." + RUN_FILE  # a .gguf output's run file lies beside it: OUT.gguf.sleb_report.json
FORMAT = "sleb-report/1"
REQUIRED = ("removed", "steps", "blocks_before", "calibration")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("sleb", "torch", "transformers", "accelerate", "safetensors", "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# Entries a run file may hold besides the search's, each written by one stage: the checkpoint's own
# files (and their SHA-256, `sleb.outputs.write_run_record`), its reload check, the GGUF details, a
# quantization, the settings of the run.
OUTPUT_ENTRIES = ("config", "files", "file_sha256", "reload_max_logit_diff", "gguf", "quantization")


@dataclass
class RunRecord:
    """`sleb_report.json` as a value. `write` and `read` are the only code that touches the file.

    `search` holds the search's entries (removed, kept, metric, barriers, calibration, calibration
    perplexities, steps, seconds, and the result's annotations: criterion, budget, refinement,
    racing, fingerprint, held-out perplexity, compensation, ...), made from a `SearchResult` by
    `of` and turned back into one by `result()`. Entries this version does not know are kept in
    `other` and written back unchanged.
    """

    source: str | None = None
    blocks_before: int | None = None
    blocks_after: int | None = None
    parameters_after: int | None = None
    dtype: str | None = None
    search: dict = field(default_factory=dict)
    config: dict | None = None
    files: list[str] | None = None
    file_sha256: dict[str, str] | None = None
    reload_max_logit_diff: float | None = None
    gguf: dict | None = None
    quantization: dict | None = None
    versions: dict = field(default_factory=dict)
    other: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model, result: SearchResult | None, *, source: str | None = None, calibration_spec: str | None = None,
           seed: int | None = None, **entries) -> "RunRecord":
        """The record of `model` as it is now (pruned), searched as `result` says."""
        search = {}
        if result is not None:
            data = result.to_dict()
            search = {
                **unit_kind(result.unit).record_entries(result),
                "removed": data["removed"],
                "kept": result.kept,
                "metric": data["metric"],
                "barriers": {"early": data["early_barrier"], "latter": data["latter_barrier"]},
                "calibration": {"spec": calibration_spec, "nsamples": data["nsamples"], "seqlen": data["seqlen"],
                                "seed": seed, "sha256": data["calibration_sha256"]},
                "calibration_ppl_before": result.calibration_ppl(0),
                "calibration_ppl_after": result.calibration_ppl(),
                "calibration_ppl_by_removed": [result.calibration_ppl(k) for k in range(len(result.removed) + 1)],
                "steps": data["steps"],
                "search_seconds": data["seconds"],
                **result.annotations(),
            }
        return cls(source=source, blocks_before=result.num_blocks if result else None,
                   blocks_after=len(find_blocks(model).modules),
                   parameters_after=sum(p.numel() for p in model.parameters()),
                   dtype=str(model.dtype).removeprefix("torch."), search=search,
                   versions=library_versions(), **entries)

    def to_dict(self) -> dict:
        """The file's JSON: the header, the search's entries, the outputs' entries (set ones), the versions."""
        data = {"format": FORMAT, "source": self.source, "blocks_before": self.blocks_before,
                "blocks_after": self.blocks_after, "parameters_after": self.parameters_after, "dtype": self.dtype}
        data.update(self.search)
        data.update({name: getattr(self, name) for name in OUTPUT_ENTRIES if getattr(self, name) is not None})
        data.update(self.other)
        data["versions"] = self.versions
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        data = dict(data)
        data.pop("format", None)
        header = {name: data.pop(name, None) for name in ("source", "blocks_before", "blocks_after",
                                                          "parameters_after", "dtype")}
        outputs = {name: data.pop(name) for name in OUTPUT_ENTRIES if name in data}
        versions = data.pop("versions", None) or {}
        search = {name: data.pop(name) for name in (*SEARCH_ENTRIES, *ANNOTATIONS) if name in data}
        return cls(**header, search=search, versions=versions, other=data, **outputs)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the record to `path` (a file, or a folder to hold RUN_FILE). Callers write into a temporary
        place that `sleb.outputs` moves into position, so this is a plain write."""
        path = Path(path)
        if path.is_dir():
            path = path / RUN_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RunRecord":
        """The validated record of a prune output folder, a GGUF output's run file, or the file itself."""
        return cls.from_dict(load_run(path))

    @property
    def unit(self) -> str:
        """What the search removed (`sleb.units`)."""
        return run_unit(self.search)

    def result(self) -> SearchResult:
        """The SearchResult the search entries were made from (enough to truncate and re-save it)."""
        return result_from_run(self.to_dict())


def run_unit(entries: dict) -> str:
    """The unit a run file's entries record: a file that names none (a block search, or one written before
    units existed) removed blocks."""
    return entries.get("unit", "block")


# The search's own entries (the result's annotations are `sleb.result.ANNOTATIONS`).
SEARCH_ENTRIES = ("unit", "removed_units", "removed", "kept", "metric", "barriers", "calibration", "calibration_ppl_before",
                  "calibration_ppl_after", "calibration_ppl_by_removed", "steps", "search_seconds")


def read_entries(path: str | os.PathLike) -> dict | None:
    """A run file's entries as they are, unvalidated (None when there is none): for carrying a record over
    (`sleb quantize` of any checkpoint, sleb's or not)."""
    p = Path(path)
    p = p / RUN_FILE if p.is_dir() else p
    return _json_object(p) if p.is_file() else None


def _json_object(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInput(f"{p} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise BadInput(f"{p} is not a sleb run file")
    return data


def summary(result) -> str:
    """A few lines for people: what went, and what it cost on the calibration text."""
    lines = [
        *UnitSpace(result.unit, result.num_blocks).describe_removed(result.removed),
        f"calibration perplexity: {result.calibration_ppl(0):.2f} dense -> {result.calibration_ppl():.2f} pruned"
        f" ({result.nsamples} windows of {result.seqlen} tokens)",
    ]
    applied = result.from_report
    if applied is not None:
        lines.append(f"no search: the first {applied['applied']} of {applied['recorded']} removals recorded in "
                     f"{applied['source']} ({applied['metric']}), measured here")
    else:
        lines.append(f"search took {result.seconds:.1f} s")
    racing = [s for s in result.steps if s.kinds]
    if racing:
        scored = sum(sum(s.windows.values()) for s in racing)
        exact = sum(len(s.scores) for s in racing) * result.nsamples
        partial = sum(sum(k != "complete" for k in s.kinds.values()) for s in racing)
        tolerance = (result.racing or {}).get("tolerance", 0.0)
        lines.append(f"racing (confidence {racing[0].confidence}, tolerance {tolerance}): scored {scored} of {exact} candidate windows; "
                     f"{partial} candidate scores are lower bounds or estimates (see the report's steps)")
    return "\n".join(lines)


def speed_line(result) -> str:
    """The speed of a pruned model in the measured cost model (--speed-at): predicted, measured in memory after
    removal, and the target; a second line when the measurement misses the target by more than its spread."""
    speed, budget = result.speed, result.budget or {}
    runtime = (speed.get("measured") or {}).get("runtime", "transformers")
    line = f"speedup at {speed['speed_at']} in {runtime}: predicted {speed['predicted_speedup']:.3f}x"
    measured = speed.get("measured_speedup")
    if measured is not None:
        timed = "the saved file against its source" if runtime == "llama.cpp" else "the pruned model in memory"
        line += f", measured {measured:.3f}x (+-{speed['measured_spread']:.0%}, {timed})"
    target = (budget.get("requested") or {}).get("target_speedup")
    if target is not None:
        line += f"; target {target}x"
        if measured is not None and measured < target * (1 - speed["measured_spread"]):
            line += (f"\nthe measured speedup {measured:.3f}x misses the target {target}x by more than the measurement's "
                     f"spread (+-{speed['measured_spread']:.0%}); the run file's speed entry has the cost table")
    return line


def compensation_summary(comp) -> str:
    """What `sleb.compensate` did (a `Compensation`): one line per run and one for the calibration effect."""
    label = UnitSpace(comp.unit, 0).label
    lines = []
    for fit in comp.runs:
        run = "[" + ", ".join(label(u) for u in fit.blocks) + "]"
        if fit.skipped:
            lines.append(f"run {run}: {fit.skipped}")
            continue
        line = (f"run {run}: {comp.objective} map folded into {label(fit.fold_block)} ({fit.projection}); "
                f"residual {fit.residual_before:.4f} -> {fit.residual_after:.4f}")
        if fit.cosine_before is not None:
            line += f", cosine distance {fit.cosine_before:.4f} -> {fit.cosine_after:.4f}"
        if fit.heldout_ppl_after is not None:
            line += f", held-out ppl {fit.heldout_ppl_before:.3f} -> {fit.heldout_ppl_after:.3f}"
        lines.append(line + f" ({fit.seconds:.1f} s)")
    if comp.calibration_ppl is not None:
        lines.append(f"calibration perplexity: plain removal {comp.calibration_ppl_plain:.3f} -> compensated "
                     f"{comp.calibration_ppl:.3f}")
    return "\n".join(lines)


def report_path(out: str | os.PathLike) -> Path:
    """Where the run report of a GGUF output goes: beside it, `OUT.gguf.sleb_report.json`."""
    out = Path(out)
    return out.with_name(out.name + REPORT_SUFFIX)


def load_run(path: str | os.PathLike) -> dict:
    """The run file of a prune output folder (or the file itself), validated; one-line BadInput otherwise."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"not found: {path} (give an output folder of `sleb prune` or its {RUN_FILE})")
    if p.is_dir():
        p = p / RUN_FILE
        if not p.is_file():
            raise BadInput(f"{path} has no {RUN_FILE}; is it the output folder of `sleb prune`?")
    elif p.suffix.lower() == ".gguf":
        p = report_path(p)
        if not p.is_file():
            raise BadInput(f"{path} has no run file {p.name} beside it; is it a .gguf output of `sleb prune`?")
    report = _json_object(p)
    if report.get("format", FORMAT) != FORMAT:
        raise BadInput(f"{p} is in format {json.dumps(report.get('format'))}; this sleb reads {FORMAT}")
    # An applied order (--from-report) records no search steps of its own.
    required = [k for k in REQUIRED if not (k == "steps" and report.get("from_report"))]
    missing = [k for k in required if report.get(k) in (None, [], {})]
    if missing:
        raise BadInput(f"{p} records no SLEB search (missing: {', '.join(missing)})")
    _check_fields(report, p)
    return report


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no block index


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(report: dict, p: Path) -> None:
    """What decides which blocks go must be exactly what `sleb prune` writes: a hand-edited or damaged
    file (``true`` for a block, an index past the end, a block twice) is refused, not applied."""
    n = report["blocks_before"]
    if not _is_int(n) or n < 1:
        raise BadInput(f"{p}: blocks_before must be a positive integer, got {json.dumps(n)}")
    unit = run_unit(report)
    if unit not in UNITS:
        raise BadInput(f"{p}: unit must be one of {', '.join(UNITS)}, got {json.dumps(unit)}")
    space = UnitSpace(unit, n)
    n = space.count

    def blocks(value, what: str, size: int | None = None) -> None:
        ok = (isinstance(value, list) and all(_is_int(b) and 0 <= b < n for b in value)
              and len(set(value)) == len(value) and (size is None or len(value) == size))
        if not ok:
            count = "" if size is None else f"{size} "
            raise BadInput(f"{p}: {what} must list {count}distinct {unit} indices, integers from 0 to {n - 1}; "
                           f"got {json.dumps(value)}")

    removed = report["removed"]
    blocks(removed, "removed")
    barriers = report.get("barriers") or {}
    early, latter = barriers.get("early", 1), barriers.get("latter", 1)
    if not (_is_int(early) and _is_int(latter) and early >= 0 and latter >= 0):
        raise BadInput(f"{p}: barriers must hold two integers of 0 or more, got {json.dumps(barriers)}")
    barred = [b for b in removed if not early <= space.block_of(b) < space.num_blocks - latter]
    if barred:
        raise BadInput(f"{p}: removed lists {barred}, inside the barriers (first {early}, last {latter} blocks "
                       "are never removed)")
    kept = report.get("kept")
    if kept is not None and kept != space.kept(removed):
        raise BadInput(f"{p}: kept {json.dumps(kept)} contradicts removed {json.dumps(removed)}")
    fingerprint = report.get("model_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, dict):
        raise BadInput(f"{p}: model_fingerprint must be the record sleb writes, got {json.dumps(fingerprint)}")
    steps = report.get("steps") or []
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise BadInput(f"{p}: steps must be a list of step records")
    for i, step in enumerate(steps):
        if not _is_int(step.get("step")):
            raise BadInput(f"{p}: steps[{i}].step must be an integer, got {json.dumps(step.get('step'))}")
        blocks([step.get("removed")], f"steps[{i}].removed", 1)
        scores = step.get("scores")
        if not isinstance(scores, dict) or not all(
                k.isdigit() and int(k) < n and (_is_number(v) or v is None) for k, v in scores.items()):
            raise BadInput(f"{p}: steps[{i}].scores must map block indices 0 to {n - 1} to numbers")
        # Without per-count sets the order is the steps' picks, one per step.
        if not report.get("sets_by_count") and (i >= len(removed) or step["removed"] != removed[i]):
            raise BadInput(f"{p}: steps[{i}] removed {step['removed']}, but removed lists "
                           f"{removed[i] if i < len(removed) else 'nothing'} there")
    for count, chosen in (report.get("sets_by_count") or {}).items():
        if not str(count).isdigit():
            raise BadInput(f"{p}: sets_by_count has a key {count!r} that is no block count")
        blocks(chosen, f"sets_by_count[{count}]", int(count))
    ppl = report.get("calibration_ppl_by_removed")
    if ppl is not None and not (isinstance(ppl, list) and len(ppl) == len(report["removed"]) + 1
                                and all(_is_number(v) and not v <= 0 for v in ppl)):
        raise BadInput(f"{p}: calibration_ppl_by_removed must hold {len(report['removed']) + 1} positive numbers "
                       "(dense, then after each removal)")
    calibration = report["calibration"]
    if not isinstance(calibration, dict) or not all(
            calibration.get(k) is None or (_is_int(calibration[k]) and calibration[k] >= 1) for k in ("nsamples", "seqlen")):
        raise BadInput(f"{p}: calibration must record nsamples and seqlen as positive integers")


def result_from_run(report: dict) -> SearchResult:
    """Rebuild the SearchResult a run file was written from (enough to truncate and re-save it)."""
    calib = report.get("calibration") or {}
    nsamples = int(calib.get("nsamples") or 1)
    by_removed = report.get("calibration_ppl_by_removed") or []
    count_losses = [math.log(p) * nsamples for p in by_removed]
    kept = {k: report[k] for k in ("criterion", "sets_by_count", "budget", "speed", "refine", "model_fingerprint")
            if k in report}
    barriers = report.get("barriers") or {}
    return SearchResult(
        removed=list(report["removed"]),
        num_blocks=int(report["blocks_before"]),
        steps=[StepRecord.from_dict(s) for s in report.get("steps", [])],
        dense_loss=count_losses[0] if count_losses else float("nan"),
        nsamples=nsamples,
        seqlen=int(calib.get("seqlen") or 0),
        calibration_sha256=calib.get("sha256", ""),
        metric=report.get("metric", "sleb"),
        unit=run_unit(report),
        early_barrier=int(barriers.get("early", 1)),
        latter_barrier=int(barriers.get("latter", 1)),
        seconds=float(report.get("search_seconds", 0.0)),
        count_losses=count_losses,
        **kept,
    )


def check_count(record: RunRecord, count: int, source: str = "the report") -> None:
    """Whether `count` of a run file's removals can be applied (before any model loads, where the count is known)."""
    recorded = len(record.search["removed"])
    if not 1 <= count <= recorded:
        raise BadInput(f"{source} records {recorded} removals; cannot apply {count}")


def check_run_model(model, record: RunRecord, source: str = "the report") -> None:
    """Refuse a run file made on another model (block count, then the block weights' fingerprint)."""
    num_blocks = len(find_blocks(model).modules)
    if int(record.blocks_before) != num_blocks:
        raise BadInput(
            f"{source} was made on a model with {record.blocks_before} blocks; this model has {num_blocks}"
        )
    saved = record.search.get("model_fingerprint")
    if saved is not None and not same_model(saved, model_fingerprint(model)):
        raise BadInput(f"{source} was made on another model: the block weights' fingerprint differs")


def apply_run(model, record: RunRecord, count: int, windows, options: SearchOptions,
              measure: Callable[[list[list[int]]], list[float]], source: str = "the report") -> SearchResult:
    """The first `count` removals of an earlier search, after checking it was made on this model.

    Nothing measured by that search is carried over: `measure` gives the calibration loss on
    `windows` of the set for each count 0..`count` (what the result then reports), and the result
    records no search steps, only the order's source (`from_report`).
    """
    check_run_model(model, record, source)
    check_count(record, count, source)
    recorded = record.result()
    sets = [removal_set(recorded, k) for k in range(count + 1)]
    losses = measure(sets)
    per_count = recorded.sets_by_count
    return SearchResult.for_windows(
        windows, recorded.num_blocks, options, recorded.metric, unit=recorded.unit, removed=sets[-1],
        dense_loss=losses[0], count_losses=losses,
        sets_by_count=None if per_count is None else {k: v for k, v in per_count.items() if int(k) <= count},
        from_report={"source": source, "applied": count, "recorded": len(recorded.removed),
                     "metric": recorded.metric},
        model_fingerprint=model_fingerprint(model))

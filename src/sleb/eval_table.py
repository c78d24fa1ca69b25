"""Several models evaluated side by side: one row per model, written as text, Markdown and JSON.

A row holds the model's block and parameter counts, its perplexity on each text spec, its
lm-eval accuracy on each task and the mean accuracy. The table shows every figure of a later
row with its change against the first row (perplexity and parameters in percent, accuracy in
points), so "dense, then pruned variants" reads at a glance.

`run_eval` is the whole `sleb eval` job as one library call: it loads each model in turn, fills in
its row and rewrites the table files after every finished measurement.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import distributed, loading
from .arch import find_blocks, max_context
from .config import EvalConfig
from .errors import BadInput
from .evaluate import MEAN_RULE, PerplexityResult, TaskResult, check_tasks, mean_accuracy, perplexity, zero_shot
from .outputs import atomic_write_text
from .sizes import count_parameters

EVAL_FORMAT = "sleb-eval/1"


@dataclass
class ModelEval:
    """Everything measured for one model (filled in as measurements finish)."""

    model: str
    blocks: int
    parameters: int
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    @property
    def mean_accuracy(self) -> float | None:
        return mean_accuracy(self.tasks)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "blocks": self.blocks,
            "parameters": self.parameters,
            "perplexity": {k: v.to_dict() for k, v in self.perplexity.items()},
            "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
            "mean_accuracy": self.mean_accuracy,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelEval":
        return cls(
            model=data["model"],
            blocks=data["blocks"],
            parameters=data["parameters"],
            perplexity={k: PerplexityResult(**v) for k, v in data.get("perplexity", {}).items()},
            tasks={k: TaskResult(**v) for k, v in data.get("tasks", {}).items()},
        )


def _columns(rows: list[ModelEval]) -> tuple[list[str], list[str]]:
    """Specs and tasks in first-seen order over all rows."""
    specs: dict[str, None] = {}
    tasks: dict[str, None] = {}
    for row in rows:
        specs.update(dict.fromkeys(row.perplexity))
        tasks.update(dict.fromkeys(row.tasks))
    return list(specs), list(tasks)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _pct(value: float, base: float) -> str:
    return f" ({(value / base - 1) * 100:+.1f}%)" if base else ""


def _pts(value: float, base: float) -> str:
    return f" ({(value - base) * 100:+.1f})"


def table(rows: list[ModelEval]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the side-by-side table (accuracies in percent)."""
    specs, tasks = _columns(rows)
    header = ["model", "blocks", "params"]
    header += [f"ppl {s}" for s in specs]
    for t in tasks:
        header += [f"{t} acc", f"{t} acc_norm"]
    if tasks:
        header.append("mean acc")
    base = rows[0] if rows else None
    cells = []
    for i, row in enumerate(rows):
        first = i == 0
        line = [row.model, str(row.blocks) + ("" if first else f" ({row.blocks - base.blocks:+d})")]
        line.append(_params(row.parameters) + ("" if first else _pct(row.parameters, base.parameters)))
        for s in specs:
            r = row.perplexity.get(s)
            if r is None:
                line.append("-")
                continue
            b = base.perplexity.get(s)
            line.append(f"{r.ppl:.2f}" + ("" if first or b is None else _pct(r.ppl, b.ppl)))
        for t in tasks:
            r, b = row.tasks.get(t), base.tasks.get(t)
            for name in ("acc", "acc_norm"):
                value = getattr(r, name) if r else None
                ref = getattr(b, name) if b else None
                if value is None:
                    line.append("-")
                else:
                    line.append(f"{value * 100:.1f}" + ("" if first or ref is None else _pts(value, ref)))
        if tasks:
            mean, ref = row.mean_accuracy, base.mean_accuracy
            complete = len(row.tasks) == len(tasks)
            if mean is None or not complete:
                line.append("-")
            else:
                ref_ok = ref is not None and len(base.tasks) == len(tasks)
                line.append(f"{mean * 100:.1f}" + ("" if first or not ref_ok else _pts(mean, ref)))
        cells.append(line)
    return header, cells


def notes(rows: list[ModelEval]) -> list[str]:
    """What the numbers mean: the change convention, the perplexity protocols, the mean rule."""
    specs, tasks = _columns(rows)
    out = []
    if len(rows) > 1:
        out.append("changes in brackets are against the first row: perplexity and parameters in percent, "
                   "accuracy in points")
    for s in specs:
        protocol = next(r.perplexity[s].protocol for r in rows if s in r.perplexity)
        out.append(f"ppl {s}: {protocol}")
    if tasks:
        used = {}
        for row in rows:
            for t, r in row.tasks.items():
                used.setdefault(t, r.metric)
        out.append(f"accuracies in percent (lm-evaluation-harness); {MEAN_RULE}: "
                   + ", ".join(f"{t} {m}" for t, m in used.items()))
        counts = {t: r.samples for row in rows for t, r in row.tasks.items()}
        out.append("examples per task: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    return out


def render_text(rows: list[ModelEval]) -> str:
    """The table as aligned plain text, notes below."""
    header, cells = table(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    lines += [""] + [f"* {n}" for n in notes(rows)]
    return "\n".join(lines)


def render_markdown(rows: list[ModelEval]) -> str:
    """The table as GitHub Markdown, notes below."""
    header, cells = table(rows)
    esc = [[c.replace("|", "\\|") for c in line] for line in cells]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in esc]
    lines += [""] + [f"- {n}" for n in notes(rows)]
    return "\n".join(lines) + "\n"


def to_json(rows: list[ModelEval], settings: dict | None = None) -> dict:
    """The table as JSON-able data (raw values, protocols and changes against the first row)."""
    from .runfile import library_versions

    header, cells = table(rows)
    return {
        "format": EVAL_FORMAT,
        "settings": settings or {},
        "mean_rule": MEAN_RULE,
        "models": [r.to_dict() for r in rows],
        "table": {"header": header, "rows": cells},
        "notes": notes(rows),
        "versions": library_versions(),
    }


def write(rows: list[ModelEval], json_path=None, markdown_path=None, settings: dict | None = None) -> None:
    """Write the JSON and/or Markdown table (each file replaced atomically, so partial runs stay readable)."""
    if json_path:
        atomic_write_text(json_path, json.dumps(to_json(rows, settings), indent=2) + "\n")
    if markdown_path:
        atomic_write_text(markdown_path, render_markdown(rows))


def read(path: str | os.PathLike) -> list[ModelEval] | None:
    """The rows of an eval JSON written by `write`, or None when the file is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != EVAL_FORMAT:
        return None
    return [ModelEval.from_dict(m) for m in data.get("models", [])]


def run_eval(config: EvalConfig, *, log: Callable[[str], None] = lambda message: None) -> list[ModelEval]:
    """Evaluate `config.models` side by side (see `EvalConfig`); returns the rows, the first the baseline.

    Every check that needs no model runs first (`EvalConfig.validate`, then the lm-eval task names),
    and under torchrun the ranks agree on the settings and on each model's weights. After every
    finished perplexity or task, rank 0 rewrites `json_path`/`markdown_path`, so whatever finished
    before a failure stays written. `log` gets one line per result (every rank calls it).
    """
    config = config.validate()
    specs, tasks = config.ppl_specs, config.tasks
    manager = check_tasks(tasks, config.include_path) if tasks else None
    settings = config.settings()
    distributed.agree(config.work())
    # Every model's config and tokenizer before any weights: a folder that needs --trust-remote-code, windows
    # beyond a context or another tokenizer is refused before the first model is evaluated.
    light = [(name, *loading.peek(name, config.trust_remote_code)) for name in config.models]
    loading.check_same_tokenizer([(name, tok) for name, _, tok in light],
                                 "perplexities over different tokenizations are not comparable")
    for name, model_config, _ in light:
        context = max_context(model_config)
        if specs and context is not None and config.seqlen > context:
            raise BadInput(f"--seqlen {config.seqlen} is longer than {name}'s context of {context} tokens")
    rows: list[ModelEval] = []

    def flush():
        if distributed.is_main():
            write(rows, config.json_path, config.markdown_path, settings)

    try:
        for name in config.models:
            lm, tokenizer = loading.load(name, dtype=config.dtype, device=config.device,
                                         trust_remote_code=config.trust_remote_code)
            distributed.agree_on_model(lm, f"the weights of {name}")
            row = ModelEval(name, len(find_blocks(lm).modules), count_parameters(lm))
            rows.append(row)
            for spec in specs:
                result = perplexity(lm, tokenizer, spec, config.seqlen, batch_size=config.batch_size,
                                    max_windows=config.max_windows)
                row.perplexity[spec] = result
                flush()
                log(f"{name}: ppl {spec} = {result.ppl:.3f} over {result.windows} windows [{result.protocol}]")
            if tasks:
                def on_task(task_result, name=name, row=row):
                    row.tasks[task_result.task] = task_result
                    flush()
                    extra = "" if task_result.acc_norm is None else f", acc_norm {task_result.acc_norm:.4f}"
                    log(f"{name}: {task_result.task} acc {task_result.acc:.4f}{extra} ({task_result.samples} examples)")

                zero_shot(lm, tokenizer, tasks, batch_size=config.batch_size, limit=config.task_limit,
                          num_fewshot=config.num_fewshot, include_path=config.include_path, manager=manager,
                          on_result=on_task)
            flush()
            del lm, tokenizer
    finally:
        if rows:
            flush()
    return rows

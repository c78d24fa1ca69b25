"""Evaluation: perplexity with the paper's protocol, and zero-shot accuracy through lm-evaluation-harness.

Perplexity (`perplexity`): the spec's test text as one token stream (WikiText-2-raw test rows joined
with blank lines; C4 en validation shard 0, first 1,100 documents joined with spaces, cut to 256
windows), non-overlapping windows of `seqlen` tokens with the tail dropped, BOS at the start of a
window exactly when the tokenizer adds one, perplexity = exp(mean next-token NLL).

Zero-shot (`zero_shot`): the upstream `lm-eval` package (an optional extra, `pip install 'sleb[eval]'`)
run on the model object already in memory, so a pruned model need not be saved first.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .arch import input_device, next_token_losses
from .data import adds_bos, default_eval_windows, describe_test_text, eval_windows, token_sha256
from .distributed import agree, all_reduce_sum, is_main
from .progress import progress_bar
from .scoring import window_batches
from .errors import SlebError
from .units import unit_kind

PROTOCOL = (
    "{text}; one token stream, non-overlapping windows of {seqlen} tokens, tail dropped{cut} "
    "({bos}); perplexity = exp(mean next-token NLL over all windows)"
)

LM_EVAL_HINT = "zero-shot tasks need lm-evaluation-harness: pip install 'sleb[eval]' (or pip install 'lm-eval>=0.4.8')"

MEAN_RULE = "mean accuracy uses acc_norm where the task defines it, else acc"


def protocol(spec: str, seqlen: int, max_windows: int | None, bos: bool) -> str:
    """The perplexity protocol in words, as printed with every result and stored in the JSON."""
    return PROTOCOL.format(
        text=describe_test_text(spec),
        seqlen=seqlen,
        cut=f", cut to the first {max_windows} windows" if max_windows is not None else "",
        bos="each window starts with BOS, as the tokenizer adds it" if bos else "no BOS: the tokenizer adds none",
    )


@dataclass
class PerplexityResult:
    spec: str
    seqlen: int
    windows: int
    tokens: int  # predicted tokens
    nll: float  # mean next-token negative log-likelihood
    ppl: float
    protocol: str
    windows_sha256: str = ""  # of the evaluated token ids (see sleb.data.token_sha256)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    spec: str,
    seqlen: int = 2048,
    *,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on the test part of a text spec (see `sleb.data`), the paper's protocol.

    Args:
        spec: `wikitext2`, `c4`, `gensim-wiki`, `gensim-lee`, or a local .txt/.jsonl/.parquet file.
        seqlen: tokens per window (BOS included when the tokenizer adds one).
        batch_size: windows per forward pass. Every window has the same length and no padding is
            used, so the result does not depend on it beyond float rounding.
        max_windows: keep the first windows only (default: all; 256 for `c4`, as in the paper).
    """
    if batch_size < 1:
        raise SlebError(f"need batch_size >= 1 (got {batch_size})")
    cap = max_windows if max_windows is not None else default_eval_windows(spec)
    windows = eval_windows(tokenizer, spec, seqlen=seqlen, max_windows=cap)
    windows_sha256 = token_sha256(windows)
    agree({f"the tokens of {spec}": windows_sha256}, f"give every rank the same {spec} text")  # under torchrun
    device = input_device(model)
    total = torch.zeros(1, dtype=torch.float64)
    # Under torchrun each rank takes every world_size-th batch; the sums are added up over ranks.
    batches = window_batches(windows, batch_size)
    bar = progress_bar(batches, desc=f"ppl {spec}", disable=not progress or not is_main(), unit="batch", dynamic_ncols=True)
    for batch in bar:
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # Per-window mean NLL (float64) times the window's predicted tokens: a plain token sum.
        total += next_token_losses(logits, batch).sum() * (seqlen - 1)
    total = all_reduce_sum(total, device).item()
    tokens = len(windows) * (seqlen - 1)
    nll = total / tokens
    return PerplexityResult(
        spec=spec,
        seqlen=seqlen,
        windows=len(windows),
        tokens=tokens,
        nll=nll,
        ppl=math.exp(nll),
        protocol=protocol(spec, seqlen, cap, adds_bos(tokenizer)),
        windows_sha256=windows_sha256,
    )


def heldout_perplexity(model, tokenizer, specs: list[str], removed=(), seqlen: int = 2048, *, batch_size: int = 1,
                       max_windows: int | None = None, unit: str = "block") -> dict[str, float]:
    """Perplexity on each spec's test part with `removed` blocks (or branch units, `sleb.units`) taken out in
    place (restored after)."""
    with unit_kind(unit).view(model, removed):
        return {spec: perplexity(model, tokenizer, spec, seqlen, batch_size=batch_size, max_windows=max_windows,
                                 progress=False).ppl for spec in specs}


# --------------------------------------------------------------------------------------------
# Zero-shot accuracy through lm-evaluation-harness
# --------------------------------------------------------------------------------------------


_LOCAL_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_local_task(folder: str | os.PathLike, name: str, rows: list[dict]) -> Path:
    """A multiple-choice lm-eval task from your own examples, for `zero_shot(..., include_path=folder)`.

    Each row is ``{"question": str, "choices": [str, ...], "answer": index}``; lm-eval scores each
    choice's log-likelihood after the question (joined by a space) and reports acc and acc_norm.
    Writes ``NAME.jsonl`` and ``NAME.yaml`` under `folder` and returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(_LOCAL_TASK_YAML.format(name=name, data=data.resolve()), encoding="utf-8")
    return folder


@dataclass
class TaskResult:
    """One lm-eval task's accuracy; `accuracy` is the figure the mean uses (see `metric`)."""

    task: str
    acc: float
    acc_norm: float | None  # None when the task does not define it
    acc_stderr: float | None
    acc_norm_stderr: float | None
    samples: int
    num_fewshot: int | None
    metric: str  # "acc_norm" or "acc": which figure `accuracy` is
    accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)


def require_lm_eval() -> None:
    """Raise a one-line SlebError saying how to install lm-eval when it is missing."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as err:
        raise SlebError(LM_EVAL_HINT) from err


def task_manager(include_path: str | os.PathLike | None = None, *, include_defaults: bool = True):
    """An lm-eval TaskManager that also indexes the task YAMLs under `include_path`."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise SlebError(f"--include-path {include_path} is not a folder of task YAMLs")
    return TaskManager(include_path=str(include_path) if include_path is not None else None,
                       include_defaults=include_defaults)


def check_tasks(tasks: list[str], include_path: str | os.PathLike | None = None, manager=None):
    """Fail early, before any model is loaded, for a task lm-eval does not know. Returns the manager.

    When every task is defined under `include_path`, lm-eval's own task index (thousands of YAMLs,
    seconds to build) is skipped.
    """
    if manager is None and include_path is not None:
        local = task_manager(include_path, include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            return local
    manager = manager or task_manager(include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise SlebError(
            f"unknown lm-eval task(s): {', '.join(unknown)}; list them with `lm-eval ls tasks`, "
            "or point --include-path at a folder with your task YAML"
        )
    return manager


def _metric(values: dict, name: str) -> float | None:
    for key in (f"{name},none", name):
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def parse_task_result(task: str, values: dict, samples: int, num_fewshot: int | None) -> TaskResult:
    """A TaskResult from one entry of lm-eval's `results` (keys like `acc,none`)."""
    acc = _metric(values, "acc")
    if acc is None:
        metrics = sorted(k.split(",")[0] for k in values if k not in ("alias", "name", "sample_len"))
        raise SlebError(f"lm-eval task {task!r} reports no acc metric (it reports: {', '.join(metrics)})")
    acc_norm = _metric(values, "acc_norm")
    stderr, norm_stderr = _metric(values, "acc_stderr"), _metric(values, "acc_norm_stderr")
    metric = "acc_norm" if acc_norm is not None else "acc"
    return TaskResult(
        task=task,
        acc=acc,
        acc_norm=acc_norm,
        acc_stderr=stderr,
        acc_norm_stderr=norm_stderr,
        samples=samples,
        num_fewshot=num_fewshot,
        metric=metric,
        accuracy=acc_norm if acc_norm is not None else acc,
    )


def zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    *,
    batch_size: int = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | os.PathLike | None = None,
    manager=None,
    on_result=None,
) -> dict[str, TaskResult]:
    """Accuracy of the in-memory `model` on lm-eval tasks, one task at a time.

    Args:
        tasks: lm-eval task names (e.g. piqa, winogrande, hellaswag, arc_easy, arc_challenge), or
            names of task YAMLs under `include_path`.
        limit: examples per task (an int) or a fraction (a float < 1); None for all.
        num_fewshot: few-shot examples (None: the task's default, zero for the paper's tasks).
        manager: a TaskManager from `check_tasks`, to avoid indexing the tasks twice.
        on_result: called with each TaskResult as it completes (to write partial results).

    Returns:
        task name -> TaskResult, in the order given.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = check_tasks(tasks, include_path, manager)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    results: dict[str, TaskResult] = {}
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        for task in tasks:
            try:
                out: dict[str, Any] | None = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                    batch_size=batch_size, log_samples=False,
                )
            except SlebError:
                raise
            except Exception as err:  # datasets/lm-eval raise many types (hub unreachable, bad YAML, ...)
                raise SlebError(f"lm-eval task {task!r} failed: {_first_line(err)}") from err
            if not out or task not in out.get("results", {}):
                raise SlebError(f"lm-eval returned no result for task {task!r} (is it a group of tasks?)")
            samples = out.get("n-samples", {}).get(task, {}).get("effective", 0)
            shots = out.get("n-shot", {}).get(task)
            results[task] = parse_task_result(task, out["results"][task], int(samples), shots)
            if on_result is not None:
                on_result(results[task])
    finally:
        quiet.setLevel(level)
    return results


def mean_accuracy(results: dict[str, TaskResult] | list[TaskResult]) -> float | None:
    """Mean over tasks of acc_norm where the task defines it, else acc (None without tasks)."""
    values = [r.accuracy for r in (results.values() if isinstance(results, dict) else results)]
    return sum(values) / len(values) if values else None

"""`sleb report`: a Markdown report of a prune run, with plots, eval tables and sample generations.

Reads `RUN_DIR/sleb_report.json` (written by `sleb prune`) and every eval JSON beside it (written
by `sleb eval --json`), draws the plots of `sleb.plots`, and, when the dense source model can be
loaded, puts a few greedy generations of the dense and the pruned model side by side. A `.gguf`
output's run file lies beside it (`OUT.gguf.sleb_report.json`); its report goes to `OUT.gguf.report/`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import eval_table
from .arch import input_device
from .errors import SlebError
from .gguf_io.reader import is_gguf_path
from .runfile import REPORT_SUFFIX, RUN_FILE, RunRecord, report_path
from .outputs import atomic_write_text, check_output_files
from .units import UnitSpace

REPORT_MD = "report.md"
# Where a .gguf output's report goes by default: a folder beside it (reports of several files in one
# folder would otherwise replace each other's report.md).
GGUF_REPORT_SUFFIX = ".report"

PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "The three primary colors are",
    "To make a cup of tea, first",
)

OFFLINE_NOTE = (
    "smollm2-135m is SmolLM2-135M-Instruct dequantized from a 4-bit (Q4_1) GGUF file: an instruct "
    "fine-tune carrying quantization error, fine for demos, not a reference for the paper's numbers."
)


def find_evals(run_dir: str | os.PathLike) -> dict[str, list[eval_table.ModelEval]]:
    """Eval JSONs (`sleb eval --json`) in the run folder: file name -> rows."""
    found = {}
    for path in sorted(Path(run_dir).glob("*.json")):
        if path.name == RUN_FILE:
            continue
        rows = eval_table.read(path)
        if rows:
            found[path.name] = rows
    return found


@dataclass
class RunLocation:
    """Where a prune output's parts are: its run file, what loads as the pruned model (the output folder
    or the .gguf file), and the folder of its report and eval JSONs (by default)."""

    run_file: Path
    model: Path
    folder: Path
    gguf: bool = False


def locate_run(path: str | os.PathLike) -> RunLocation:
    """A prune output under any of its spellings: the output folder or its sleb_report.json; a .gguf
    output or the OUT.gguf.sleb_report.json beside it."""
    p = Path(path)
    if p.name.endswith(REPORT_SUFFIX) and is_gguf_path(p.name[: -len(REPORT_SUFFIX)]):
        p = p.with_name(p.name[: -len(REPORT_SUFFIX)])
    if is_gguf_path(p) and not p.is_dir():
        return RunLocation(report_path(p), p, p.with_name(p.name + GGUF_REPORT_SUFFIX), gguf=True)
    folder = p if p.is_dir() or p.name != RUN_FILE else p.parent
    return RunLocation(p / RUN_FILE if p.is_dir() else p, folder, folder)


@dataclass
class Generation:
    prompt: str
    dense: str | None
    pruned: str


@torch.no_grad()
def greedy(model, tokenizer, prompts, max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations (the new text only) of each prompt, one prompt at a time (no padding)."""
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(input_device(model))
        new = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             num_beams=1, temperature=None, top_p=None, top_k=None)
        out.append(tokenizer.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def generations(
    run_dir: str | os.PathLike,
    source: str | None,
    prompts=PROMPTS,
    max_new_tokens: int = 20,
    dtype: str = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
) -> tuple[list[Generation], str | None]:
    """Greedy generations of the pruned model in `run_dir` and of its dense `source`, side by side.

    Returns the generations and, when the dense model could not be loaded, why (its column is then None).
    """
    from .loading import load

    model, tokenizer = load(str(locate_run(run_dir).model), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    pruned = greedy(model, tokenizer, prompts, max_new_tokens)
    del model
    dense: list[str | None] = [None] * len(prompts)
    problem = None
    if not source:
        problem = "the report names no source model"
    else:
        try:
            model, tokenizer = load(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            dense = list(greedy(model, tokenizer, prompts, max_new_tokens))
            del model
        except SlebError as err:
            problem = f"the dense model could not be loaded ({err})"
    return [Generation(p, d, g) for p, d, g in zip(prompts, dense, pruned)], problem


def _cell(text: str | None) -> str:
    if text is None:
        return "(not available)"
    return " ".join(text.replace("|", "\\|").split()) or "(empty)"


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def compensation_lines(entry: dict, unit: str) -> list[str]:
    """The `sleb report` section for a run report's ``compensation`` entry (`Compensation.to_dict`), which
    folded into kept `unit`s."""
    lines = ["## Compensation", "",
             f"A `{entry['objective']}` map (ridge {entry['ridge']}) was fitted on {entry['nsamples']} x "
             f"{entry['seqlen']} calibration tokens per removed run and folded into the kept unit before it.", "",
             "| removed run | folded into | residual before | after | cosine distance before | after | "
             "held-out ppl before | after | fit s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4g}"

    space = UnitSpace(unit, 0)
    label = space.label
    for run in entry["runs"]:
        removed = ", ".join(label(u) for u in run["blocks"])
        if run.get("skipped"):
            lines.append(f"| {removed} | {run['skipped']} | | | | | | | |")
            continue
        lines.append(f"| {removed} | {space.strategy.short_noun} {label(run['fold_block'])} "
                     f"`{run['projection']}` | "
                     f"{cell(run['residual_before'])} | {cell(run['residual_after'])} | {cell(run['cosine_before'])} | "
                     f"{cell(run['cosine_after'])} | {cell(run['heldout_ppl_before'])} | "
                     f"{cell(run['heldout_ppl_after'])} | {run['seconds']:.1f} |")
    if entry.get("calibration_ppl") is not None:
        lines += ["", f"Calibration perplexity: plain removal {cell(entry['calibration_ppl_plain'])} -> compensated "
                      f"{cell(entry['calibration_ppl'])}. Residual: ||M T + Y - L|| / ||L|| over all calibration "
                      "tokens (before: T = I, plain removal)."]
    return lines


def _shared(entry: dict) -> str:
    ranks = entry.get("world_size") or 1
    return f", split over {ranks} torchrun ranks" if ranks > 1 else ""


def healing_lines(entry: dict) -> list[str]:
    """The `sleb report` section for a run report's ``healing`` entry (`sleb.heal.HealRecord`)."""
    budget = entry.get("budget") or {}
    limits = " and ".join(f"{v} {k}" for k, v in budget.items() if v is not None) or "none"
    return ["## Healing", "",
            f"Distilled toward the dense model (KL over its top-{entry['top_k']} next tokens) on {entry['windows']} x "
            f"{entry['seqlen']} tokens of {entry.get('text')}, training `{entry['params']}` "
            f"({entry['trained_parameters']:,} parameters, lr {entry['lr']:g}, {entry['batch_size']} windows per "
            f"step{_shared(entry)}). Budget: {limits}; ran {entry['steps']} steps in {entry['seconds']:.0f} s (the "
            f"dense model's pass {entry['teacher_seconds']:.0f} s"
            + ("" if entry.get("resumed_from") is None else f"; resumed from step {entry['resumed_from']}")
            + f"), stopped by {entry['stopped_by']}; kept the state of step {entry['best_step']}.", "",
            f"Perplexity on {entry['heldout_windows']} held-out windows of the calibration text (never trained on): "
            f"{_fmt(entry['heldout_ppl_before'])} before -> {_fmt(entry['heldout_ppl_after'])} after."
            + ("" if entry.get("best_step") else " No step improved on the untrained state (or none ran): the model "
               "is not healed.")]


def speed_lines(entry: dict) -> list[str]:
    """The measured cost model (--speed-at): how it was measured, the speedups, and the table per block."""
    how = entry.get("measured") or {}
    ms = lambda seconds: f"{1000 * seconds:.3f}"  # noqa: E731
    lines = ["## Speed (measured cost model)", "",
             f"Each block and unit timed at {entry['speed_at']} in transformers on {how.get('device')} "
             f"({how.get('dtype')}, {how.get('torch_threads')} threads, torch {how.get('torch')}): median of "
             f"{how.get('rounds')} rounds after {how.get('warmup')} warm-ups, whole pass {ms(entry['total_seconds'])} ms "
             f"+-{entry.get('spread', 0):.0%} with the timing hooks ({ms(how.get('plain_seconds', 0))} ms without); "
             f"{how.get('how')}.", "",
             f"- Predicted speedup of the removal: {entry['predicted_speedup']:.3f}x"]
    if entry.get("measured_speedup") is not None:
        lines.append(f"- Measured (the pruned model in memory, same shape): {entry['measured_speedup']:.3f}x "
                     f"+-{entry.get('measured_spread', 0):.0%}")
    lines += [f"- Outside the blocks: {ms(entry['fixed_seconds'])} ms (embedding {ms(entry['embedding_seconds'])}, "
              f"LM head {ms(entry['head_seconds'])})", ""]
    attention, mlp = entry.get("attention_seconds"), entry.get("mlp_seconds")
    lines += ["| block | ms | attention unit ms | MLP unit ms |" if attention else "| block | ms |",
              "|---:|---:|---:|---:|" if attention else "|---:|---:|"]
    for i, seconds in enumerate(entry["block_seconds"]):
        lines.append(f"| {i} | {ms(seconds)} | {ms(attention[i])} | {ms(mlp[i])} |" if attention else
                     f"| {i} | {ms(seconds)} |")
    return lines


def render(record: RunRecord, plots: dict[str, Path], evals: dict, gens: list[Generation] | None,
           gen_problem: str | None, max_new_tokens: int) -> str:
    """The report's Markdown text."""
    from .plots import step_perplexities

    report = record.to_dict()
    source = record.source or "(unknown source)"
    removed, kept = report["removed"], report.get("kept") or []
    calib = report.get("calibration") or {}
    before, after = record.blocks_before, record.blocks_after
    space = UnitSpace(record.unit, int(before))
    label = space.label
    lines = [f"# SLEB report: {source}", ""]
    lines += [
        *space.report_lines(removed, kept),
        f"- Blocks after pruning: {after}; parameters after: {(record.parameters_after or 0) / 1e6:.1f}M "
        f"({record.dtype})",
        f"- Calibration text: {calib.get('spec')}, {calib.get('nsamples')} windows of {calib.get('seqlen')} tokens, "
        f"seed {calib.get('seed')}",
        f"- Calibration perplexity: {_fmt(report['calibration_ppl_before'])} dense -> "
        f"{_fmt(report['calibration_ppl_after'])} pruned",
        f"- Barriers: first {report.get('barriers', {}).get('early')} and last "
        f"{report.get('barriers', {}).get('latter')} blocks are never removed; "
        + ("no search (an applied order)" if report.get("from_report")
           else f"search took {report.get('search_seconds', 0):.1f} s"),
    ]
    if record.source == "smollm2-135m":
        lines.append(f"- Note: {OFFLINE_NOTE}")
    applied = report.get("from_report")
    if applied:
        lines += ["", "## Why these blocks", "",
                  f"No search ran: the first {applied.get('applied')} of {applied.get('recorded')} removals recorded "
                  f"in {applied.get('source')} were applied; their calibration perplexity above was measured here."]
    else:
        lines += ["", "## Why these blocks", "",
                  "At every step SLEB removes the block whose removal gives the lowest loss on the calibration "
                  "text, given the blocks already removed. Each row shows the winner and the runner-up.", "",
                  "| step | removed | calibration ppl after | runner-up | its ppl | worst candidate | its ppl |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
    for step, scores in enumerate(step_perplexities(report), 1):
        ranked = sorted(scores, key=lambda b: (scores[b], b))
        chosen = removed[step - 1]
        runner = next((b for b in ranked if b != chosen), None)
        worst = ranked[-1]
        lines.append(
            f"| {step} | {label(chosen)} | {_fmt(scores[chosen])} | {label(runner) if runner is not None else '-'} | "
            f"{_fmt(scores[runner]) if runner is not None else '-'} | {label(worst)} | {_fmt(scores[worst])} |"
        )
    if report.get("speed"):
        lines += ["", *speed_lines(report["speed"])]
    if report.get("compensation"):
        lines += ["", *compensation_lines(report["compensation"], record.unit)]
    if report.get("healing"):
        lines += ["", *healing_lines(report["healing"])]
    captions = {
        "scores_heatmap.png": "Every candidate's score at every step (calibration perplexity with that block "
                              "removed, log colour scale). Red boxes: the block removed at that step.",
        "calibration_ppl.png": "Calibration perplexity against the number of blocks removed.",
        "healing_curve.png": "Healing: perplexity on the held-out slice of the calibration text as training went, "
                             "and the training KL to the dense model; the dashed line marks the state kept.",
        "first_step_scores.png": "Step 1: calibration perplexity with each block removed alone from the dense "
                                 "model (log scale): how much each block matters.",
    }
    lines += ["", "## Plots", ""]
    for name, path in plots.items():
        lines += [f"![{name}]({path.name})", "", captions.get(name, ""), ""]
    if evals:
        lines += ["## Evaluations", ""]
        for name, rows in evals.items():
            lines += [f"From `{name}`:", "", eval_table.render_markdown(rows)]
    if gens is not None:
        lines += ["## Sample generations", "",
                  f"Greedy decoding, {max_new_tokens} new tokens, same prompts for both models."]
        if gen_problem:
            lines += ["", f"Dense column missing: {gen_problem}."]
        lines += ["", "| prompt | dense | pruned |", "|---|---|---|"]
        lines += [f"| {_cell(g.prompt)} | {_cell(g.dense)} | {_cell(g.pruned)} |" for g in gens]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    generate: bool = True,
    prompts=PROMPTS,
    max_new_tokens: int = 20,
    dtype: str = "auto",
    device: str | None = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write `report.md` and its three PNGs for a prune run (into `out_dir`, default the run folder; for a
    `.gguf` output, given as the file or its run file: `OUT.gguf.report/`, where its eval JSONs are read).

    Every file goes through the output policy (`sleb.outputs`) before anything is drawn or loaded:
    an existing report or plot is replaced only with `overwrite`, and only if sleb wrote it.

    Args:
        generate: add greedy generations of the pruned model and (when loadable) its dense source.
        trust_remote_code: run model code shipped in the folders (a `--unit sublayer` output's DeciLM code).
    Returns:
        The path of report.md.
    """
    from .loading import local_paths
    from .plots import plot_names, plot_report

    where = locate_run(run_dir)
    if where.gguf and where.model.is_file() and not where.run_file.exists():
        raise SlebError(f"{run_dir}: no run file {where.run_file.name} beside the .gguf file; "
                        "is it an output of `sleb prune`?")
    record = RunRecord.read(where.run_file)
    report = record.to_dict()  # what the plots draw
    out = Path(out_dir) if out_dir is not None else where.folder
    run_file = where.run_file
    read = [run_file.parent / name for name in record.files or [] if isinstance(name, str)]
    if where.gguf:
        read.append(where.model)
    source = record.source
    try:
        dense = local_paths(source) if isinstance(source, str) else []
    except SlebError:  # an offline alias whose package is gone: no dense generations, nothing to protect
        dense = []
    inputs = [run_file, *read, *dense]
    check_output_files(out, [REPORT_MD, *plot_names(report)], inputs=inputs, overwrite=overwrite, label="report folder")
    gens, problem = (None, None)
    if generate:  # first: loading a model is what fails most often, and nothing is written yet
        gens, problem = generations(where.model, source, prompts, max_new_tokens, dtype, device, trust_remote_code)
    plots = plot_report(report, out)
    evals = find_evals(where.folder)
    path = out / REPORT_MD
    atomic_write_text(path, render(record, plots, evals, gens, problem, max_new_tokens))
    return path

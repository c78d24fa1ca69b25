"""Pictures of a SLEB search, drawn from a run's `sleb_report.json` (matplotlib, Agg backend).

Every score in a report is a sum over calibration windows of the mean next-token loss with the
candidate removed. The plots show it as the calibration perplexity that removal would give,
exp(score / windows), on a log scale: removing an early block can raise perplexity a
thousandfold while most blocks cost a few percent.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import SlebError
from .outputs import atomic_write
from .runfile import run_unit
from .units import UnitSpace


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SlebError("plots need matplotlib: pip install 'sleb[plot]'") from err
    return plt


def _save(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Write a PNG the way every output is written (`sleb.outputs`: atomically, never through a link)."""

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs))
    finally:
        _pyplot().close(fig)


def _plain_log_labels(axis) -> None:
    """Label a log axis 20, 30, 200 instead of 2x10^1, 3x10^1, 2x10^2 (minor ticks: 2, 3, 5 only)."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _pos) -> str:
        mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
        return f"{value:g}" if round(mantissa) in (2, 3, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _nsamples(report: dict) -> int:
    n = (report.get("calibration") or {}).get("nsamples")
    if not isinstance(n, int) or n < 1:
        raise SlebError("the report has no calibration window count (calibration.nsamples)")
    return n


def step_perplexities(report: dict) -> list[dict[int, float]]:
    """Per step: candidate block (original index) -> calibration perplexity with it removed."""
    n = _nsamples(report)
    out = []
    for step in report.get("steps") or []:
        out.append({int(k): math.exp(min(v / n, 700.0)) for k, v in step["scores"].items()})
    return out


def score_heatmap(report: dict, path: str | os.PathLike) -> Path:
    """Blocks x steps: the calibration perplexity each candidate's removal gives at each step.

    Grey cells were not candidates (barrier blocks, or blocks already removed: hatched). The block
    removed at each step is outlined and labelled with its perplexity.
    """
    plt = _pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    steps = step_perplexities(report)
    if not steps:
        raise SlebError("the report has no search steps to plot")
    space = UnitSpace(run_unit(report), int(report["blocks_before"]))
    blocks = space.count  # rows: blocks, or branch units (2i attention, 2i + 1 MLP)
    labels = [space.label(b) for b in range(blocks)]
    removed = [int(b) for b in report["removed"]]
    grid = np.full((blocks, len(steps)), np.nan)
    for j, scores in enumerate(steps):
        for block, ppl in scores.items():
            grid[block, j] = ppl
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=max(finite.min(), 1e-3), vmax=max(finite.max(), finite.min() * 1.01))

    height = max(4.0, 0.26 * blocks + 1.5)
    width = max(6.5, 0.9 * len(steps) + 4.0)
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, origin="upper", interpolation="nearest")
    for j, block in enumerate(removed[: len(steps)]):
        ax.add_patch(Rectangle((j - 0.5, block - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.2))
        ax.text(j, block, f"{grid[block, j]:.3g}", ha="center", va="center", fontsize=7, color="white",
                fontweight="bold")
        for later in range(j + 1, len(steps)):
            ax.add_patch(Rectangle((later - 0.5, block - 0.5), 1, 1, fill=False, hatch="///",
                                   edgecolor="#7f7f7f", linewidth=0))
    ax.set_xticks(range(len(steps)), [f"{j + 1}\n(-{labels[removed[j]]})" if j < len(removed) else str(j + 1)
                                      for j in range(len(steps))], fontsize=8)
    ax.set_yticks(range(blocks), labels, fontsize=7 if blocks > 24 else 9)
    what = space.strategy.noun
    ax.set_xlabel(f"search step ({what} removed at that step)")
    ax.set_ylabel(f"{what} (original block numbering)")
    ax.set_title("SLEB search: calibration perplexity if each candidate block is removed next\n"
                 "red box = removed (lowest); grey = not a candidate; hatched = already removed", fontsize=9)
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label("calibration perplexity with the block removed (log)")
    fig.tight_layout()
    return _save(fig, path, bbox_inches="tight")


def calibration_curve(report: dict, path: str | os.PathLike) -> Path:
    """Calibration perplexity after removing 0, 1, ..., k blocks, each point labelled with the block."""
    plt = _pyplot()
    values = report.get("calibration_ppl_by_removed") or []
    if not values:
        raise SlebError("the report has no calibration_ppl_by_removed to plot")
    removed = report.get("removed") or []
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    xs = list(range(len(values)))
    ax.plot(xs, values, marker="o", color="#1f77b4")
    for x, y in zip(xs[1:], values[1:]):
        ax.annotate(f"-{removed[x - 1]}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=8)
    if max(values) / max(min(values), 1e-12) > 10:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
    ax.margins(y=0.12)
    ax.set_xticks(xs)
    ax.set_xlabel("blocks removed (labels: which block went at that step)")
    ax.set_ylabel("calibration perplexity")
    spec = (report.get("calibration") or {}).get("spec")
    ax.set_title(f"Calibration perplexity as SLEB removes blocks ({spec or 'calibration text'})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, bbox_inches="tight")


def first_step_bars(report: dict, path: str | os.PathLike) -> Path:
    """How much each block matters on the dense model: calibration perplexity with it removed alone."""
    plt = _pyplot()
    steps = step_perplexities(report)
    if not steps:
        raise SlebError("the report has no search steps to plot")
    first = steps[0]
    blocks = int(report["blocks_before"])
    removed = set(int(b) for b in report.get("removed") or [])
    dense = report.get("calibration_ppl_before")
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * blocks + 2), 4.2), dpi=110)
    xs = sorted(first)
    colors = ["#d62728" if b in removed else "#1f77b4" for b in xs]
    ax.bar(xs, [first[b] for b in xs], color=colors, width=0.8)
    skipped = [b for b in range(blocks) if b not in first]
    for b in skipped:
        ax.axvspan(b - 0.4, b + 0.4, color="#d9d9d9", zorder=0)
    if dense:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense model ({dense:.3g})")
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis)
    ax.set_xticks(range(blocks), [str(b) for b in range(blocks)], fontsize=7 if blocks > 24 else 9)
    ax.set_xlim(-0.6, blocks - 0.4)
    ax.set_xlabel("block removed alone (grey: barrier block, not a candidate)")
    ax.set_ylabel("calibration perplexity (log scale)")
    ax.set_title("Step 1: cost of removing each block from the dense model (red: removed by the search)",
                 fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(color="#d62728", label="removed by the search"), Patch(color="#1f77b4", label="kept")]
    if dense:
        handles.append(ax.get_legend_handles_labels()[0][0])
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, bbox_inches="tight")


def compare_plot(table: dict, path: str | os.PathLike) -> Path:
    """`sleb compare`: held-out perplexity against blocks removed (for branch units: the share of the blocks'
    parameters removed), one line per criterion, one panel per text."""
    plt = _pyplot()
    specs = table["evaluation"]["specs"]
    unit = table["unit"]
    by_params = "blocks_params" in table  # columns are shares of the blocks' parameters (branch units)
    x = "params_fraction" if by_params else "removed_blocks"
    fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs), 4), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        for metric in dict.fromkeys(r["metric"] for r in table["rows"]):
            rows = sorted((r for r in table["rows"] if r["metric"] == metric), key=lambda r: r[x])
            xs = [0] + [r[x] for r in rows]
            ys = [table["dense_eval_ppl"][spec]] + [r["eval_ppl"][spec] for r in rows]
            ax.plot(xs, ys, marker="o", label=metric)
        ax.set_yscale("log")
        if not by_params:
            ax.set_xlabel(f"blocks removed (of {table['num_blocks']})")
        else:
            for ratio in {r["ratio"] for r in table["rows"]}:  # the budgets asked for; points lie at or past them
                ax.axvline(ratio, color="#7f7f7f", linestyle=":", linewidth=1)
            ax.set_xlabel(f"share of the blocks' parameters removed ({unit} units)")
        ax.set_ylabel(f"perplexity on {spec} (test)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def healing_curve(report: dict, path: str | os.PathLike) -> Path:
    """Held-out perplexity (and the training KL) against healing steps, the kept state marked."""
    plt = _pyplot()
    entry = report["healing"]
    curve = entry.get("curve") or []
    if not curve:
        raise SlebError("the report's healing entry has no curve to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["heldout_ppl"] for c in curve], marker="o", color="#1f77b4", label="held-out slice perplexity")
    best = entry.get("best_step", 0)
    ax.axvline(best, color="#2ca02c", linestyle="--", linewidth=1, label=f"kept (step {best})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("perplexity on the held-out slice")
    trained = [(c["step"], c["train_kl"]) for c in curve if c.get("train_kl") is not None]
    if trained:
        kl_axis = ax.twinx()
        kl_axis.plot(*zip(*trained), color="#ff7f0e", alpha=0.7, label="training KL to the dense model")
        kl_axis.set_ylabel("KL (nats per token)")
        lines = ax.get_legend_handles_labels()
        more = kl_axis.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    else:
        ax.legend(fontsize=8)
    ax.set_title(f"Healing ({entry.get('params')}, {entry.get('trained_parameters', 0):,} parameters) on "
                 f"{entry.get('text')}", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, bbox_inches="tight")


PLOTS = {"calibration_ppl.png": calibration_curve}
# Drawn only when the run file has the entry they show (an order applied with --from-report has no steps).
OPTIONAL_PLOTS = {"scores_heatmap.png": ("steps", score_heatmap), "first_step_scores.png": ("steps", first_step_bars),
                  "healing_curve.png": ("healing", healing_curve)}


def plot_names(report: dict) -> list[str]:
    """The plots `plot_report` draws for this run file."""
    return [*PLOTS, *(name for name, (entry, _) in OPTIONAL_PLOTS.items() if report.get(entry))]


def plot_report(report: dict, folder: str | os.PathLike) -> dict[str, Path]:
    """Draw the run file's plots into `folder` (the calibration curve; the search's steps and the healing
    curve where the run file has them); returns
    file name -> path."""
    draw = {**PLOTS, **{name: plot for name, (_, plot) in OPTIONAL_PLOTS.items()}}
    return {name: draw[name](report, Path(folder) / name) for name in plot_names(report)}


def frontier_plot(table: dict, path: str | os.PathLike) -> Path:
    """The frontier (`sleb compare --target-speedup`): held-out perplexity against the measured speedup, one
    line per unit kind (and compensation), each starting at the dense model (1.0x); one panel per text."""
    plt = _pyplot()
    specs = table["evaluation"]["specs"]
    fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs), 4), squeeze=False)
    speeds = [1.0] + [r["measured_speedup"] for r in table["rows"]]
    margin = 0.08 * max(max(speeds) - min(speeds), 0.1)
    for ax, spec in zip(axes[0], specs):
        ax.plot([1.0], [table["dense_eval_ppl"][spec]], marker="*", markersize=12, color="black", linestyle="",
                label="dense")
        for unit, metric in dict.fromkeys((r["unit"], r["metric"]) for r in table["rows"]):
            rows = sorted((r for r in table["rows"] if (r["unit"], r["metric"]) == (unit, metric)),
                          key=lambda r: r["measured_speedup"])
            xs = [1.0] + [r["measured_speedup"] for r in rows]
            ys = [table["dense_eval_ppl"][spec]] + [r["eval_ppl"][spec] for r in rows]
            label = unit + metric.removeprefix("sleb")
            line, = ax.plot(xs, ys, marker="o", label=label)
            ax.errorbar(xs[1:], ys[1:], xerr=[r["measured_spread"] * r["measured_speedup"] for r in rows],
                        fmt="none", ecolor=line.get_color(), alpha=0.5)
            for r, x, y in zip(rows, xs[1:], ys[1:]):  # which target each point was searched for
                ax.annotate(f"{r['target_speedup']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=line.get_color())
        ax.set_yscale("log")
        # The points set the axis: a spread blown up by other work on the machine runs off it.
        ax.set_xlim(min(speeds) - margin, max(speeds) + margin)
        ax.set_xlabel(f"measured speedup at {table['speed_at']} (sleb bench, transformers)")
        ax.set_ylabel(f"perplexity on {spec} (test)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path, dpi=120)

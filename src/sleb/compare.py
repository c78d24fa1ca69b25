"""`sleb compare`: every criterion at every budget, on the same calibration windows and held-out text.

Each criterion searches once, up to the largest block count asked for; every smaller count is read
from the same search (the order's prefix, or the per-count set for criteria whose sets are not
nested). Each pruned variant is evaluated in place (`budgets.pruned_view`, no model copies) on the
test part of every evaluation spec, which must not overlap the calibration text. Writes
``compare.json``, ``compare.md`` and ``compare.png`` (perplexity against blocks removed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .arch import find_blocks
from .budgets import pruned_view
from .data import SOURCES, calibration, check_spec
from .errors import SlebError
from .evaluate import perplexity
from .metrics import removal_set
from .search import canonical_metric, search


def check_no_overlap(calib_spec: str, eval_specs: list[str]) -> None:
    """Evaluation uses a spec's test part and calibration its train part; a local file is one part."""
    for spec in eval_specs:
        check_spec(spec)
        if spec not in SOURCES and Path(spec).expanduser().resolve() == Path(calib_spec).expanduser().resolve():
            raise SlebError(f"evaluation text {spec} is the calibration file; a local file has no separate test part")


def counts_for_ratios(ratios: list[float], num_blocks: int) -> list[int]:
    from .cli import blocks_for_ratio

    for r in ratios:
        if not 0 < r < 1:
            raise SlebError(f"ratios must be in (0, 1), got {r}")
    return sorted({blocks_for_ratio(r, num_blocks) for r in ratios})


@torch.no_grad()
def run_compare(
    model,
    tokenizer,
    *,
    metrics: list[str],
    ratios: list[float],
    calib_spec: str,
    eval_specs: list[str],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    eval_seqlen: int | None = None,
    max_eval_windows: int | None = None,
    batch_size: int = 1,
    angular_tokens: str = "last",
    out_dir: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Search with each criterion and evaluate every (criterion, count) on every eval spec."""
    metrics = [canonical_metric(m) for m in metrics]
    check_no_overlap(calib_spec, eval_specs)
    num_blocks = len(find_blocks(model).modules)
    counts = counts_for_ratios(ratios, num_blocks)
    if counts[-1] > num_blocks - 2:
        raise SlebError(f"ratio {max(ratios)} removes {counts[-1]} of {num_blocks} blocks: more than the candidates")
    windows = calibration(tokenizer, calib_spec, nsamples=nsamples, seqlen=seqlen, seed=seed)
    eval_seqlen = eval_seqlen or seqlen

    def evaluate(removed: list[int]) -> dict[str, float]:
        with pruned_view(model, removed):
            return {spec: perplexity(model, tokenizer, spec, eval_seqlen, batch_size=batch_size,
                                     max_windows=max_eval_windows, progress=False).ppl for spec in eval_specs}

    started = time.perf_counter()
    dense = evaluate([])
    log(f"dense: {dense}")
    rows = []
    dense_calibration_ppl = None
    for metric in metrics:
        t0 = time.perf_counter()
        result = search(model, windows, counts[-1], metric=metric, batch_size=batch_size, seed=seed,
                        angular_tokens=angular_tokens, progress=progress)
        search_seconds = time.perf_counter() - t0
        dense_calibration_ppl = result.calibration_ppl(0)
        for count in counts:
            removed = removal_set(result, count)
            ppl = evaluate(removed)
            rows.append({
                "metric": metric, "removed_blocks": count, "ratio": count / num_blocks, "removed": sorted(removed),
                "calibration_ppl": result.calibration_ppl(count), "eval_ppl": ppl, "search_seconds": search_seconds,
            })
            log(f"{metric} {count}: removed {sorted(removed)} calib {result.calibration_ppl(count):.3f} eval {ppl}")
    table = {
        "num_blocks": num_blocks,
        "calibration": {"spec": calib_spec, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
        "evaluation": {"specs": eval_specs, "seqlen": eval_seqlen, "max_windows": max_eval_windows,
                       "part": "test (disjoint from the calibration train part)"},
        "dense_calibration_ppl": dense_calibration_ppl,
        "dense_eval_ppl": dense,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    if out_dir is not None:
        write_outputs(table, Path(out_dir))
    return table


def markdown(table: dict) -> str:
    specs = table["evaluation"]["specs"]
    counts = sorted({r["removed_blocks"] for r in table["rows"]})
    n = table["num_blocks"]
    lines = [
        f"Held-out perplexity (test part; {table['evaluation']['seqlen']}-token windows) after removing blocks of "
        f"{n}; calibration: {table['calibration']['spec']}, {table['calibration']['nsamples']} x "
        f"{table['calibration']['seqlen']} tokens, seed {table['calibration']['seed']}.",
        "",
    ]
    header = "| criterion | " + " | ".join(f"{c} blocks ({c / n:.0%}) {s}" for c in counts for s in specs) + " |"
    lines += [header, "|" + "---|" * (1 + len(counts) * len(specs))]
    lines.append("| dense | " + " | ".join(f"{table['dense_eval_ppl'][s]:.2f}" for _ in counts for s in specs) + " |")
    for metric in dict.fromkeys(r["metric"] for r in table["rows"]):
        by = {r["removed_blocks"]: r for r in table["rows"] if r["metric"] == metric}
        lines.append(f"| {metric} | " + " | ".join(f"{by[c]['eval_ppl'][s]:.2f}" for c in counts for s in specs) + " |")
    lines += ["", "Removed blocks:", ""]
    for r in table["rows"]:
        lines.append(f"- {r['metric']} @ {r['removed_blocks']}: {r['removed']} (calibration ppl {r['calibration_ppl']:.2f})")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SlebError("the compare plot needs matplotlib: pip install 'sleb[plot]'") from err
    specs = table["evaluation"]["specs"]
    fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs), 4), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        for metric in dict.fromkeys(r["metric"] for r in table["rows"]):
            rows = sorted((r for r in table["rows"] if r["metric"] == metric), key=lambda r: r["removed_blocks"])
            xs = [0] + [r["removed_blocks"] for r in rows]
            ys = [table["dense_eval_ppl"][spec]] + [r["eval_ppl"][spec] for r in rows]
            ax.plot(xs, ys, marker="o", label=metric)
        ax.set_yscale("log")
        ax.set_xlabel(f"blocks removed (of {table['num_blocks']})")
        ax.set_ylabel(f"perplexity on {spec} (test)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(table: dict, out: Path) -> None:
    from .outputs import atomic_write_text

    atomic_write_text(out / "compare.json", json.dumps({"format": "sleb-compare/1", **table}, indent=2))
    atomic_write_text(out / "compare.md", markdown(table))
    plot(table, out / "compare.png")

"""`sleb compare`: every criterion at every budget, on the same calibration windows and held-out text.

Each criterion searches once, up to the largest block count asked for; every smaller count is read
from the same search (the order's prefix, or the per-count set for criteria whose sets are not
nested). Each pruned variant is evaluated in place (`sleb.export.pruned_view`, no model copies) on the
test part of every evaluation spec, which must not overlap the calibration text. Writes
``compare.json``, ``compare.md`` and ``compare.png`` (perplexity against blocks removed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .arch import find_blocks
from .config import Budget
from .compensate import compensated
from .data import calibration, check_no_overlap
from .errors import BadInput, SlebError
from .evaluate import heldout_perplexity
from .plots import compare_plot
from .criteria import canonical_metric
from .config import SearchOptions
from .result import removal_set
from .search import search


def check_plan(metrics: list[str], ratios: list[float], eval_specs: list[str]) -> None:
    """Refuse, before anything loads, a comparison whose table would be empty or whose ratios mean nothing."""
    for values, option in ((metrics, "--metrics"), (ratios, "--ratio"), (eval_specs, "--eval")):
        if not values:
            raise BadInput(f"{option} lists nothing: give at least one value (comma-separated)")
    counts_for_ratios(ratios, 1)


def counts_for_ratios(ratios: list[float], num_blocks: int) -> list[int]:
    budgets = [Budget(ratio=r) for r in ratios]
    for budget in budgets:
        budget.validate()
    return sorted({budget.count(num_blocks) for budget in budgets})


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
    eval_seqlen: int | None = None,
    max_eval_windows: int | None = None,
    options: SearchOptions = SearchOptions(),
    out_dir: str | Path | None = None,
    compensation: str | None = None,
    compensate_ridge: float | str = "auto",
    progress: bool = True,
    log=print,
) -> dict:
    """Search with each criterion and evaluate every (criterion, count) on every eval spec.

    With `compensation` (`linear`, `linear-cosine`), every (criterion, count) also gets a row
    `criterion+compensation`: the same blocks with the compensation fitted on the calibration
    windows (`sleb.compensate`), evaluated, then taken off again.
    """
    metrics = [canonical_metric(m) for m in metrics]
    check_plan(metrics, ratios, eval_specs)
    check_no_overlap(calib_spec, eval_specs)
    num_blocks = len(find_blocks(model).modules)
    counts = counts_for_ratios(ratios, num_blocks)
    candidates = len(options.candidates(range(num_blocks)))
    if counts[-1] > candidates:
        raise SlebError(f"ratio {max(ratios)} removes {counts[-1]} of {num_blocks} blocks: more than the {candidates} "
                        "candidates")
    windows = calibration(tokenizer, calib_spec, nsamples=nsamples, seqlen=seqlen, seed=options.seed)
    eval_seqlen = eval_seqlen or seqlen

    def evaluate(removed: list[int]) -> dict[str, float]:
        return heldout_perplexity(model, tokenizer, eval_specs, removed, eval_seqlen, batch_size=options.batch_size,
                                  max_windows=max_eval_windows)

    started = time.perf_counter()
    dense = evaluate([])
    log(f"dense: {dense}")
    rows = []
    dense_calibration_ppl = None
    for metric in metrics:
        t0 = time.perf_counter()
        result = search(model, windows, counts[-1], metric=metric, batch_size=options.batch_size,
                        early_barrier=options.early_barrier, latter_barrier=options.latter_barrier,
                        seed=options.seed, angular_tokens=options.angular_tokens, progress=progress)
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
            if compensation is not None:
                with compensated(model, windows, removed, objective=compensation, ridge=compensate_ridge,
                                 batch_size=options.batch_size, seed=options.seed, progress=False,
                                 calibration_ppl_plain=result.calibration_ppl(count)) as comp:
                    fitted = evaluate(removed)
                rows.append({**rows[-1], "metric": f"{metric}+{compensation}", "calibration_ppl": comp.calibration_ppl,
                             "eval_ppl": fitted, "fit_seconds": comp.seconds})
                log(f"{metric}+{compensation} {count}: calib {comp.calibration_ppl:.3f} eval {fitted}")
    table = {
        "num_blocks": num_blocks,
        "calibration": {"spec": calib_spec, "nsamples": nsamples, "seqlen": seqlen, "seed": options.seed},
        "compensation": compensation,
        "barriers": {"early": options.early_barrier, "latter": options.latter_barrier},
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


def write_outputs(table: dict, out: Path) -> None:
    from .outputs import atomic_write_text

    atomic_write_text(out / "compare.json", json.dumps({"format": "sleb-compare/1", **table}, indent=2))
    atomic_write_text(out / "compare.md", markdown(table))
    compare_plot(table, out / "compare.png")

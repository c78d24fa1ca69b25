"""The frontier: `sleb compare MODEL -o DIR --speed-at SPEC --target-speedup 1.1,1.3 --unit block,attention,sublayer`.

For every unit kind and every target speedup S, one budgeted search (`sleb.budgets.budgeted_search`) on the
same calibration windows finds the least damaging removal whose speedup in the measured cost model
(`sleb.timing`, `--speed-at`) reaches S: branch units (`sublayer`, `attention`) by `--unit-score
per-second` with its swap refinement, whole blocks by plain SLEB loss; a larger target's greedy search goes
on from the steps a smaller one took (they are the same steps). The dense model is timed once; that one
cost table prices every row. Each result is then evaluated on the test part of every `--eval` spec
and, pruned in memory exactly as `sleb prune` saves it (`sleb.units.remove_units`), timed with `sleb
bench`'s transformers benchmark (`sleb.bench.bench`) against the dense model at the shape of
`--speed-at` (`bench_config`): the measured speedup, its spread and the bench's FLOP ideal sit beside
the cost model's prediction.

With `compensation`, every row also gets a row `sleb+linear`: the same removal with the compensation
fitted on the calibration windows. It folds into the kept weights, so its model has the plain row's
shapes and the plain row's measured speed. With `healing` (`sleb compare --heal`), every row also gets a
healed row (`sleb+lora`, or `sleb+linear+lora` on top of the compensation): a copy of the model with the
removal taken out is healed as `sleb prune --heal` would heal it (`sleb.heal.heal_removal`, same budget per
row; the dense model's targets are computed once for all rows). LoRA merges into the kept weights, so the
healed model also runs at the plain row's measured speed.

Writes ``frontier.json``, ``frontier.md`` and ``frontier.png`` (held-out perplexity against measured
speedup, one line per unit kind, the dense model at 1.0x).
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .arch import find_blocks
from .bench import BenchConfig, bench, check_inputs
from .budgets import budgeted_search
from .compensate import compensated
from .data import calibration
from .errors import BadInput, SlebError
from .evaluate import heldout_perplexity
from .heal import Teacher, dense_teacher, heal_removal, heal_windows
from .outputs import atomic_write_text
from .plots import frontier_plot
from .settings import UNITS, Budget, Healing, Refinement, SearchOptions, parse_speed_at
from .sizes import MeasuredCost, Sizer
from .timing import check_speed_at, measure_costs
from .units import remove_units, unit_kind

# What the frontier writes in DIR (`sleb compare` without --target-speedup writes compare.*).
FRONTIER_FILES = ("frontier.json", "frontier.md", "frontier.png")
# New tokens `sleb bench` makes after the N-token prompt of `--speed-at generation:N`.
GEN_TOKENS = 32


def check_frontier(units: Sequence[str], targets: Sequence[float], speed_at: str | None,
                   metrics: Sequence[str] | None) -> None:
    """Refuse (BadInput, one line, before anything loads) a frontier that means nothing: no or repeated units
    or targets, a target of 1 or less, no --speed-at, criteria other than sleb."""
    if not units:
        raise BadInput("--unit lists nothing: give at least one of " + ", ".join(UNITS))
    for unit in units:
        if unit not in UNITS:
            raise BadInput(f"unknown unit {unit!r} in --unit; choose from {', '.join(UNITS)}")
    if not targets:
        raise BadInput("--target-speedup lists nothing: give at least one speedup (comma-separated)")
    for target in targets:
        if not 1 < target < math.inf:  # also NaN
            raise BadInput(f"--target-speedup {target:g} must be a finite number above 1 (the dense model's speed)")
    for values, flag in ((list(units), "--unit"), (list(targets), "--target-speedup")):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise BadInput(f"{flag} lists {', '.join(twice)} more than once")
    if speed_at is None:
        raise BadInput("--target-speedup in sleb compare is a measured speedup: give --speed-at prefill:N or "
                       "generation:N")
    parse_speed_at(speed_at)
    if metrics is not None and list(metrics) != ["sleb"]:
        raise BadInput("--target-speedup searches with sleb (blocks by loss, units by loss per second saved); "
                       "--metrics applies to --ratio comparisons")


def check_unit_score(unit_score: str | None, units: Sequence[str]) -> None:
    """The frontier ranks branch units per second saved and blocks by loss: a --unit-score given (None: not
    given) other than per-second, or per-second with whole blocks only, is refused."""
    if unit_score is None:
        return
    if unit_score != "per-second":
        raise BadInput(f"--target-speedup ranks branch units by loss per second saved (per-second) and blocks by "
                       f"loss; not --unit-score {unit_score}")
    if all(unit in UNITS and unit_kind(unit).whole_blocks for unit in units):
        raise BadInput("--unit-score per-second ranks attention or sublayer units; --unit block has none "
                       "(blocks are searched by loss)")


def bench_config(speed_at: str, on_cuda: bool) -> BenchConfig:
    """`sleb bench`'s workload at the shape of `speed_at`: one prompt pass of N tokens (`prefill:N`), or
    `GEN_TOKENS` new tokens after an N-token prompt, batch 1 (`generation:N`; as `sleb bench --gen-prompt N
    --gen-tokens 32 --gen-batch 1`, the static KV cache on CUDA as its default)."""
    mode, tokens = parse_speed_at(speed_at)
    if mode == "prefill":
        return BenchConfig(prefill_batch=1, prefill_len=tokens, generation=False)
    return BenchConfig(gen_batch=1, gen_prompt=tokens, gen_tokens=GEN_TOKENS, prefill=False,
                       cache="static" if on_cuda else "dynamic")


def check_shapes(name: str, model_config, tokenizer, speed_at: str, on_cuda: bool) -> None:
    """From the model's config and tokenizer, before the weights load: --speed-at and the bench at its shape
    fit the model's context (one line)."""
    check_speed_at(speed_at, model_config, name)
    try:
        check_inputs([(name, tokenizer, model_config)], bench_config(speed_at, on_cuda))
    except BadInput:
        raise
    except SlebError as err:  # known before loading: bad input
        raise BadInput(f"--speed-at {speed_at}: {err}") from err


def measure_speed(model, tokenizer, pruned, speed_at: str, progress: Callable[[str], None] | None = None) -> dict:
    """The pruned model against `model` with `sleb bench` at the shape of `speed_at` (`bench_config`): the
    measured speedup, its spread (the two models' spreads added), tokens/s and the bench's FLOP ideal."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    config = bench_config(speed_at, on_cuda)
    # generation:N is one step at N tokens of context: the bench's decode (its generation figure has the
    # N-token prompt pass inside, which at N = 1024 and 32 new tokens is most of it).
    what = "prefill" if config.prefill else "decode"
    result = bench([("dense", model, tokenizer), ("pruned", pruned, tokenizer)], config, progress=progress)
    dense, cut = result.models
    dense_timing, cut_timing = getattr(dense, what), getattr(cut, what)
    return {"measured_speedup": getattr(cut, f"{what}_speedup"),
            "measured_spread": dense_timing.spread + cut_timing.spread,
            "ideal_speedup": cut.prefill_ideal_speedup if config.prefill else cut.generation_ideal_speedup,
            "dense_tokens_per_s": getattr(dense, f"{what}_tokens_per_s"),
            "tokens_per_s": getattr(cut, f"{what}_tokens_per_s"), "bench_machine": result.machine}


def max_speedups(model, measured: MeasuredCost, units: Sequence[str], options: SearchOptions,
                 calib: torch.Tensor) -> dict[str, float]:
    """The most each unit kind can reach in the cost model: every candidate removed but one (a budget that
    removes every candidate is refused by the search), each unit saving at most its cost and its block's
    rest (as `sleb.budgets.budgeted_search` bounds it)."""
    best = {}
    for unit in units:
        kind = unit_kind(unit)
        space = kind.space(len(find_blocks(model).modules))
        sizer = Sizer.of(model, calib.shape[1], kind.branches(model, calib[:1]), measured=measured)
        rest = sizer.block_rest_cost if len(kind.candidate_branches) == 2 and sizer.block_rest_cost else None
        savings = sorted(sizer.block_flops[u] + (rest[space.block_of(u)] if rest else 0.0)
                         for u in space.candidates(range(space.count), replace(options, unit=unit)))
        best[unit] = sizer.dense_flops / (sizer.dense_flops - sum(savings[1:]))
    return best


def unit_options(options: SearchOptions, unit: str) -> SearchOptions:
    """The search of one unit kind: branch units by loss per second saved, blocks by loss."""
    return replace(options, unit=unit, unit_score="loss" if unit_kind(unit).whole_blocks else "per-second")


@torch.no_grad()
def frontier_model(
    model,
    tokenizer,
    *,
    units: Sequence[str],
    targets: Sequence[float],
    calib_spec: str,
    eval_specs: list[str],
    nsamples: int,
    seqlen: int,
    options: SearchOptions,
    max_eval_windows: int | None = None,
    eval_seqlen: int | None = None,
    refine_seconds: float | None = None,
    compensation: str | None = None,
    healing: Healing | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Search, evaluate and time every (unit kind, target speedup) on a loaded model (see the module
    docstring); `options.speed_at` names the shape. Returns the table (`markdown` renders it)."""
    check_frontier(units, targets, options.speed_at, None)
    eval_seqlen = eval_seqlen or seqlen
    started = time.perf_counter()
    windows = calibration(tokenizer, calib_spec, nsamples=nsamples, seqlen=seqlen, seed=options.seed)
    # One table for every row: each block, attention and MLP unit timed once on the dense model.
    log(f"timing every block and unit at {options.speed_at} (the measured cost model)")
    branches = unit_kind("sublayer").branches(model, windows[:1])
    measured = measure_costs(model, options.speed_at, branches)
    reachable = max_speedups(model, measured, units, options, windows)
    for unit in units:
        if reachable[unit] < max(targets) - 1e-12:
            raise BadInput(f"--target-speedup {max(targets):g} cannot be met with --unit {unit}: removing all "
                           f"candidates but one gives at most {reachable[unit]:.3f}x (measured speedup at "
                           f"{options.speed_at}; barriers: first {options.early_barrier}, last "
                           f"{options.latter_barrier})")

    def evaluate(removed: list[int], unit: str) -> dict[str, float]:
        return heldout_perplexity(model, tokenizer, eval_specs, removed, eval_seqlen, batch_size=options.batch_size,
                                  max_windows=max_eval_windows, unit=unit)

    dense = evaluate([], "block")
    log(f"dense: {dense}")
    teacher = None
    if healing is not None and healing.wanted:
        heal_set = heal_windows(tokenizer, calib_spec, healing, seqlen, options.seed)
        log(f"healing every row on {heal_set[0].shape[0]} x {heal_set[0].shape[1]} tokens of {calib_spec}; the dense "
            f"model's top-{healing.top_k} next-token log-probs first (once, for all rows)")
        teacher = dense_teacher(model, heal_set, healing, batch_size=options.batch_size, progress=progress)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sleb-frontier-") as scratch:  # the steps of each unit kind
        for unit in units:
            search_options = unit_options(options, unit)
            space = unit_kind(unit).space(len(find_blocks(model).modules))
            # The greedy steps are the same for every target of a unit kind: each larger target's search goes on
            # from the steps the smaller one took (a checkpoint), then refines its own set.
            steps = Path(scratch) / f"{unit}.json"
            for target in sorted(targets):
                t0 = time.perf_counter()
                result = budgeted_search(model, windows, Budget(target_speedup=target, speedup_context=seqlen),
                                         options=search_options, progress=progress, measured=measured,
                                         checkpoint=steps, refine=Refinement(seconds=refine_seconds))
                search_seconds = time.perf_counter() - t0
                removed = sorted(result.removed)
                ppl = evaluate(removed, unit)
                pruned = remove_units(copy.deepcopy(model), removed, unit)
                speed = measure_speed(model, tokenizer, pruned, options.speed_at)
                del pruned
                count = len(removed)
                row = {"unit": unit, "unit_score": search_options.unit_score, "target_speedup": target,
                       "metric": "sleb", "removed": removed, "labels": [space.label(u) for u in removed],
                       "removed_units": count, "parameters_after": result.budget["parameters_after"],
                       "predicted_speedup": result.budget["predicted_speedup"], **speed,
                       "calibration_ppl": result.calibration_ppl(count), "eval_ppl": ppl,
                       "search_seconds": search_seconds, "reason": result.budget["reason"]}
                rows.append(row)
                log(f"{unit} {target:g}x: removed {row['labels']} predicted {row['predicted_speedup']:.3f}x measured "
                    f"{row['measured_speedup']:.3f}x (±{row['measured_spread']:.0%})"
                    f"{', below the target by more than the spread' if missed(row) else ''}; eval {ppl}")
                base, comp = row, None  # what a heal starts from: the plain removal, or the compensated one
                if compensation is not None:
                    with compensated(model, windows, removed, objective=compensation, batch_size=options.batch_size,
                                     seed=options.seed, progress=False, calibration_ppl_plain=row["calibration_ppl"],
                                     unit=unit) as comp:
                        fitted = evaluate(removed, unit)
                        start = copy.deepcopy(model) if teacher is not None else None
                    base = {**row, "metric": f"sleb+{compensation}", "calibration_ppl": comp.calibration_ppl,
                            "eval_ppl": fitted, "fit_seconds": comp.seconds}
                    rows.append(base)
                    log(f"{unit} {target:g}x +{compensation}: eval {fitted}")
                elif teacher is not None:
                    start = copy.deepcopy(model)
                if teacher is not None:
                    rows.append(_healed_row(start, tokenizer, base, teacher, healing, comp, calib_spec, eval_specs,
                                            eval_seqlen, max_eval_windows, options, progress, log))
                    del start
    table = {
        "num_blocks": len(find_blocks(model).modules),
        "units": list(units),
        "targets": sorted(targets),
        "speed_at": options.speed_at,
        "cost_table": measured.to_dict(),
        "bench": {"workload": asdict(bench_config(options.speed_at, next(model.parameters()).device.type == "cuda")),
                  "how": "sleb bench (transformers), the dense model and each pruned one in alternation"},
        "calibration": {"spec": calib_spec, "nsamples": nsamples, "seqlen": seqlen, "seed": options.seed},
        "compensation": compensation,
        "healing": asdict(healing) if teacher is not None else None,
        "barriers": {"early": options.early_barrier, "latter": options.latter_barrier},
        "refine_seconds": refine_seconds,
        "evaluation": {"specs": eval_specs, "seqlen": eval_seqlen, "max_windows": max_eval_windows,
                       "part": "test (disjoint from the calibration train part)"},
        "dense_eval_ppl": dense,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    if out_dir is not None:
        write_frontier(table, Path(out_dir))
    return table


def _healed_row(model, tokenizer, base: dict, teacher: Teacher, healing: Healing, comp, calib_spec: str,
                eval_specs: list[str], eval_seqlen: int, max_eval_windows: int | None, options: SearchOptions,
                progress: bool, log: Callable[[str], None]) -> dict:
    """`base`'s removal taken out of `model` (a copy, compensated when `comp` is set) and healed
    (`heal_removal`); the row of `base` with the healed model's held-out perplexity and the heal's record.
    The measured speed stays `base`'s: the adapters are merged, the shapes are the plain removal's."""
    unit, removed = base["unit"], base["removed"]
    record = heal_removal(model, removed, unit, teacher, healing,
                          compensation=None if comp is None else comp.to_dict(), seed=options.seed, text=calib_spec,
                          progress=progress)
    ppl = heldout_perplexity(model, tokenizer, eval_specs, [], eval_seqlen, batch_size=options.batch_size,
                             max_windows=max_eval_windows)
    log(f"{unit} {base['target_speedup']:g}x {base['metric']}+{healing.params}: {record.steps} steps in "
        f"{record.seconds:.0f} s; eval {ppl}")
    return {**base, "metric": f"{base['metric']}+{healing.params}", "eval_ppl": ppl,
            "heal": {key: getattr(record, key) for key in (
                "steps", "best_step", "stopped_by", "seconds", "teacher_seconds", "trained_parameters",
                "heldout_ppl_before", "heldout_ppl_after")}}


def missed(row: dict) -> bool:
    """Whether the measured speedup falls short of the target by more than the measurement's spread."""
    return row["measured_speedup"] * (1 + row["measured_spread"]) < row["target_speedup"]


def markdown(table: dict) -> str:
    """One row per (unit, target[, compensation]): held-out perplexity beside predicted, measured and ideal
    speedups, and what was removed."""
    specs = table["evaluation"]["specs"]
    workload = table["bench"]["workload"]
    shape = (f"a {workload['prefill_len']}-token prompt pass" if workload["prefill"] else
             f"decode tokens/s: the {workload['gen_tokens'] - 1} new tokens after the first, after a "
             f"{workload['gen_prompt']}-token prompt ({workload['cache']} cache)")
    lines = [
        f"The frontier at {table['speed_at']}: held-out perplexity (test part; {table['evaluation']['seqlen']}-token "
        f"windows) against speedup. Predicted: the cost model timed on the dense model; measured: `sleb bench` "
        f"in transformers ({shape}, ± half the range of both models' repeats); ideal: the FLOP ratio. "
        f"Calibration: {table['calibration']['spec']}, {table['calibration']['nsamples']} x "
        f"{table['calibration']['seqlen']} tokens, seed {table['calibration']['seed']}.",
        "",
        "| unit | target | criterion | removed | predicted | measured | ideal | " + " | ".join(specs) + " |",
        "|" + "---|" * (7 + len(specs)),
        "| dense | - | - | 0 | 1.00x | 1.00x | 1.00x | "
        + " | ".join(f"{table['dense_eval_ppl'][s]:.2f}" for s in specs) + " |",
    ]
    for r in table["rows"]:
        short = " (below target)" if missed(r) else ""
        lines.append(f"| {r['unit']} | {r['target_speedup']:g}x | {r['metric']} | {r['removed_units']} | "
                     f"{r['predicted_speedup']:.2f}x | {r['measured_speedup']:.2f}x ±{r['measured_spread']:.0%}"
                     f"{short} | "
                     f"{r['ideal_speedup']:.2f}x | " + " | ".join(f"{r['eval_ppl'][s]:.2f}" for s in specs) + " |")
    healed = [r for r in table["rows"] if "heal" in r]
    if healed:
        h = table["healing"]
        budget = " and ".join(b for b in (f"{h['minutes']:g} minutes" if h["minutes"] else "",
                                          f"{h['steps']} steps" if h["steps"] else "") if b)
        lines += ["", f"Healed rows (+{h['params']}): each removal healed as `sleb prune --heal {h['params']}` would, "
                      f"at most {budget} each (the dense model's pass included), on {h['windows']} windows of "
                      f"{h['seqlen'] or table['calibration']['seqlen']} tokens of {table['calibration']['spec']}; "
                      "steps taken: " + ", ".join(f"{r['unit']} @ {r['target_speedup']:g}x {r['heal']['steps']}"
                                                  for r in healed) + "."]
    lines += ["", "Removed:", ""]
    for r in table["rows"]:
        if r["metric"] == "sleb":
            lines.append(f"- {r['unit']} @ {r['target_speedup']:g}x: {', '.join(r['labels'])}")
    return "\n".join(lines) + "\n"


def write_frontier(table: dict, out: Path) -> None:
    atomic_write_text(out / "frontier.json", json.dumps({"format": "sleb-frontier/1", **table}, indent=2))
    atomic_write_text(out / "frontier.md", markdown(table))
    frontier_plot(table, out / "frontier.png")

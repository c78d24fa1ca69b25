"""`sleb compare`: every criterion at every budget, on the same calibration windows and held-out text.

Each criterion searches once, up to the largest block count asked for; every smaller count is read
from the same search (the order's prefix, or the per-count set for criteria whose sets are not
nested). Each pruned variant is evaluated in place (`sleb.export.pruned_view`, no model copies) on the
test part of every evaluation spec, which must not overlap the calibration text. Writes
``compare.json``, ``compare.md`` and ``compare.png`` (perplexity against blocks removed).

With branch units (`SearchOptions.unit` `sublayer` or `attention`, `sleb.units`) a ratio R means R x the
blocks' parameters, as `sleb prune --unit ... --ratio R` (`sleb.budgets.ratio_params`): each criterion
searches once until the largest ratio's parameters are gone (SLEB stops there; a one-shot criterion
ranks enough units that any order of them would do), and each ratio takes the fewest removals of that
order whose parameters reach it. Those rows are keyed by the ratio asked for and record the units
removed (ids and labels such as ``7.attn``) and their parameters; the plot's x axis is that share.

With `CompareJob.target_speedups` and `--speed-at`, the job draws the frontier instead (`sleb.frontier`):
held-out perplexity against measured speedup, per unit kind and target speedup.

`compare_model` compares on a loaded model; `run_compare` runs a whole `CompareJob` (the command's
checks, loading, the comparison and its files), as `sleb compare` does.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import data, loading
from .arch import find_blocks
from .budgets import first_meeting, fmt_params, ratio_params, removal_bounds
from .settings import COMPENSATIONS, Budget, Calibration, Healing, _positive_int
from .compensate import compensated
from .data import calibration, check_no_overlap
from .errors import BadInput, SlebError
from .evaluate import heldout_perplexity
from .refine import check_seconds
from .frontier import FRONTIER_FILES, check_frontier, check_shapes, check_unit_score, frontier_model
from .heal import heal_windows
from .outputs import atomic_write_text, check_output_files
from .plots import compare_plot
from .criteria import canonical_metric, check_unit_support, get_criterion
from .settings import SearchOptions
from .result import SearchResult, removal_set
from .search import search
from .sizes import Sizer
from .units import UnitSpace, unit_kind


# The ratios `sleb compare` compares at when --ratio is not given.
DEFAULT_RATIOS = (0.1, 0.2, 0.3)
# The criteria `sleb compare` runs when --metrics is not given (with branch units: those of them that rank units).
DEFAULT_METRICS = ("sleb", "cosine", "angular", "ppl-oneshot", "last")


def default_metrics(options: SearchOptions = SearchOptions()) -> list[str]:
    """`DEFAULT_METRICS`, less those that cannot rank `options.unit` units by `options.unit_score`, so the
    plain `sleb compare --unit sublayer` runs; a criterion named in --metrics is still refused."""
    kept = []
    for metric in DEFAULT_METRICS:
        try:
            check_unit_support(metric, options.unit, options.unit_score)
        except BadInput:
            continue
        kept.append(metric)
    return kept


def check_plan(metrics: list[str], ratios: list[float], eval_specs: list[str],
               options: SearchOptions = SearchOptions()) -> None:
    """Refuse, before anything loads, a comparison whose table would be empty, whose ratios mean nothing, or
    whose criteria cannot rank `options.unit` (or `options.unit_score`)."""
    for values, option in ((metrics, "--metrics"), (ratios, "--ratio"), (eval_specs, "--eval")):
        if not values:
            raise BadInput(f"{option} lists nothing: give at least one value (comma-separated)")
    counts_for_ratios(ratios, 1)
    for metric in metrics:
        check_unit_support(metric, options.unit, options.unit_score, flag="--metrics")


def counts_for_ratios(ratios: list[float], num_blocks: int) -> list[int]:
    budgets = [Budget(ratio=r) for r in ratios]
    for budget in budgets:
        budget.validate()
    return sorted({budget.count(num_blocks) for budget in budgets})


@dataclass(frozen=True)
class BlockColumns:
    """The table's columns for whole blocks: one per block count (each ratio rounded up, as the paper)."""

    num_blocks: int
    counts: list[int]
    # How tables of this kind of column read (`markdown`): the row field columns are keyed by, and headings.
    key = "removed_blocks"
    removed_heading = "Removed blocks:"

    @classmethod
    def of(cls, model, ratios: list[float], options: SearchOptions, context: int) -> "BlockColumns":
        """One column per block count; a largest ratio beyond the candidates is refused."""
        num_blocks = len(find_blocks(model).modules)
        columns = cls(num_blocks, counts_for_ratios(ratios, num_blocks))
        candidates = len(options.candidates(range(num_blocks)))
        if columns.size > candidates:
            raise SlebError(f"ratio {max(ratios)} removes {columns.size} of {num_blocks} blocks: more than the "
                            f"{candidates} candidates")
        return columns

    def table_fields(self, options: SearchOptions) -> dict:
        return {}

    @staticmethod
    def title(key: float, table: dict) -> str:
        """`3 blocks (50%)`."""
        return f"{key} blocks ({key / table['num_blocks']:.0%})"

    @staticmethod
    def what(table: dict) -> str:
        return f"blocks of {table['num_blocks']}"

    @staticmethod
    def intro(table: dict) -> list[str]:
        return []

    @staticmethod
    def removed_line(row: dict, table: dict) -> str:
        """What a row removed: `2: [3, 4]`."""
        return f"{row['removed_blocks']}: {row['removed']}"

    @property
    def size(self) -> int:
        """Removals each criterion's search is asked for."""
        return self.counts[-1]

    def stop_when(self) -> Callable[[SearchResult], bool] | None:
        return None

    def cells(self, result: SearchResult) -> Iterator[tuple[int, dict, str]]:
        """(removal count, the row's own fields, a name for the log) for every column."""
        for count in self.counts:
            yield count, {"removed_blocks": count, "ratio": count / self.num_blocks}, str(count)


@dataclass(frozen=True)
class UnitColumns:
    """The table's columns for branch units: one per ratio, R x the blocks' parameters (`ratio_params`)."""

    space: UnitSpace
    sizer: Sizer
    blocks_params: int
    goals: dict[float, float]  # ratio -> parameters its removals must reach
    size: int  # removals that reach the largest goal in any order of the candidates
    key = "ratio"
    removed_heading = "Removed units:"

    @classmethod
    def of(cls, model, ratios: list[float], options: SearchOptions, context: int) -> "UnitColumns":
        """The columns of `model`; a largest ratio that even every candidate unit cannot reach is refused."""
        kind = unit_kind(options.unit)
        space = kind.space(len(find_blocks(model).modules))
        sizer = Sizer.of(model, context, kind.branches(model))
        goals = {r: ratio_params(model, r)[0] for r in sorted(set(ratios))}
        blocks_params = ratio_params(model, 1.0)[1]
        cands = space.candidates(range(space.count), options)
        largest = max(goals)
        bounds = removal_bounds([sizer.unit_sizes[u] for u in cands], sizer.dense_params,
                                sizer.dense_params - goals[largest])
        if bounds is None:
            raise SlebError(f"--ratio {largest} of the blocks' {fmt_params(blocks_params)} parameters cannot be met: "
                            f"removing every candidate {kind.noun} removes only "
                            f"{fmt_params(sizer.removed_params(cands))}")
        return cls(space, sizer, blocks_params, goals, bounds[1])

    def table_fields(self, options: SearchOptions) -> dict:
        return {"unit_score": options.unit_score, "blocks_params": self.blocks_params}

    @staticmethod
    def title(key: float, table: dict | None = None) -> str:
        """`20% of block params`."""
        return f"{key * 100:g}% of block params"

    @staticmethod
    def what(table: dict) -> str:
        return f"{table['unit']} units of {table['num_blocks']} blocks"

    @staticmethod
    def intro(table: dict) -> list[str]:
        return [f"A column is a share of the blocks' {fmt_params(table['blocks_params'])} parameters: each "
                "criterion removes the fewest units of its order that reach it.", ""]

    @classmethod
    def removed_line(cls, row: dict, table: dict) -> str:
        """The ratio, count, parameters and labels of what a row removed."""
        count = row["removed_units"]
        return (f"{cls.title(row['ratio'])}: {count} unit{'s' * (count != 1)}, "
                f"{fmt_params(row['params_removed'])} parameters ({row['params_fraction']:.1%} of the blocks'): "
                f"{', '.join(row['labels'])}")

    def reached(self, ratio: float) -> Callable[[list[int]], bool]:
        return lambda removed: self.sizer.removed_params(removed) >= self.goals[ratio]

    def stop_when(self) -> Callable[[SearchResult], bool]:
        """For a step-wise search: stop once the largest ratio's parameters are gone."""
        largest = self.reached(max(self.goals))
        return lambda result: largest(result.removed)

    def cells(self, result: SearchResult) -> Iterator[tuple[int, dict, str]]:
        """Per ratio: the fewest removals of `result` whose parameters reach it, and what they are."""
        for ratio in self.goals:
            count = first_meeting(result, self.reached(ratio))
            if count is None:
                raise SlebError(f"{result.metric} removed {len(result.removed)} {self.space.kind} units, short of "
                                f"--ratio {ratio} of the blocks' {fmt_params(self.blocks_params)} parameters")
            removed = sorted(removal_set(result, count))
            params = self.sizer.removed_params(removed)
            yield count, {"unit": self.space.kind, "ratio": ratio, "removed_units": count,
                          "labels": [self.space.label(u) for u in removed], "params_removed": params,
                          "params_fraction": params / self.blocks_params}, self.title(ratio)


@torch.no_grad()
def compare_model(
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
    windows (`sleb.compensate`), evaluated, then taken off again. With `options.unit` `sublayer` or
    `attention`, each ratio is R x the blocks' parameters (see the module docstring).
    """
    metrics = [canonical_metric(m) for m in metrics]
    check_plan(metrics, ratios, eval_specs, options)
    check_no_overlap(calib_spec, eval_specs)
    unit = options.unit
    num_blocks = len(find_blocks(model).modules)
    columns = columns_for(unit).of(model, ratios, options, seqlen)
    windows = calibration(tokenizer, calib_spec, nsamples=nsamples, seqlen=seqlen, seed=options.seed)
    eval_seqlen = eval_seqlen or seqlen

    def evaluate(removed: list[int]) -> dict[str, float]:
        return heldout_perplexity(model, tokenizer, eval_specs, removed, eval_seqlen, batch_size=options.batch_size,
                                  max_windows=max_eval_windows, unit=unit)

    started = time.perf_counter()
    dense = evaluate([])
    log(f"dense: {dense}")
    rows = []
    dense_calibration_ppl = None
    for metric in metrics:
        t0 = time.perf_counter()
        stepwise = {"stop_when": columns.stop_when()} if get_criterion(metric).stepwise else {}
        result = search(model, windows, columns.size, metric=metric, options=options, progress=progress,
                        **stepwise)
        search_seconds = time.perf_counter() - t0
        dense_calibration_ppl = result.calibration_ppl(0)
        for count, fields, name in columns.cells(result):
            removed = removal_set(result, count)
            ppl = evaluate(removed)
            rows.append({"metric": metric, **fields, "removed": sorted(removed),
                         "calibration_ppl": result.calibration_ppl(count), "eval_ppl": ppl,
                         "search_seconds": search_seconds})
            shown = fields.get("labels", sorted(removed))
            log(f"{metric} {name}: removed {shown} calib {result.calibration_ppl(count):.3f} eval {ppl}")
            if compensation is not None:
                with compensated(model, windows, removed, objective=compensation, ridge=compensate_ridge,
                                 batch_size=options.batch_size, seed=options.seed, progress=False,
                                 calibration_ppl_plain=result.calibration_ppl(count), unit=unit) as comp:
                    fitted = evaluate(removed)
                rows.append({**rows[-1], "metric": f"{metric}+{compensation}", "calibration_ppl": comp.calibration_ppl,
                             "eval_ppl": fitted, "fit_seconds": comp.seconds})
                log(f"{metric}+{compensation} {name}: calib {comp.calibration_ppl:.3f} eval {fitted}")
    table = {
        "num_blocks": num_blocks,
        "unit": unit,
        **columns.table_fields(options),
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


def columns_for(unit: str) -> type[BlockColumns] | type[UnitColumns]:
    """The columns of a comparison over `unit`: block counts, or shares of the blocks' parameters."""
    return UnitColumns if unit_kind(unit).ratio_of_parameters else BlockColumns


# What `sleb compare -o DIR` writes in DIR.
OUTPUT_FILES = ("compare.json", "compare.md", "compare.png")


@dataclass(frozen=True)
class CompareJob:
    """Everything `sleb compare` does, as one value (the CLI's flags, one field or part each); `run_compare`
    runs it.

    Each criterion of `metrics` (None: `default_metrics` for `search.unit`) searches once on the
    `calibration` windows; every ratio of `ratios` is evaluated on the test part of every spec of
    `eval_specs` (at most `eval_windows` windows each), with `compensation` also fitted when given.
    The table goes to `output` (`OUTPUT_FILES`).

    With `target_speedups` (and `search.speed_at`), the job draws the frontier instead (`sleb.frontier`): for
    each of `units` and each target, SLEB's budgeted search, held-out perplexity and the pruned model timed
    with `sleb bench`; written to `output` as `FRONTIER_FILES`. `ratios` and `metrics` other than sleb are
    refused with it. With `healing` (its `params` set), every point of the frontier also gets a healed row.
    """

    model: str
    output: str
    metrics: list[str] | None = None
    ratios: tuple[float, ...] | list[float] | None = None  # None: DEFAULT_RATIOS (without target_speedups)
    calibration: Calibration = Calibration()
    eval_specs: tuple[str, ...] | list[str] = ("wikitext2",)
    eval_windows: int | None = None
    eval_seqlen: int | None = None  # None: the calibration's seqlen
    search: SearchOptions = SearchOptions()
    compensation: str | None = None
    # The frontier (`sleb.frontier`): these target speedups in the measured cost model of `search.speed_at`,
    # for each of `units` (None: `search.unit` alone); None: the comparison at `ratios`.
    target_speedups: tuple[float, ...] | list[float] | None = None
    units: tuple[str, ...] | list[str] | None = None
    # The frontier's swap refinement of each branch-unit point (None: as long as its search took, 30 s at least).
    refine_seconds: float | None = None
    # The frontier's healed rows: every point also healed as `sleb prune --heal` would (params None: none).
    healing: Healing = Healing()
    overwrite: bool = False
    dtype: str = "auto"
    device: str | None = "auto"
    trust_remote_code: bool = False

    @property
    def on_cuda(self) -> bool:
        """Whether the model runs on CUDA (`device` cuda..., or auto with a GPU), as `sleb bench` decides."""
        return loading.runs_on_cuda(self.device)

    @property
    def frontier(self) -> bool:
        """Whether the job draws the frontier (`sleb.frontier`) instead of comparing criteria at ratios."""
        return self.target_speedups is not None

    def validate(self) -> "CompareJob":
        """Every check that needs no model (BadInput, one line): the criteria for the unit, the ratios, the
        texts (the evaluation's must not overlap the calibration's), dtype, device and the output files'
        place; returns the job with its criteria spelled canonically (the default ones when not given)."""
        _positive_int(self.calibration.nsamples, "--nsamples")
        _positive_int(self.calibration.seqlen, "--seqlen")
        _positive_int(self.eval_windows, "--eval-windows")
        _positive_int(self.eval_seqlen, "--eval-seqlen")
        check_seconds(self.refine_seconds)
        if self.refine_seconds is not None and not self.frontier:
            raise BadInput("--refine-seconds applies with --target-speedup (the frontier's refinement of each point)")
        if self.compensation is not None and self.compensation not in COMPENSATIONS:
            raise BadInput(f"unknown compensation {self.compensation!r}; choose {', '.join(COMPENSATIONS)}")
        self._check_healing()
        if self.frontier:
            job = self._frontier_job()
        else:
            job = self._ratio_job()
            check_plan(job.metrics, job.ratios, job.eval_specs, job.search)
        data.check_spec(job.calibration.spec)
        check_no_overlap(job.calibration.spec, job.eval_specs)
        loading.parse_dtype(job.dtype)
        loading.check_device(job.device)
        check_output_files(job.output, list(FRONTIER_FILES if job.frontier else OUTPUT_FILES),
                           overwrite=job.overwrite,
                           inputs=[*loading.local_paths(job.model),
                                   *data.local_paths([job.calibration.spec, *job.eval_specs])])
        return job

    def _check_healing(self) -> None:
        """--heal: the frontier's healed rows, with a budget; its settings mean nothing without it."""
        if not self.healing.wanted:
            if self.healing != Healing():
                raise BadInput("--heal-* options set the frontier's healing; give --heal too")
            return
        self.healing.validate()
        if not self.frontier:
            raise BadInput("--heal adds healed rows to the frontier (--target-speedup); to heal one removal, use "
                           "sleb prune --heal")
        if self.healing.params == "maps" and self.compensation is None:
            raise BadInput("--heal maps trains the maps --compensate folds; give --compensate too, or another "
                           "parameter set")

    def _ratio_job(self) -> "CompareJob":
        """The comparison of criteria at ratios: one unit kind, nothing timed."""
        if self.units is not None and not _names(self.units):
            raise BadInput("--unit lists nothing: give one unit kind")
        if self.units is not None and len(_names(self.units)) != 1:
            raise BadInput(f"--unit {','.join(_names(self.units))}: a comparison at ratios takes one unit kind; "
                           "several make the frontier (give --target-speedup and --speed-at)")
        search = self.search if self.units is None else replace(self.search, unit=_names(self.units)[0])
        if search.speed_at is not None:
            raise BadInput("--speed-at applies with --target-speedup (the frontier); a comparison at ratios times "
                           "nothing")
        metrics = (default_metrics(search) if self.metrics is None
                   else [canonical_metric(m) for m in _names(self.metrics)])
        return replace(self, model=os.fspath(self.model), output=os.fspath(self.output), metrics=metrics,
                       ratios=list(DEFAULT_RATIOS if self.ratios is None else self.ratios),
                       eval_specs=_names(self.eval_specs), search=search, units=None)

    def _frontier_job(self) -> "CompareJob":
        """The frontier: its units, targets and cost model checked (`sleb.frontier.check_frontier`)."""
        if self.ratios is not None:
            raise BadInput("--target-speedup and --ratio are two kinds of budget: give one")
        units = [self.search.unit] if self.units is None else _names(self.units)
        check_unit_score(None if self.search.unit_score == "loss" else self.search.unit_score, units)
        targets = list(self.target_speedups)
        check_frontier(units, targets, self.search.speed_at,
                       None if self.metrics is None else [canonical_metric(m) for m in _names(self.metrics)])
        eval_specs = _names(self.eval_specs)
        if not eval_specs:
            raise BadInput("--eval lists nothing: give at least one value (comma-separated)")
        return replace(self, model=os.fspath(self.model), output=os.fspath(self.output), metrics=["sleb"],
                       target_speedups=targets, units=units, eval_specs=eval_specs,
                       search=replace(self.search, unit="block", unit_score="loss"))


def _names(value) -> list[str]:
    """A list of names (paths as strings) from a list, a tuple or one name."""
    return [os.fspath(v) for v in ([value] if isinstance(value, (str, os.PathLike)) else value)]


def run_compare(job: CompareJob, *, log: Callable[[str], None] = lambda message: None,
                progress: bool = True) -> dict:
    """Run `job` (see `CompareJob`): check what needs no weights, then the context, load the model, compare
    (`compare_model`) and write the table to `job.output`; returns the table (`markdown` renders it)."""
    job = job.validate()
    if job.frontier:  # the context the timing and the bench need, from the config before the weights
        model_config, tokenizer = loading.peek(job.model, job.trust_remote_code)
        check_shapes(job.model, model_config, tokenizer, job.search.speed_at, job.on_cuda)
    loading.check_seqlen(job.model, max(job.calibration.seqlen, job.eval_seqlen or 0), job.trust_remote_code)
    if job.healing.wanted:  # a text too short for the healing windows is refused before the weights load
        loading.check_seqlen(job.model, job.healing.seqlen or job.calibration.seqlen, job.trust_remote_code,
                             flag="--heal-seqlen" if job.healing.seqlen else "--seqlen")
        heal_windows(tokenizer, job.calibration.spec, job.healing, job.calibration.seqlen, job.search.seed)
    model, tokenizer = loading.load(job.model, dtype=job.dtype, device=job.device,
                                    trust_remote_code=job.trust_remote_code)
    if job.frontier:
        return frontier_model(model, tokenizer, units=job.units, targets=job.target_speedups,
                              calib_spec=job.calibration.spec, eval_specs=job.eval_specs,
                              nsamples=job.calibration.nsamples, seqlen=job.calibration.seqlen, options=job.search,
                              max_eval_windows=job.eval_windows, eval_seqlen=job.eval_seqlen,
                              refine_seconds=job.refine_seconds, compensation=job.compensation,
                              healing=job.healing, out_dir=job.output,
                              progress=progress, log=log)
    return compare_model(model, tokenizer, metrics=job.metrics, ratios=job.ratios, calib_spec=job.calibration.spec,
                         eval_specs=job.eval_specs, nsamples=job.calibration.nsamples, seqlen=job.calibration.seqlen,
                         options=job.search, max_eval_windows=job.eval_windows, eval_seqlen=job.eval_seqlen,
                         out_dir=job.output,
                         compensation=job.compensation, progress=progress, log=log)



def markdown(table: dict) -> str:
    specs = table["evaluation"]["specs"]
    kind = columns_for(table["unit"])
    key = kind.key
    columns = sorted({r[key] for r in table["rows"]})
    lines = [
        f"Held-out perplexity (test part; {table['evaluation']['seqlen']}-token windows) after removing "
        f"{kind.what(table)}; calibration: {table['calibration']['spec']}, {table['calibration']['nsamples']} x "
        f"{table['calibration']['seqlen']} tokens, seed {table['calibration']['seed']}.",
        "",
        *kind.intro(table),
    ]
    header = "| criterion | " + " | ".join(f"{kind.title(c, table)} {s}" for c in columns for s in specs) + " |"
    lines += [header, "|" + "---|" * (1 + len(columns) * len(specs))]
    lines.append("| dense | " + " | ".join(f"{table['dense_eval_ppl'][s]:.2f}" for _ in columns for s in specs) + " |")
    for metric in dict.fromkeys(r["metric"] for r in table["rows"]):
        by = {r[key]: r for r in table["rows"] if r["metric"] == metric}
        cells = (f"{by[c]['eval_ppl'][s]:.2f}" for c in columns for s in specs)
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", kind.removed_heading, ""]
    for r in table["rows"]:
        lines.append(f"- {r['metric']} @ {kind.removed_line(r, table)} (calibration ppl {r['calibration_ppl']:.2f})")
    return "\n".join(lines) + "\n"


def write_outputs(table: dict, out: Path) -> None:
    atomic_write_text(out / "compare.json", json.dumps({"format": "sleb-compare/1", **table}, indent=2))
    atomic_write_text(out / "compare.md", markdown(table))
    compare_plot(table, out / "compare.png")

"""The whole prune job as one library call: load → data → search → edit → export (→ held-out eval).

`sleb prune` is this function with options; benchmarks and notebooks call it too. Every check
that can run before the model loads does (outputs, device, texts, budget, numbers, the context
from the model's config), and the output's free space is checked once the model's size is known,
before the search.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from . import data, distributed, loading
from .arch import find_blocks
from .budgets import Budget, budgeted_search
from . import racing as racing_defaults
from .compensate import check_ridge
from .criteria import canonical_metric, get_criterion
from .errors import BadInput
from .evaluate import heldout_perplexity
from .export import remove_blocks, save
from .fingerprint import model_fingerprint
from .gguf_export import check_gguf_output, check_writable, gguf_output, save_gguf
from .outputs import check_output_file, check_output_folder, resolved
from .refine import check_seconds
from .result import SearchOptions, SearchResult
from .runfile import apply_run, check_count, load_run
from .sizes import weight_bytes


@dataclass
class PruneRun:
    """What `prune` did: the search result (its `extra` holds budget, refinement and held-out numbers)."""

    result: SearchResult
    out_dir: str
    from_report: str | None = None


def prune(
    model: str,
    out_dir: str | os.PathLike,
    budget: Budget,
    *,
    metric: str = "sleb",
    options: SearchOptions = SearchOptions(),
    calib: str = "wikitext2",
    nsamples: int = 128,
    seqlen: int = 2048,
    refine: str | None = None,
    beam: int | None = None,
    refine_seconds: float | None = None,
    eval_spec: str | None = None,
    eval_windows: int | None = None,
    from_report: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
    out_format: str = "auto",
    gguf_type: str | None = None,
    compensation: str | None = None,
    compensate_aware: bool = False,
    compensate_top_k: int = 3,
    compensate_ridge: float | str = "auto",
    racing: bool = False,
    confidence: float = racing_defaults.CONFIDENCE,
    tolerance: float = racing_defaults.TOLERANCE,
    offload_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> PruneRun:
    """Search `model` for its most redundant blocks within `budget`, remove them, save to `out_dir`.

    With `from_report` (an earlier run folder or its sleb_report.json), no search runs: the first
    `budget.remove` (or ceil(`budget.ratio` x blocks)) removals recorded there are applied, after
    checking the report was made on this model. `eval_spec` adds held-out perplexity on that
    spec's test part (dense, pruned and, with refinement, greedy) to the run file.

    An `out_dir` ending in `.gguf` (or `out_format="gguf"`) writes one GGUF file, its run file beside
    it (`sleb.gguf_export`): from a GGUF source the kept blocks are copied byte for byte; from a
    Hugging Face model the weights are written in `gguf_type` (f16, bf16, q8_0).

    `compensation` (`linear` or `linear-cosine`, see `sleb.compensate`) folds a fitted linear map
    into the kept block before each removed run, on the calibration windows (with `from_report`
    too); `compensate_aware` picks each block by its compensated loss (`remove`/`ratio` budgets).
    """
    loading.parse_dtype(dtype)
    loading.check_device(device)
    inputs = [*loading.local_paths(model), *data.local_paths([calib, eval_spec]), from_report]
    gguf = gguf_output(model, out_dir, out_format, gguf_type)
    if gguf is not None:
        check_gguf_output(out_dir, inputs=inputs, overwrite=overwrite)
    else:
        check_output_folder(out_dir, inputs=inputs, overwrite=overwrite)
    if checkpoint is not None:
        check_output_file(checkpoint, inputs=inputs, label="checkpoint")
        if resolved(out_dir) in resolved(checkpoint).parents:
            raise BadInput(f"--checkpoint {checkpoint} lies inside the output folder, which is replaced when the run "
                           "ends; put it elsewhere")
    if offload_dir is not None:
        if compensation is not None:
            raise BadInput("--compensate edits the weights in memory; it does not work with --offload-dir")
        scratch = resolved(offload_dir)
        for other in [out_dir, *(i for i in inputs if i is not None)]:
            if resolved(other) == scratch or resolved(other) in scratch.parents:
                raise BadInput(f"--offload-dir {offload_dir} lies inside {other}, which sleb must not write into; "
                               "put it elsewhere")
    if compensate_aware and (compensation is None or from_report is not None or budget.count(1) is None
                             or any(v is not None for v in (budget.max_ppl_increase, refine, beam))
                             or canonical_metric(metric) != "sleb"):
        raise BadInput("--compensate-aware needs --compensate, --metric sleb and exactly one of --remove or --ratio "
                       "(no other budget, --refine, --beam or --from-report)")
    # Numbers the search or the fit would only reject after the model has loaded.
    check_ridge(compensate_ridge)
    check_seconds(refine_seconds)
    racing_defaults.check_settings(confidence, tolerance)
    fit = (lambda lm, windows, result, heldout=None, plain=None: _compensate(  # noqa: E731
        lm, windows, result, compensation, calib, options, compensate_ridge, log, heldout, plain)) if compensation else None
    if from_report is not None:
        return _apply_report(model, out_dir, budget, from_report, inputs, overwrite, dtype, device, trust_remote_code,
                             gguf, fit, calib, nsamples, seqlen, options.seed)

    budget.validate()
    metric = canonical_metric(metric)
    if racing and not get_criterion(metric).stepwise:
        raise BadInput(f"--racing races SLEB's candidates step by step; it does not apply to --metric {metric}")
    data.check_spec(calib)
    if eval_spec is not None:
        data.check_no_overlap(calib, [eval_spec])
    loading.check_seqlen(model, seqlen, trust_remote_code)
    lm, tokenizer = loading.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                 offload_dir=offload_dir)
    num_blocks = len(find_blocks(lm).modules)
    if gguf is None:
        # The pruned checkpoint is at most the dense model's size: make sure it fits before searching.
        check_output_folder(out_dir, inputs=inputs, overwrite=overwrite, need_bytes=weight_bytes(lm))
    elif gguf.source is None:
        check_writable(lm, tokenizer)  # before the search, not after it

    windows = data.calibration(tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=options.seed)
    log(f"{model}: {num_blocks} blocks; searching with {metric}{' (racing)' if racing else ''} on {nsamples} x "
        f"{seqlen} tokens of {calib}")
    if compensate_aware:
        from .compensate import aware_search

        result = aware_search(lm, windows, budget.count(num_blocks), objective=compensation, top_k=compensate_top_k,
                              ridge=compensate_ridge, batch_size=options.batch_size,
                              early_barrier=options.early_barrier, latter_barrier=options.latter_barrier,
                              seed=options.seed, progress=progress)
        result.extra["model_fingerprint"] = model_fingerprint(lm)
    else:
        result = budgeted_search(lm, windows, budget, metric=metric, refine=refine, beam=beam,
                                 refine_seconds=refine_seconds, options=options, checkpoint=checkpoint,
                                 progress=progress, on_status=log, racing=racing, confidence=confidence,
                                 tolerance=tolerance)
    if eval_spec is not None:
        def heldout(removed):
            return heldout_perplexity(lm, tokenizer, [eval_spec], removed, seqlen, batch_size=options.batch_size,
                                      max_windows=eval_windows)[eval_spec]

        held = {"spec": eval_spec, "seqlen": seqlen, "dense": heldout([]), "pruned": heldout(result.removed)}
        if "refine" in result.extra:
            held["greedy"] = heldout(result.extra["refine"]["greedy_removed"])
            result.extra["refine"]["heldout_ppl"] = {"greedy": held["greedy"], "refined": held["pruned"],
                                                     "spec": eval_spec}
        result.extra["heldout_ppl"] = held
    if fit is not None:
        held = result.extra.get("heldout_ppl")
        fit(lm, windows, result, (lambda: heldout(result.removed)) if held else None, held["pruned"] if held else None)
        if held:
            held["pruned_plain"], held["pruned"] = held["pruned"], result.extra["compensation"]["heldout"]["ppl"]
    result.extra["distributed"] = distributed.describe()
    remove_blocks(lm, result.removed)
    _save(lm, tokenizer, out_dir, result, gguf, overwrite, inputs,
          {"source": model, "calibration_spec": calib, "seed": options.seed})
    loading.release(lm)  # the --offload-dir scratch folder, now that the weights are saved
    return PruneRun(result, str(out_dir))


def _save(lm, tokenizer, out_dir, result, gguf, overwrite, inputs, report) -> None:
    """Rank 0 writes (every rank holds the same pruned model under torchrun)."""
    if not distributed.is_main():
        return
    if gguf is None:
        save(lm, tokenizer, out_dir, result, overwrite=overwrite, inputs=inputs, report=report)
    else:
        save_gguf(lm, tokenizer, out_dir, result, source=gguf.source, gguf_type=gguf.gguf_type, overwrite=overwrite,
                  report=report)


def _compensate(lm, windows, result, objective, calib, options, ridge, log, heldout=None, heldout_plain=None):
    """Fold compensation for `result.removed` into `lm` (before removal) and record it in the run file."""
    from .compensate import compensate, summary

    comp = compensate(lm, windows, result.removed, objective=objective, ridge=ridge, batch_size=options.batch_size,
                      seed=options.seed, heldout=heldout, heldout_plain=heldout_plain)
    entry = comp.to_dict()
    entry["calibration_spec"] = calib
    if heldout is not None:
        after = [r.heldout_ppl_after for r in comp.runs if r.heldout_ppl_after is not None]
        entry["heldout"] = {"plain": heldout_plain, "ppl": after[-1] if after else heldout_plain}
    result.extra["compensation"] = entry
    log(summary(comp))


def _apply_report(model, out_dir, budget: Budget, from_report, inputs, overwrite, dtype, device,
                  trust_remote_code, gguf, fit=None, calib=None, nsamples=0, seqlen=0, seed=0) -> PruneRun:
    if (budget.remove is None) == (budget.ratio is None) or any(
            v is not None for v in (budget.target_params, budget.target_speedup, budget.max_ppl_increase)):
        raise BadInput("--from-report applies a recorded order: give exactly one of --remove N or --ratio R")
    budget.validate()
    report = load_run(from_report)
    # The report's model must have the loaded model's block count (apply_run checks), so the count is known now.
    count = budget.count(report["blocks_before"])
    check_count(report, count, str(from_report))
    if fit is not None:
        data.check_spec(calib)
    lm, tokenizer = loading.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if gguf is not None and gguf.source is None:
        check_writable(lm, tokenizer)
    result = apply_run(lm, report, count, source=str(from_report))
    if fit is not None:
        fit(lm, data.calibration(tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed), result)
    remove_blocks(lm, result.removed)
    calib_info = report.get("calibration") or {}
    _save(lm, tokenizer, out_dir, result, gguf, overwrite, inputs,
          {"source": model, "calibration_spec": calib_info.get("spec"), "seed": calib_info.get("seed")})
    return PruneRun(result, str(out_dir), from_report=str(from_report))

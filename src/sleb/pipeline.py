"""The whole prune job as one library call: load → data → search → edit → export (→ held-out eval).

`sleb prune` is this function with options; benchmarks and notebooks call it too. Every check
that can run before the model loads does (outputs, device, texts, budget, numbers, the context
from the model's config), and the output's free space is checked once the model's size is known,
before the search.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from . import data, distributed, loading
from .arch import find_blocks
from .budgets import budgeted_search
from .compensated_search import aware_search
from .config import PruneConfig
from .errors import BadInput
from .evaluate import heldout_perplexity
from .fingerprint import model_fingerprint
from .outputs import check_output_file, resolved
from .result import SearchResult
from .runfile import RunRecord, apply_run, check_count, compensation_summary
from .saver import writer_for
from .search import check_checkpoint, checkpoint_settings, set_losses
from .timing import check_speed_at, time_model
from .units import lost_parts, remove_units, unit_kind
from .writer import save_with


@dataclass
class PruneRun:
    """What `prune` did: the search result (with its budget, refinement and held-out numbers)."""

    result: SearchResult
    out_dir: str
    from_report: str | None = None


def prune(config: PruneConfig, *, progress: bool = True, log: Callable[[str], None] = lambda message: None,
          given=()) -> PruneRun:
    """Search `config.model` for its most redundant blocks within `config.budget`, remove them, save to
    `config.output` (see `PruneConfig` for every setting).

    With `from_report` (an earlier run folder or its sleb_report.json), no search runs: the first
    `budget.remove` (or ceil(`budget.ratio` x blocks)) removals recorded there are applied, after
    checking the report was made on this model, and what they cost on the calibration windows is
    measured anew. Everything after the order (held-out evaluation, compensation, healing, the save)
    is the same either way. `heldout` adds held-out perplexity on that spec's test part (dense,
    pruned and, with refinement, greedy) to the run file.

    An output ending in `.gguf` (or `out_format="gguf"`) writes one GGUF file, its run file beside
    it: from a GGUF source the kept blocks are copied byte for byte; from a Hugging Face model the
    weights are written in `gguf_type` (f16, bf16, q8_0). `sleb.saver.writer_for` picks the format.

    `compensation` (`linear` or `linear-cosine`, see `sleb.compensate`) folds a fitted linear map
    into the kept block before each removed run, on the calibration windows; `compensation.aware`
    picks each block by its compensated loss (`remove`/`ratio` budgets).

    `given`: the flags the user gave (`PruneConfig.validate`), so that one that cannot apply is refused.
    """
    config = config.validate(given)
    inputs = [*loading.local_paths(config.model), *data.local_paths([config.calibration.spec, config.heldout.spec]),
              config.from_report]
    writer = _check_outputs(config, inputs)
    # Under torchrun every rank must do the same work: refuse a mismatch before loading anything.
    agreed = distributed.agree(config.work())
    recorded = _recorded_order(config)
    if recorded is not None:
        record, count = recorded
        # The run is what the recorded search decided: its criterion and barriers, as the run file says.
        searched = record.result()
        config = replace(config, metric=searched.metric, search=replace(
            config.search, early_barrier=searched.early_barrier, latter_barrier=searched.latter_barrier))
    calib, options = config.calibration, config.search
    if config.search_checkpoint is not None:
        check_checkpoint(config.search_checkpoint, checkpoint_settings(config.metric, options, config.racing,
                                                                       calib.nsamples, calib.seqlen))
    if config.heal_checkpoint is not None:
        from .heal import check_heal_checkpoint

        check_heal_checkpoint(config.heal_checkpoint, config.heal_identity())
    source_config, _ = loading.peek(config.model, config.trust_remote_code)
    unit_kind(config.search.unit).check_source(config.model, source_config)
    if options.speed_at is not None:  # a context beyond the model's, from its config before the weights
        check_speed_at(options.speed_at, source_config, config.model)

    loading.check_seqlen(config.model, calib.seqlen, config.trust_remote_code)
    heal_windows = _heal_windows(config)
    measured = _llamacpp_costs(config, writer, progress, log)  # before the weights load: its own processes time
    lm, tokenizer = loading.load(config.model, dtype=config.dtype, device=config.device,
                                 trust_remote_code=config.trust_remote_code, offload_dir=config.offload_dir)
    num_blocks = len(find_blocks(lm).modules)
    if config.heal.wanted:
        from .heal import check_trainable_placement

        check_trainable_placement(lm)
    # Before the search, not after it: the output can hold this model, and it fits.
    writer.check_model(lm, tokenizer)
    writer.check_output(config.output, inputs=inputs, overwrite=config.overwrite, need_bytes=writer.size(lm))

    windows = data.calibration(tokenizer, calib.spec, nsamples=calib.nsamples, seqlen=calib.seqlen, seed=options.seed)
    agreed += distributed.agree({"the tokens of --calib": data.token_sha256(windows)},
                                "give every rank the same --calib text")
    agreed += distributed.agree_on_model(lm)
    comp = config.compensation
    if recorded is not None:
        log(f"{config.model}: {num_blocks} blocks; applying the first {count} removals of {config.from_report} "
            f"(no search) and measuring them on {calib.nsamples} x {calib.seqlen} tokens of {calib.spec}")
        result = apply_run(lm, record, count, windows, options, source=str(config.from_report),
                           measure=lambda sets: set_losses(lm, windows, sets, unit=options.unit,
                                                           batch_size=options.batch_size))
        agreed += distributed.agree({"the removals read from --from-report": result.removed},
                                    "give every rank the same report")
    elif comp.aware:
        log(_searching(config, num_blocks))
        result = aware_search(lm, windows, config.budget.count(num_blocks), compensation=comp, options=options,
                              progress=progress)
        result.model_fingerprint = model_fingerprint(lm)
    else:
        log(_searching(config, num_blocks))
        result = budgeted_search(lm, windows, config.budget, metric=config.metric, refine=config.refine,
                                 options=options, racing=config.racing, checkpoint=config.search_checkpoint,
                                 progress=progress, on_status=log, measured=measured)
    if config.heldout.spec is not None:
        spec = config.heldout.spec

        def heldout(removed):
            return heldout_perplexity(lm, tokenizer, [spec], removed, calib.seqlen, batch_size=options.batch_size,
                                      max_windows=config.heldout.windows, unit=options.unit)[spec]

        held = {"spec": spec, "seqlen": calib.seqlen, "dense": heldout([]), "pruned": heldout(result.removed)}
        if result.refine is not None:
            held["greedy"] = heldout(result.refine["greedy_removed"])
            result.refine["heldout_ppl"] = {"greedy": held["greedy"], "refined": held["pruned"], "spec": spec}
        result.heldout_ppl = held
    teacher = _teacher(lm, heal_windows, config, progress, log)
    if comp.method is not None:
        held = result.heldout_ppl
        _compensate(lm, windows, result, config, log, (lambda: heldout(result.removed)) if held else None,
                    held["pruned"] if held else None)
        if held:
            held["pruned_plain"], held["pruned"] = held["pruned"], result.compensation["heldout"]["ppl"]
    result.distributed = distributed.describe(agreed)
    num_before = len(find_blocks(lm).modules)
    # What a removed branch leaves in its block is not trained (found on the model before removal).
    lost = lost_parts(lm, result.removed, result.unit) if teacher is not None else {}
    remove_units(lm, result.removed, result.unit)
    if result.speed is not None and not _in_llamacpp(config, writer):  # a .gguf output is timed once written
        _time_pruned(lm, result, log)
    if teacher is not None:
        _heal(lm, teacher, config, result, num_before, lost, progress, log)
        if result.heldout_ppl is not None:
            held = result.heldout_ppl
            held["pruned_unhealed"], held["pruned"] = held["pruned"], heldout([])
    _save(lm, tokenizer, config, result, writer, inputs,
          {"source": config.model, "calibration_spec": calib.spec, "seed": options.seed},
          after_write=_time_gguf(config, writer, result, progress, log))
    loading.release(lm)  # the --offload-dir scratch folder, now that the weights are saved
    return PruneRun(result, str(config.output), from_report=None if recorded is None else str(config.from_report))


def _time_pruned(lm, result, log) -> None:
    """The pruned model (in memory, as saved) timed at --speed-at the way the dense one was, beside the
    speedup the cost model predicted."""
    speed = result.speed
    spec, dense = speed["speed_at"], speed["measured"].get("plain_seconds", speed["total_seconds"])
    log(f"timing the pruned model at {spec}")
    seconds, spread = time_model(lm, spec)
    speed.update(pruned_plain_seconds=seconds, pruned_plain_spread=spread, measured_speedup=dense / seconds,
                 measured_spread=spread + speed["measured"].get("plain_spread", 0.0))


def _searching(config: PruneConfig, num_blocks: int) -> str:
    calib = config.calibration
    return (f"{config.model}: {num_blocks} blocks; searching with {config.metric}"
            f"{' (racing)' if config.racing else ''} on {calib.nsamples} x {calib.seqlen} tokens of {calib.spec}")


def _check_outputs(config: PruneConfig, inputs):
    """The output, checkpoint and offload folder through the output policy, before anything loads; the
    writer of the output (`sleb.saver.writer_for`)."""
    writer = writer_for(config.model, config.output, config.out_format, config.search.unit, config.gguf_type)
    if config.search.speed_at is not None and not writer.folder and not writer.copies_tensors:
        raise BadInput("--speed-at with a .gguf output times it in llama.cpp on probe files cut from a .gguf source; "
                       "this source is a Hugging Face model: save a folder (timed in transformers), or prune a .gguf "
                       "of it")
    if _in_llamacpp(config, writer):  # a missing llama.cpp runtime is one line before anything loads
        from .llamacpp_bench import find_runtime

        find_runtime()
    if writer.copies_tensors and (config.heal.wanted or config.compensation.method is not None):
        flag = "--heal" if config.heal.wanted else "--compensate"
        raise BadInput(f"{flag} changes weights, and a .gguf output from a .gguf model copies the kept blocks' "
                       "quantized tensors as they are: save to a folder (-o DIR), or convert that folder")
    writer.check_output(config.output, inputs=inputs, overwrite=config.overwrite)
    for checkpoint in (config.search_checkpoint, config.heal_checkpoint):
        if checkpoint is None:
            continue
        check_output_file(checkpoint, inputs=inputs, label="checkpoint", resumable=True)
        if resolved(config.output) in resolved(checkpoint).parents:
            raise BadInput(f"--checkpoint {config.checkpoint} lies inside the output folder, which is replaced when "
                           "the run ends; put it elsewhere")
    if config.offload_dir is not None:
        scratch = resolved(config.offload_dir)
        for other in [config.output, *(i for i in inputs if i is not None)]:
            if resolved(other) == scratch or resolved(other) in scratch.parents:
                raise BadInput(f"--offload-dir {config.offload_dir} lies inside {other}, which sleb must not write "
                               "into; put it elsewhere")
    return writer


def _recorded_order(config: PruneConfig) -> tuple[RunRecord, int] | None:
    """With --from-report: its run file, read and checked, and how many of its removals to apply."""
    if config.from_report is None:
        return None
    record = RunRecord.read(config.from_report)
    unit = record.unit
    if unit != config.search.unit:
        raise BadInput(f"{config.from_report} records a --unit {unit} search; give --unit {unit} to apply it")
    # The report's model must have the loaded model's block count (checked once loaded), so the count is known now.
    count = unit_kind(unit).recorded_count(config.budget, record.blocks_before, str(config.from_report))
    check_count(record, count, str(config.from_report))
    return record, count


def _save(lm, tokenizer, config: PruneConfig, result, writer, inputs, report, after_write=None) -> None:
    """Rank 0 writes (every rank holds the same pruned model under torchrun)."""
    if not distributed.is_main():
        return
    save_with(writer, lm, tokenizer, config.output, result, report={**report, "config": config.to_dict()},
              overwrite=config.overwrite, inputs=inputs, after_write=after_write)


def _in_llamacpp(config: PruneConfig, writer) -> bool:
    """Whether --speed-at means llama.cpp's speed: a .gguf output cut from a .gguf source (`sleb.llamacpp_costs`)."""
    return config.search.speed_at is not None and writer.copies_tensors


def _llamacpp_costs(config: PruneConfig, writer, progress: bool, log):
    """With --speed-at and a .gguf output: the cost table timed in llama.cpp on probe files (None otherwise:
    the search times the model in transformers itself)."""
    if not _in_llamacpp(config, writer):
        return None
    from .gguf_io.reader import block_count
    from .greedy import recorded_costs
    from .llamacpp_costs import measure_gguf_costs

    if config.search_checkpoint is not None:  # a resumed search goes on with the table it started with
        recorded = recorded_costs(config.search_checkpoint)
        if recorded is not None and recorded.info.get("runtime") == "llama.cpp":
            log(f"using the llama.cpp cost table recorded in {config.search_checkpoint} (timed when the search "
                "started)")
            return recorded

    _, num_blocks = block_count(loading.read_gguf(writer.source))
    kind = unit_kind(config.search.unit)
    log(f"timing {writer.source.name} at {config.search.speed_at} in llama.cpp: probe files without some "
        f"{'blocks' if kind.whole_blocks else 'blocks, attention and MLPs'}, whole, in alternation")
    return measure_gguf_costs(writer.source, config.search.speed_at, num_blocks, branches=not kind.whole_blocks,
                              options=config.search, progress=progress)


def _time_gguf(config: PruneConfig, writer, result, progress: bool, log):
    """With --speed-at and a .gguf output: what times the written file against its source in llama.cpp, at the
    shape the probes were timed at, before the run file is made (None otherwise)."""
    if not _in_llamacpp(config, writer) or result.speed is None:
        return None
    from .llamacpp_costs import time_gguf_output

    def timed(path):
        log(f"timing the written file against {writer.source.name} at {config.search.speed_at} in llama.cpp")
        result.speed.update(time_gguf_output(writer.source, path, config.search.speed_at, progress=progress))

    return timed


def _compensate(lm, windows, result, config: PruneConfig, log, heldout=None, heldout_plain=None):
    """Fold compensation for `result.removed` into `lm` (before removal) and record it in the run file."""
    from .compensate import compensate

    options = config.search
    comp = compensate(lm, windows, result.removed, objective=config.compensation.method,
                      ridge=config.compensation.ridge, batch_size=options.batch_size, seed=options.seed,
                      heldout=heldout, heldout_plain=heldout_plain, unit=result.unit)
    entry = comp.to_dict()
    entry["calibration_spec"] = config.calibration.spec
    if heldout is not None:
        after = [r.heldout_ppl_after for r in comp.runs if r.heldout_ppl_after is not None]
        entry["heldout"] = {"plain": heldout_plain, "ppl": after[-1] if after else heldout_plain}
    result.compensation = entry
    log(compensation_summary(comp))


def _heal_windows(config: PruneConfig):
    """With --heal: the training and held-out windows, cut from the calibration text with the model's
    tokenizer before its weights load (so a text too short for them is refused first)."""
    if not config.heal.wanted:
        return None
    from .heal import heal_windows

    heal, calib = config.heal, config.calibration
    loading.check_seqlen(config.model, heal.seqlen or calib.seqlen, config.trust_remote_code,
                         flag="--heal-seqlen" if heal.seqlen else "--seqlen")
    _, tokenizer = loading.peek(config.model, config.trust_remote_code)
    return heal_windows(tokenizer, calib.spec, heal, calib.seqlen, config.search.seed)


def _teacher(lm, windows, config: PruneConfig, progress: bool, log):
    """With --heal: run the dense model once over the healing windows and keep its top-k log-probs."""
    if windows is None:
        return None
    from .heal import dense_teacher

    train, held = windows
    log(f"healing on {train.shape[0]} x {train.shape[1]} tokens of {config.calibration.spec} ({held.shape[0]} "
        f"windows held out); dense model's top-{config.heal.top_k} next-token log-probs first")
    return dense_teacher(lm, windows, config.heal, batch_size=config.search.batch_size, progress=progress)


def _heal(lm, teacher, config: PruneConfig, result, num_before: int, lost: dict, progress: bool,
          log) -> None:
    from .heal import heal, heal_summary, removed_neighbours

    record = heal(lm, teacher.train, teacher.heldout, teacher.targets, teacher.heldout_targets, config.heal,
                  near=removed_neighbours(result.removed, num_before, result.unit), removed=result.removed,
                  compensation=result.compensation, lost=lost, seed=config.search.seed,
                  text=config.calibration.spec, teacher_seconds=teacher.seconds, progress=progress,
                  checkpoint=config.heal_checkpoint,
                  identity={**config.heal_identity(), "unit": result.unit, "removed": sorted(result.removed)},
                  on_status=log)
    result.healing = record.to_dict()
    log(heal_summary(record))

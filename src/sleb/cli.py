"""The `sleb` command line: a thin shell over the Python API (one subcommand per pipeline stage)."""

from __future__ import annotations

import math
import sys

import click

from . import data, models
from .errors import SlebError


class _Group(click.Group):
    """Prints a SlebError as one line and exits 1 (click handles usage errors with exit 2)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SlebError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sleb")
def main():
    """Remove redundant transformer blocks from a causal LM (SLEB, Song et al., ICML 2024)."""


def _check_ratio(ctx, param, value):
    if value is not None and not 0 < value < 1:
        raise click.BadParameter(f"must be in (0, 1), got {value}")
    return value


def _positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}")
    return value


def blocks_for_ratio(ratio: float, num_blocks: int) -> int:
    """Blocks removed for a ratio, rounded up as in the paper (20% of 32 blocks is 7)."""
    return math.ceil(ratio * num_blocks - 1e-9)


model_options = [
    click.option("--dtype", default="auto", show_default=True, type=click.Choice(sorted(models.DTYPES)),
                 help="Weights dtype; auto keeps the checkpoint's (GGUF gives float32)."),
    click.option("--device", default="auto", show_default=True,
                 help="auto (all GPUs via accelerate, else CPU), cpu, cuda, cuda:N."),
    click.option("--trust-remote-code", is_flag=True, help="Run model code shipped with the checkpoint."),
]


def with_model_options(func):
    for option in reversed(model_options):
        func = option(func)
    return func


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder for the pruned checkpoint.")
@click.option("--remove", "num_remove", type=int, callback=_positive, help="Number of blocks to remove.")
@click.option("--ratio", type=float, callback=_check_ratio,
              help="Fraction of blocks to remove, rounded up as in the paper (0.2 of 32 blocks removes 7).")
@click.option("--target-params", type=float,
              help="Remove blocks until at most this many parameters remain: a fraction of the dense model's "
                   "(e.g. 0.8) or an absolute count (e.g. 110e6).")
@click.option("--target-speedup", type=float,
              help="Remove blocks until the ideal speedup (forward FLOPs per token, as sleb bench) reaches this.")
@click.option("--max-ppl-increase", type=float,
              help="Stop before calibration perplexity would exceed this multiple of the dense model's "
                   "(alone: remove as many blocks as stay within it).")
@click.option("--metric", default="sleb", show_default=True,
              help="Redundancy criterion: sleb (Metric3), ppl-oneshot (Metric2), cosine (Metric1; alias "
                   "block-influence: ShortGPT's Block Influence), angular (Gromov et al.'s contiguous window), "
                   "last (the blocks before the final one), random (seeded by --seed).")
@click.option("--angular-tokens", type=click.Choice(["last", "all"]), default="last", show_default=True,
              help="Tokens the angular criterion compares.")
@click.option("--refine", type=click.Choice(["swap"]),
              help="After the search, exchange removed and kept blocks while that lowers the calibration loss.")
@click.option("--refine-seconds", type=float, help="Time budget for --refine (checked between rounds).")
@click.option("--beam", type=int, callback=_positive, help="Beam width: keep the W best removal sets at each step.")
@click.option("--eval", "eval_spec", help="Also report held-out perplexity on this spec's test part "
                                          "(dense, the search's set and, with --refine/--beam, the refined set).")
@click.option("--eval-windows", type=int, callback=_positive, help="At most this many --eval windows.")
@click.option("--from-report", type=click.Path(),
              help="Apply the first --remove N (or --ratio R) removals of an earlier run's sleb_report.json "
                   "without searching.")
@click.option("--calib", default="wikitext2", show_default=True,
              help="Calibration text: wikitext2, c4, gensim-wiki, gensim-lee, or a .txt/.jsonl/.parquet file.")
@click.option("--nsamples", default=128, show_default=True, type=int, callback=_positive, help="Calibration windows.")
@click.option("--seqlen", default=2048, show_default=True, type=int, callback=_positive, help="Tokens per window.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for drawing the windows (and --metric random).")
@click.option("--batch-size", default=1, show_default=True, type=int, callback=_positive,
              help="Windows per forward pass (speed only).")
@click.option("--early-barrier", default=1, show_default=True, type=int, help="First alive blocks never removed.")
@click.option("--latter-barrier", default=1, show_default=True, type=int, help="Last alive blocks never removed.")
@click.option("--checkpoint", type=click.Path(), help="Search state file, written each step; rerun to resume.")
@click.option("--racing", is_flag=True,
              help="Racing search: stop scoring candidates that cannot win or that a sequential paired test finds "
                   "worse than the leader with --confidence (much faster; the report says which scores are complete).")
@click.option("--confidence", default=0.95, show_default=True, type=float,
              help="--racing: per-step confidence that the best candidate is not dropped (1 = exact picks).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@with_model_options
def prune(model, out_dir, num_remove, ratio, target_params, target_speedup, max_ppl_increase, metric, angular_tokens,
          refine, refine_seconds, beam, eval_spec, eval_windows, from_report, calib, nsamples, seqlen, seed,
          batch_size, early_barrier, latter_barrier, checkpoint, racing, confidence, overwrite, dtype, device,
          trust_remote_code):
    """Find MODEL's most redundant blocks (SLEB by default), remove them and save the smaller model.

    MODEL is a hub id, a local folder, a .gguf file, or smollm2-135m (offline). Budgets: one of
    --remove, --ratio, --target-params, --target-speedup, optionally with --max-ppl-increase.
    """
    from pathlib import Path

    from .budgets import Budget, apply_report, budgeted_search, load_report
    from .export import remove_blocks, save
    from .report import summary
    from .search import canonical_metric

    if Path(out_dir).exists() and not overwrite:
        raise SlebError(f"{out_dir} already exists; pass --overwrite to replace it")
    models.parse_dtype(dtype)
    if racing and canonical_metric(metric) != "sleb":
        raise click.UsageError("--racing races SLEB's candidates; it does not apply to --metric " + metric)
    if from_report is not None:
        if (num_remove is None) == (ratio is None):
            raise click.UsageError("--from-report needs exactly one of --remove N or --ratio R")
        if any(v is not None for v in (target_params, target_speedup, max_ppl_increase, refine, beam)):
            raise click.UsageError("--from-report applies a recorded order; it takes no other budget, --refine or --beam")
        report = load_report(from_report)
        lm, tokenizer = models.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        from .arch import find_blocks

        num_blocks = len(find_blocks(lm).modules)
        count = num_remove if num_remove is not None else blocks_for_ratio(ratio, num_blocks)
        result = apply_report(lm, report, count, source=str(from_report))
        remove_blocks(lm, result.removed)
        calib_info = report.get("calibration") or {}
        save(lm, tokenizer, out_dir, result, overwrite=overwrite,
             report={"source": model, "calibration_spec": calib_info.get("spec"), "seed": calib_info.get("seed")})
        click.echo(summary(result))
        click.echo(f"applied the first {count} removals of {from_report} (no search); saved to {out_dir}")
        return

    budget = Budget(remove=num_remove, ratio=ratio, target_params=target_params, target_speedup=target_speedup,
                    max_ppl_increase=max_ppl_increase, speedup_context=seqlen)
    budget.validate()
    metric = canonical_metric(metric)
    data.check_spec(calib)
    if eval_spec is not None:
        from .compare import check_no_overlap

        check_no_overlap(calib, [eval_spec])

    lm, tokenizer = models.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    from .arch import find_blocks, max_context

    num_blocks = len(find_blocks(lm).modules)
    context = max_context(lm)
    if context is not None and seqlen > context:
        raise SlebError(f"--seqlen {seqlen} is longer than the model's context of {context} tokens")

    windows = data.calibration(tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    click.echo(f"{model}: {num_blocks} blocks; searching with {metric}{' (racing)' if racing else ''} on "
               f"{nsamples} x {seqlen} tokens of {calib}", err=True)
    result = budgeted_search(lm, windows, budget, metric=metric, refine=refine, beam=beam,
                             refine_seconds=refine_seconds, batch_size=batch_size, early_barrier=early_barrier,
                             latter_barrier=latter_barrier, seed=seed, angular_tokens=angular_tokens,
                             checkpoint=checkpoint, on_status=lambda s: click.echo(s, err=True), racing=racing,
                             confidence=confidence)
    if eval_spec is not None:
        from .budgets import pruned_view
        from .evaluate import perplexity

        def heldout(removed):
            with pruned_view(lm, removed):
                return perplexity(lm, tokenizer, eval_spec, seqlen, batch_size=batch_size, max_windows=eval_windows,
                                  progress=False).ppl

        held = {"spec": eval_spec, "seqlen": seqlen, "dense": heldout([]), "pruned": heldout(result.removed)}
        if "refine" in result.extra:
            held["greedy"] = heldout(result.extra["refine"]["greedy_removed"])
            result.extra["refine"]["heldout_ppl"] = {"greedy": held["greedy"], "refined": held["pruned"],
                                                     "spec": eval_spec}
        result.extra["heldout_ppl"] = held
    remove_blocks(lm, result.removed)
    save(lm, tokenizer, out_dir, result, overwrite=overwrite,
         report={"source": model, "calibration_spec": calib, "seed": seed})
    click.echo(summary(result))
    budget_info = result.extra.get("budget", {})
    click.echo(f"stopped by {budget_info.get('stopped_by')}: {budget_info.get('reason')}; "
               f"{budget_info.get('parameters_after'):,} parameters, ideal speedup {budget_info.get('ideal_speedup'):.3f}x")
    if "refine" in result.extra:
        r = result.extra["refine"]
        click.echo(f"calibration loss: greedy {r['greedy_loss']:.4f} (ppl {r['greedy_calibration_ppl']:.3f}) -> "
                   f"refined {r['loss']:.4f} (ppl {r['calibration_ppl']:.3f})")
    if eval_spec is not None:
        h = result.extra["heldout_ppl"]
        line = f"held-out perplexity on {eval_spec}: dense {h['dense']:.3f}, pruned {h['pruned']:.3f}"
        if "greedy" in h:
            line += f" (greedy {h['greedy']:.3f})"
        click.echo(line)
    click.echo(f"saved to {out_dir}")


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(),
              help="Folder for compare.md, compare.json and compare.png.")
@click.option("--metrics", default="sleb,cosine,angular,ppl-oneshot,last", show_default=True,
              help="Comma-separated criteria (sleb, ppl-oneshot, cosine/block-influence, angular, last, random).")
@click.option("--ratio", "ratios", default="0.1,0.2,0.3", show_default=True,
              help="Comma-separated fractions of blocks to remove (each rounded up).")
@click.option("--calib", default="wikitext2", show_default=True, help="Calibration text spec (its train part).")
@click.option("--eval", "eval_specs", default="wikitext2", show_default=True,
              help="Comma-separated evaluation specs (their test parts; must not overlap calibration).")
@click.option("--nsamples", default=128, show_default=True, type=int, callback=_positive, help="Calibration windows.")
@click.option("--seqlen", default=2048, show_default=True, type=int, callback=_positive, help="Tokens per window.")
@click.option("--eval-windows", type=int, callback=_positive, help="At most this many evaluation windows per spec.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the windows and --metrics random.")
@click.option("--angular-tokens", type=click.Choice(["last", "all"]), default="last", show_default=True)
@click.option("--batch-size", default=1, show_default=True, type=int, callback=_positive)
@with_model_options
def compare(model, out_dir, metrics, ratios, calib, eval_specs, nsamples, seqlen, eval_windows, seed, angular_tokens,
            batch_size, dtype, device, trust_remote_code):
    """Run each criterion at each ratio on the same windows and tabulate held-out perplexity."""
    from .compare import check_no_overlap, run_compare
    from .search import canonical_metric

    metric_list = [canonical_metric(m.strip()) for m in metrics.split(",") if m.strip()]
    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError as err:
        raise SlebError(f"--ratio must be comma-separated numbers, got {ratios!r}") from err
    if not ratio_list or not all(0 < r < 1 for r in ratio_list):
        raise SlebError(f"every --ratio must be in (0, 1), got {ratios!r}")
    specs = [s.strip() for s in eval_specs.split(",") if s.strip()]
    data.check_spec(calib)
    check_no_overlap(calib, specs)
    models.parse_dtype(dtype)
    lm, tokenizer = models.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    table = run_compare(lm, tokenizer, metrics=metric_list, ratios=ratio_list, calib_spec=calib, eval_specs=specs,
                        nsamples=nsamples, seqlen=seqlen, seed=seed, max_eval_windows=eval_windows,
                        batch_size=batch_size, angular_tokens=angular_tokens, out_dir=out_dir,
                        log=lambda s: click.echo(s, err=True))
    from .compare import markdown

    click.echo(markdown(table))
    click.echo(f"wrote {out_dir}/compare.md, compare.json, compare.png")


def _split_list(value: str | None) -> list[str]:
    """`a,b , c` -> ["a", "b", "c"] (empty items dropped)."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


@main.command("eval")
@click.argument("model_names", metavar="MODEL [MODEL ...]", nargs=-1, required=True)
@click.option("--ppl", "ppl_specs",
              help="Perplexity on these text specs, comma-separated: wikitext2, c4, gensim-wiki, gensim-lee, "
                   "or .txt/.jsonl/.parquet files (their test parts).")
@click.option("--seqlen", default=2048, show_default=True, type=int, callback=_positive,
              help="Tokens per perplexity window.")
@click.option("--batch-size", default=1, show_default=True, type=int, callback=_positive,
              help="Windows (and lm-eval requests) per forward pass; speed only, numbers do not change.")
@click.option("--max-windows", type=int, callback=_positive,
              help="Keep the first N perplexity windows (default: all; 256 for c4, as in the paper).")
@click.option("--tasks", "task_names",
              help="lm-eval tasks, comma-separated, e.g. piqa,winogrande,hellaswag,arc_easy,arc_challenge "
                   "(needs pip install 'sleb[eval]').")
@click.option("--limit", type=float, help="lm-eval examples per task (N), or a fraction below 1.")
@click.option("--num-fewshot", type=int, help="lm-eval few-shot examples (default: the task's own, 0 for the paper's).")
@click.option("--include-path", type=click.Path(), help="Folder of extra lm-eval task YAMLs (lm-eval's convention).")
@click.option("--json", "json_path", type=click.Path(), help="Write the table and all raw numbers as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(), help="Write the table as Markdown.")
@with_model_options
def eval_command(model_names, ppl_specs, seqlen, batch_size, max_windows, task_names, limit, num_fewshot,
                 include_path, json_path, markdown_path, dtype, device, trust_remote_code):
    """Evaluate models side by side: perplexity and zero-shot accuracy in one table.

    MODEL is a hub id, a local folder (e.g. a pruned checkpoint), a .gguf file, or smollm2-135m
    (offline). Give the dense model first: later rows show their change against it. Whatever
    finished before a failure is still written to --json/--markdown.
    """
    from . import eval_table
    from .arch import find_blocks, max_context
    from .evaluate import check_tasks, perplexity, zero_shot

    specs, tasks = _split_list(ppl_specs), _split_list(task_names)
    if not specs and not tasks:
        raise click.UsageError("give --ppl SPEC[,SPEC...] and/or --tasks TASK[,TASK...]")
    if limit is not None and (limit <= 0 or (limit >= 1 and limit != int(limit))):
        raise click.BadParameter(f"must be a whole number of examples or a fraction in (0, 1), got {limit}",
                                 param_hint="--limit")
    lm_limit = int(limit) if limit is not None and limit >= 1 else limit
    for spec in specs:
        data.check_spec(spec)
    models.parse_dtype(dtype)
    manager = check_tasks(tasks, include_path) if tasks else None

    settings = {"seqlen": seqlen, "batch_size": batch_size, "max_windows": max_windows, "tasks": tasks,
                "limit": lm_limit, "num_fewshot": num_fewshot, "include_path": include_path, "dtype": dtype}
    rows: list[eval_table.ModelEval] = []

    def flush(_result=None):
        eval_table.write(rows, json_path, markdown_path, settings)

    try:
        for name in model_names:
            lm, tokenizer = models.load(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            row = eval_table.ModelEval(name, len(find_blocks(lm).modules), sum(p.numel() for p in lm.parameters()))
            rows.append(row)
            context = max_context(lm)
            if specs and context is not None and seqlen > context:
                raise SlebError(f"--seqlen {seqlen} is longer than {name}'s context of {context} tokens")
            for spec in specs:
                result = perplexity(lm, tokenizer, spec, seqlen, batch_size=batch_size, max_windows=max_windows)
                row.perplexity[spec] = result
                flush()
                click.echo(f"{name}: ppl {spec} = {result.ppl:.3f} over {result.windows} windows "
                           f"[{result.protocol}]", err=True)
            if tasks:
                def on_task(task_result, name=name, row=row):
                    row.tasks[task_result.task] = task_result
                    flush()
                    extra = "" if task_result.acc_norm is None else f", acc_norm {task_result.acc_norm:.4f}"
                    click.echo(f"{name}: {task_result.task} acc {task_result.acc:.4f}{extra} "
                               f"({task_result.samples} examples)", err=True)

                zero_shot(lm, tokenizer, tasks, batch_size=batch_size, limit=lm_limit, num_fewshot=num_fewshot,
                          include_path=include_path, manager=manager, on_result=on_task)
            flush()
            del lm, tokenizer
    finally:
        if rows:
            flush()
    click.echo(eval_table.render_text(rows))
    for path in (json_path, markdown_path):
        if path:
            click.echo(f"wrote {path}", err=True)



@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("-o", "--output", "out_dir", type=click.Path(),
              help="Folder for report.md and the PNGs (default: RUN_DIR).")
@click.option("--generate/--no-generate", default=True, show_default=True,
              help="Add greedy generations of the dense and the pruned model, side by side.")
@click.option("--max-new-tokens", default=20, show_default=True, type=int, callback=_positive,
              help="Tokens generated per prompt.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(sorted(models.DTYPES)),
              help="Weights dtype for the generations.")
@click.option("--device", default="auto", show_default=True, help="Device for the generations.")
def report(run_dir, out_dir, generate, max_new_tokens, dtype, device):
    """Write RUN_DIR/report.md with plots of the search, eval tables and sample generations.

    RUN_DIR is the output folder of `sleb prune` (it holds sleb_report.json). Eval JSONs written
    there by `sleb eval --json` are included. The dense model (the report's source) is loaded for
    the generations when it can be; otherwise only the pruned model's are shown.
    """
    from .reporting import write_report

    path = write_report(run_dir, out_dir, generate=generate, max_new_tokens=max_new_tokens, dtype=dtype,
                        device=device)
    for name in sorted(p.name for p in path.parent.glob("*.png")):
        click.echo(f"wrote {path.parent / name}", err=True)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("models_", metavar="MODEL [MODEL ...]", nargs=-1, required=True)
@click.option("--paper", is_flag=True,
              help="The paper's sizes (prompt 1 x 2048; generation 64 x (64 + 128)), the default on CUDA. "
                   "Without it on CPU: 1 x 512 and 8 x (32 + 32), about a minute per small model.")
@click.option("--prefill-batch", type=int, callback=_positive, help="Prompts per prompt-processing pass.")
@click.option("--prefill-len", type=int, callback=_positive, help="Tokens per prompt for prompt processing.")
@click.option("--gen-batch", type=int, callback=_positive, help="Sequences generated together.")
@click.option("--gen-prompt", type=int, callback=_positive, help="Prompt tokens per sequence for generation.")
@click.option("--gen-tokens", type=int, callback=_positive,
              help="New tokens per sequence (exactly: EOS is suppressed).")
@click.option("--cache", type=click.Choice(["auto", "static", "dynamic"]), default="auto", show_default=True,
              help="KV cache for generation: static (preallocated; compiled decode step on CUDA, as serving stacks "
                   "run) or dynamic (generate()'s default). auto: static on CUDA, dynamic elsewhere.")
@click.option("--warmup", default=1, show_default=True, type=int, callback=_positive,
              help="Untimed runs per model and workload first (the first also measures peak memory); more follow "
                   "until the last two agree within 25% (compilation).")
@click.option("--repeats", default=5, show_default=True, type=int, callback=_positive,
              help="Timed runs per model and workload; the median is reported.")
@click.option("--max-repeats", type=int, callback=_positive,
              help="More timed runs, up to this many, while a model's spread is above 5% (default: 3 x --repeats).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the input token ids.")
@click.option("--prefill/--no-prefill", default=True, show_default=True, help="Measure prompt processing.")
@click.option("--generation/--no-generation", default=True, show_default=True, help="Measure generation.")
@click.option("--threads", type=int, callback=_positive, help="CPU threads for torch (default: torch's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every measurement to this file.")
@with_model_options
def bench(models_, paper, prefill_batch, prefill_len, gen_batch, gen_prompt, gen_tokens, cache, warmup, repeats,
          max_repeats, seed, prefill, generation, threads, json_path, dtype, device, trust_remote_code):
    """Measure prompt processing, generation throughput and memory of each MODEL on the same inputs.

    The first MODEL is the baseline: every other gets its measured speedup and, beside it, the
    ideal speedup its forward FLOPs predict. Models are timed in alternation.
    """
    import json

    import torch

    from . import bench as bench_mod
    from .quantize import quiet_bitsandbytes

    quiet_bitsandbytes()
    if threads:
        torch.set_num_threads(threads)
    models.parse_dtype(dtype)
    # Tokenizers and configs first: a mismatch or a size beyond the context is reported before any weights load.
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the benchmark reports its own progress

    light = []
    for name in models_:
        folder = models.local_checkpoint(name)
        try:
            light.append((name, AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code),
                          AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)))
        except (OSError, ValueError) as err:
            raise SlebError(f"cannot load model {name!r}: {str(err).strip().splitlines()[0]}") from err
    from .arch import max_context

    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    contexts = [c for c in (max_context(cfg) for _, _, cfg in light) if c is not None]
    sizes = bench_mod.default_sizes(on_cuda, paper, min(contexts) if contexts else None)
    given = {"prefill_batch": prefill_batch, "prefill_len": prefill_len, "gen_batch": gen_batch,
             "gen_prompt": gen_prompt, "gen_tokens": gen_tokens}
    sizes.update({k: v for k, v in given.items() if v is not None})
    config = bench_mod.BenchConfig(**sizes, warmup=warmup, repeats=repeats, max_repeats=max_repeats, seed=seed,
                                   prefill=prefill, generation=generation,
                                   cache=("static" if on_cuda else "dynamic") if cache == "auto" else cache)
    config.validate()
    bench_mod.check_inputs(light, config)
    loaded = []
    for name in models_:
        lm, tokenizer = models.load(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        loaded.append((name, lm, tokenizer))
    result = bench_mod.bench(loaded, config, progress=lambda message: click.echo(message, err=True))
    click.echo(bench_mod.format_table(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        click.echo(f"wrote {json_path}", err=True)


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder for the quantized checkpoint.")
@click.option("--method", required=True, type=click.Choice(["int8", "int4"]),
              help="int8: LLM.int8() weights; int4: NF4 4-bit weights, double-quantized scales (bitsandbytes).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@with_model_options
def quantize(model, out_dir, method, overwrite, dtype, device, trust_remote_code):
    """Quantize MODEL's linear weights (post-training, weight-only) and save a checkpoint.

    MODEL is typically a folder written by `sleb prune`. The result loads with plain
    `AutoModelForCausalLM.from_pretrained(OUT)` (bitsandbytes installed); it is reloaded and its
    logits compared with the in-memory quantized model before it is moved into place.
    """
    from . import quantize as quantize_mod

    quantize_mod.quiet_bitsandbytes()
    result = quantize_mod.quantize(model, out_dir, method, dtype=dtype, device=device, overwrite=overwrite,
                                   trust_remote_code=trust_remote_code)
    click.echo(f"{method} ({result.description}): {result.quantized_layers} linear layers, "
               f"{result.linear_bytes_before / 2**20:.1f} -> {result.linear_bytes_after / 2**20:.1f} MiB "
               f"({result.linear_bytes_before / result.linear_bytes_after:.2f}x smaller); whole model "
               f"{result.weight_bytes_before / 2**20:.1f} -> {result.weight_bytes / 2**20:.1f} MiB")
    click.echo(f"reloaded with plain transformers: max logit difference {result.reload_max_logit_diff:.3g}")
    click.echo(f"saved to {out_dir}")


if __name__ == "__main__":
    main()

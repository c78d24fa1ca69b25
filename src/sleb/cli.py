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
@click.option("--calib", default="wikitext2", show_default=True,
              help="Calibration text: wikitext2, c4, gensim-wiki, gensim-lee, or a .txt/.jsonl/.parquet file.")
@click.option("--nsamples", default=128, show_default=True, type=int, callback=_positive, help="Calibration windows.")
@click.option("--seqlen", default=2048, show_default=True, type=int, callback=_positive, help="Tokens per window.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for drawing the windows.")
@click.option("--batch-size", default=1, show_default=True, type=int, callback=_positive,
              help="Windows per forward pass (speed only).")
@click.option("--early-barrier", default=1, show_default=True, type=int, help="First alive blocks never removed.")
@click.option("--latter-barrier", default=1, show_default=True, type=int, help="Last alive blocks never removed.")
@click.option("--checkpoint", type=click.Path(), help="Search state file, written each step; rerun to resume.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@with_model_options
def prune(model, out_dir, num_remove, ratio, calib, nsamples, seqlen, seed, batch_size, early_barrier,
          latter_barrier, checkpoint, overwrite, dtype, device, trust_remote_code):
    """Find MODEL's most redundant blocks with SLEB, remove them and save the smaller model.

    MODEL is a hub id, a local folder, a .gguf file, or smollm2-135m (offline).
    """
    from pathlib import Path

    from .export import remove_blocks, save
    from .report import summary
    from .search import search

    if (num_remove is None) == (ratio is None):
        raise click.UsageError("give exactly one of --remove N or --ratio R")
    if Path(out_dir).exists() and not overwrite:
        raise SlebError(f"{out_dir} already exists; pass --overwrite to replace it")
    data.check_spec(calib)
    models.parse_dtype(dtype)

    lm, tokenizer = models.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    from .arch import find_blocks, max_context

    num_blocks = len(find_blocks(lm).modules)
    context = max_context(lm)
    if context is not None and seqlen > context:
        raise SlebError(f"--seqlen {seqlen} is longer than the model's context of {context} tokens")
    count = num_remove if num_remove is not None else blocks_for_ratio(ratio, num_blocks)
    max_remove = num_blocks - early_barrier - latter_barrier
    if count > max_remove:
        raise SlebError(f"cannot remove {count} blocks: {num_blocks} blocks, {max_remove} of them candidates")

    windows = data.calibration(tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    click.echo(f"{model}: {num_blocks} blocks; removing {count} with SLEB on {nsamples} x {seqlen} tokens of {calib}",
               err=True)
    result = search(lm, windows, count, batch_size=batch_size, early_barrier=early_barrier,
                    latter_barrier=latter_barrier, checkpoint=checkpoint)
    remove_blocks(lm, result.removed)
    save(lm, tokenizer, out_dir, result, overwrite=overwrite,
         report={"source": model, "calibration_spec": calib, "seed": seed})
    click.echo(summary(result))
    click.echo(f"saved to {out_dir}")


@main.command()
@click.argument("models_", metavar="MODEL [MODEL ...]", nargs=-1, required=True)
@click.option("--prefill-batch", default=1, show_default=True, type=int, callback=_positive,
              help="Prompts per prompt-processing pass.")
@click.option("--prefill-len", default=2048, show_default=True, type=int, callback=_positive,
              help="Tokens per prompt for prompt processing.")
@click.option("--gen-batch", default=64, show_default=True, type=int, callback=_positive,
              help="Sequences generated together.")
@click.option("--gen-prompt", default=64, show_default=True, type=int, callback=_positive,
              help="Prompt tokens per sequence for generation.")
@click.option("--gen-tokens", default=128, show_default=True, type=int, callback=_positive,
              help="New tokens per sequence (exactly: EOS is suppressed).")
@click.option("--warmup", default=1, show_default=True, type=int, callback=_positive,
              help="Untimed runs per model and workload first (the first also measures peak memory).")
@click.option("--repeats", default=5, show_default=True, type=int, callback=_positive,
              help="Timed runs per model and workload; the median is reported.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the input token ids.")
@click.option("--prefill/--no-prefill", default=True, show_default=True, help="Measure prompt processing.")
@click.option("--generation/--no-generation", default=True, show_default=True, help="Measure generation.")
@click.option("--threads", type=int, callback=_positive, help="CPU threads for torch (default: torch's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every measurement to this file.")
@with_model_options
def bench(models_, prefill_batch, prefill_len, gen_batch, gen_prompt, gen_tokens, warmup, repeats, seed,
          prefill, generation, threads, json_path, dtype, device, trust_remote_code):
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
    config = bench_mod.BenchConfig(prefill_batch=prefill_batch, prefill_len=prefill_len, gen_batch=gen_batch,
                                   gen_prompt=gen_prompt, gen_tokens=gen_tokens, warmup=warmup, repeats=repeats,
                                   seed=seed, prefill=prefill, generation=generation)
    config.validate()
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

"""The `sleb` command line: a thin shell over the Python API (one subcommand per pipeline stage)."""

from __future__ import annotations

import errno
import functools
import inspect
import signal
import sys
import warnings

import click

from . import distributed, loading
from .bench import BenchJob
from .llamacpp_bench import FLASH_ATTENTION, NO_LLAMA_BENCH, LlamaCppJob
from .frontier import GEN_TOKENS, check_unit_score
from .compare import DEFAULT_METRICS, DEFAULT_RATIOS, CompareJob
from .config import EvalConfig, PruneConfig
from .settings import (ANGULAR_TOKENS, COMPENSATIONS, HEAL_DEFAULT, HEAL_PARAMETER_SETS, OUTPUT_FORMATS, REFINEMENTS,
                       UNIT_SCORES, UNITS, Calibration, Compensation, Healing, Racing, SearchOptions)
from .criteria import describe_criteria
from .report import write_report
from .errors import BadInput, SlebError, SlebWarning, UsageError, one_line as _one_line
from .progress import quiet_library_bars


def _error(text: str) -> None:
    # Under torchrun every rank may fail; the line says which (the others print nothing but errors).
    rank = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
    click.echo(f"Error: {rank}{text}", err=True)


def say(message: str = "", err: bool = False) -> None:
    """click.echo on rank 0 only (every process outside torchrun is rank 0)."""
    if distributed.is_main():
        click.echo(message, err=err)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `docker stop`, SLURM and torchrun send), raised like Ctrl-C so that every
    writer removes its temporaries on the way out; the exit code is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def _show_warning(message, category, filename, lineno, file=None, line=None, _python=warnings.showwarning):
    """sleb's own warnings as one `Warning: ...` line (no file and line number); others as Python shows them."""
    if issubclass(category, SlebWarning):
        say(f"Warning: {_one_line(message)}", err=True)
    else:
        _python(message, category, filename, lineno, file, line)


class _Group(click.Group):
    """One error path for every command: a SlebError is one line and exit 1; any other exception is
    one line naming its type, a hint to rerun with --debug, and exit 1; Ctrl-C is exit 130.
    Click reports usage errors itself (exit 2). With --debug, the traceback is shown instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except SlebError as err:
            if ctx.meta.get("sleb.debug"):
                raise
            _error(_one_line(err))
            sys.exit(1)
        except Terminated as err:
            if ctx.meta.get("sleb.debug"):
                raise
            name = signal.Signals(err.signum).name
            if distributed.world_size() > 1:
                _error(f"stopped by {name}: another rank failed or the job was stopped; nothing was written")
            else:
                _error(f"stopped by {name}; nothing was written (a --checkpoint keeps finished steps)")
            sys.exit(128 + err.signum)
        except KeyboardInterrupt:
            if ctx.meta.get("sleb.debug"):
                raise
            _error("interrupted; nothing was written (a --checkpoint keeps finished steps)")
            sys.exit(130)
        except Exception as err:  # the last resort: no traceback unless asked for
            if ctx.meta.get("sleb.debug"):
                raise
            if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:
                _error(f"a path is longer than the filesystem allows: {str(err.filename)[:80]}...")
                sys.exit(1)
            if distributed.world_size() > 1 and distributed.waited_too_long(err):
                _error(distributed.waited_too_long(err))
                sys.exit(1)
            if distributed.world_size() > 1 and distributed.is_peer_failure(err):
                _error("stopped: another rank failed or the connection between ranks broke (see its error)")
                sys.exit(1)
            _error(f"{type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)")
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sleb")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line.")
@click.pass_context
def main(ctx, debug):
    """Remove redundant transformer blocks from a causal LM (SLEB, Song et al., ICML 2024)."""
    ctx.meta["sleb.debug"] = debug
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    warnings.showwarning = _show_warning
    quiet_library_bars()  # through a pipe, only sleb's own progress, as plain lines


def _check_ratio(ctx, param, value):
    if value is not None and not 0 < value < 1:
        raise click.BadParameter(f"must be in (0, 1), got {value}")
    return value


def _positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}")
    return value


def _non_negative(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter(f"must be 0 or more, got {value}")
    return value


model_options = [
    click.option("--dtype", default=PruneConfig.dtype, show_default=True, type=click.Choice(sorted(loading.DTYPES)),
                 help="Weights dtype; auto keeps the checkpoint's (GGUF gives float32)."),
    click.option("--device", default=PruneConfig.device, show_default=True,
                 help="auto (all GPUs via accelerate, else CPU), cpu, cuda, cuda:N."),
    click.option("--trust-remote-code", is_flag=True, help="Run model code shipped with the checkpoint."),
]


# `sleb report`'s flags default to `write_report`'s keywords (its settings have no config of their own).
_REPORT_DEFAULTS = inspect.signature(write_report).parameters


def given_flags(ctx: click.Context) -> set[str]:
    """The long flags the user gave on the command line (or through the environment), not their defaults."""
    sources = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {max(param.opts, key=len) for param in ctx.command.params
            if isinstance(param, click.Option) and ctx.get_parameter_source(param.name) in sources}


def with_model_options(func):
    for option in reversed(model_options):
        func = option(func)
    return func


# --heal's settings, shared by `sleb prune` and `sleb compare` (each names what its --heal does).
HEAL_FLAGS = ("--heal-minutes", "--heal-steps", "--heal-windows", "--heal-heldout-windows", "--heal-seqlen",
              "--heal-batch-size", "--heal-lr", "--heal-top-k", "--heal-eval-every", "--heal-patience",
              "--heal-lora-rank", "--heal-last-blocks", "--heal-checkpointing")


def with_heal_options(what: str):
    """The --heal options, handed to the command as one `healing` (`sleb.settings.Healing`); `what` starts
    --heal's help."""
    options = [
        click.option("--heal", "heal_params", type=click.Choice(HEAL_PARAMETER_SETS), is_flag=False,
                     flag_value=HEAL_DEFAULT,
                     help=f"{what}, training only this parameter set (alone: {HEAL_DEFAULT}). Needs --heal-minutes "
                          "and/or --heal-steps. See docs/healing.md."),
        click.option("--heal-minutes", type=float, help="--heal: wall-clock budget, the dense model's pass included."),
        click.option("--heal-steps", type=int, help="--heal: at most this many optimizer steps."),
        click.option("--heal-windows", default=Healing.windows, show_default=True, type=int,
                     help="--heal: training windows (non-overlapping, from the calibration text's train part)."),
        click.option("--heal-heldout-windows", default=Healing.heldout_windows, show_default=True, type=int,
                     help="--heal: windows kept apart for early stopping (never trained on)."),
        click.option("--heal-seqlen", type=int, help="--heal: tokens per window (default: --seqlen)."),
        click.option("--heal-batch-size", default=Healing.batch_size, show_default=True, type=int,
                     help="--heal: windows per optimizer step (under torchrun, shared by the ranks)."),
        click.option("--heal-lr", type=float,
                     help="--heal: learning rate (default: the parameter set's, see docs/healing.md)."),
        click.option("--heal-top-k", default=Healing.top_k, show_default=True, type=int,
                     help="--heal: the dense model's top-k next-token log-probs the KL is computed over (plus the "
                          "rest)."),
        click.option("--heal-eval-every", default=Healing.eval_every, show_default=True, type=int,
                     help="--heal: steps between held-out measurements."),
        click.option("--heal-patience", default=Healing.patience, show_default=True, type=int,
                     help="--heal: stop after this many held-out measurements without improvement."),
        click.option("--heal-lora-rank", default=Healing.lora_rank, show_default=True, type=int,
                     help="--heal lora: rank."),
        click.option("--heal-last-blocks", default=Healing.last_blocks, show_default=True, type=int,
                     help="--heal tail: how many last blocks train with the head."),
        click.option("--heal-checkpointing/--no-heal-checkpointing", default=Healing.checkpointing,
                     show_default=True,
                     help="--heal: recompute the blocks' activations in the backward pass instead of keeping them "
                          "(less memory, about a third more time a step; docs/healing.md)."),
    ]

    def decorator(func):
        @functools.wraps(func)
        def command(*args, heal_params, heal_minutes, heal_steps, heal_windows, heal_heldout_windows, heal_seqlen,
                    heal_batch_size, heal_lr, heal_top_k, heal_eval_every, heal_patience, heal_lora_rank,
                    heal_last_blocks, heal_checkpointing, **kwargs):
            healing = Healing(heal_params, minutes=heal_minutes, steps=heal_steps, windows=heal_windows,
                              heldout_windows=heal_heldout_windows, seqlen=heal_seqlen, batch_size=heal_batch_size,
                              lr=heal_lr, top_k=heal_top_k, eval_every=heal_eval_every, patience=heal_patience,
                              lora_rank=heal_lora_rank, last_blocks=heal_last_blocks,
                              checkpointing=heal_checkpointing)
            return func(*args, healing=healing, **kwargs)

        for option in reversed(options):
            command = option(command)
        return command

    return decorator


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(),
              help="Folder for the pruned checkpoint, or a .gguf file (report beside it: OUT.gguf.sleb_report.json).")
@click.option("--format", "out_format", type=click.Choice(OUTPUT_FORMATS), default=PruneConfig.out_format,
              show_default=True, help="Output format; auto: GGUF when the output ends in .gguf. A GGUF source keeps "
                                      "its kept blocks byte for byte.")
@click.option("--gguf-type", type=click.Choice(["f16", "bf16", "q8_0"]),
              help="Tensor type when writing GGUF from a Hugging Face model (default f16).")
@click.option("--remove", "num_remove", type=int, callback=_positive, help="Number of blocks to remove.")
@click.option("--ratio", type=float, callback=_check_ratio,
              help="Fraction of blocks to remove, rounded up as in the paper (0.2 of 32 blocks removes 7).")
@click.option("--target-params", type=float,
              help="Remove blocks until at most this many parameters remain: a fraction of the dense model's "
                   "(e.g. 0.8) or an absolute count (e.g. 110e6).")
@click.option("--target-speedup", type=float,
              help="Remove blocks until the speedup reaches this: the ideal one (forward FLOPs per token at --seqlen, "
                   "as sleb bench), or with --speed-at the one the measured cost model predicts.")
@click.option("--max-ppl-increase", type=float,
              help="Stop before calibration perplexity would exceed this multiple of the dense model's "
                   "(alone: remove as many blocks as stay within it).")
@click.option("--metric", default=PruneConfig.metric, show_default=True,
              help="Redundancy criterion: " + describe_criteria() + ".")
@click.option("--angular-tokens", type=click.Choice(ANGULAR_TOKENS), default=SearchOptions.angular_tokens,
              show_default=True,
              help="Tokens the angular criterion compares.")
@click.option("--refine", type=click.Choice(REFINEMENTS),
              help="After the search, exchange removed and kept blocks while that lowers the calibration loss.")
@click.option("--refine-seconds", type=float, help="Time budget for --refine (checked between rounds).")
@click.option("--beam", type=int, callback=_positive, help="Beam width: keep the W best removal sets at each step.")
@click.option("--eval", "eval_spec", help="Also report held-out perplexity on this spec's test part "
                                          "(dense, the search's set and, with --refine/--beam, the refined set).")
@click.option("--eval-windows", type=int, callback=_positive, help="At most this many --eval windows.")
@click.option("--from-report", type=click.Path(),
              help="Apply the first --remove N (or --ratio R) removals of an earlier run's sleb_report.json "
                   "without searching.")
@click.option("--calib", default=Calibration.spec, show_default=True,
              help="Calibration text: wikitext2, c4, gensim-wiki, gensim-lee, or a .txt/.jsonl/.parquet file.")
@click.option("--nsamples", default=Calibration.nsamples, show_default=True, type=int, callback=_positive,
              help="Calibration windows.")
@click.option("--seqlen", default=Calibration.seqlen, show_default=True, type=int, callback=_positive,
              help="Tokens per window.")
@click.option("--seed", default=SearchOptions.seed, show_default=True, type=int,
              help="Seed for drawing the windows (and --metric random).")
@click.option("--batch-size", default=SearchOptions.batch_size, show_default=True, type=int, callback=_positive,
              help="Windows per forward pass (speed only).")
@click.option("--early-barrier", default=SearchOptions.early_barrier, show_default=True, type=int,
              callback=_non_negative, help="First alive blocks never removed.")
@click.option("--latter-barrier", default=SearchOptions.latter_barrier, show_default=True, type=int,
              callback=_non_negative, help="Last alive blocks never removed.")
@click.option("--checkpoint", type=click.Path(),
              help="Search state file, written each step (with --heal also PATH.heal, the heal's state); "
                   "rerun to resume.")
@click.option("--unit", type=click.Choice(UNITS), default=SearchOptions.unit, show_default=True,
              help="What is removed: whole blocks; each block's attention and MLP branch (sublayer); or attention "
                   "branches only (attention: a smaller KV cache). Branch results are saved in the DeciLM "
                   "(Nemotron-NAS) layout; see docs/sublayers.md.")
@click.option("--unit-score", type=click.Choice(UNIT_SCORES), default=SearchOptions.unit_score, show_default=True,
              help="With --unit sublayer/attention: remove the unit with the lowest calibration loss, or the lowest "
                   "loss increase per parameter removed, or per second saved (--speed-at's measured cost, else FLOPs "
                   "per token; units differ in size; exact search only).")
@click.option("--speed-at", default=SearchOptions.speed_at,
              help="The cost model: time every block (and attention and MLP unit) in transformers at prefill:N (one "
                   "pass over N tokens) or generation:N (one token at N tokens of context) before the search; "
                   "--target-speedup and --unit-score per-second then count measured seconds (default: FLOPs).")
@click.option("--racing", is_flag=True,
              help="Racing search: stop scoring candidates that cannot win or that a sequential paired test finds "
                   "worse than the leader with --confidence (faster; the report says which scores are complete).")
@click.option("--confidence", default=Racing.confidence, show_default=True, type=float,
              help="--racing: per-step confidence that the pick is within --tolerance of the best candidate "
                   "(1 = exact picks).")
@click.option("--tolerance", default=Racing.tolerance, show_default=True, type=float,
              help="--racing: how much worse than the best candidate's calibration loss the pick may be, as a "
                   "fraction (0 = the best itself; slower when candidates nearly tie).")
@click.option("--racing-guesses", default=Racing.guesses, show_default=True, type=int, callback=_positive,
              help="--racing: likely leaders each step scores on every window first; the best is the reference.")
@click.option("--min-windows", default=Racing.min_windows, show_default=True, type=int,
              help="--racing: no candidate is dropped on fewer windows than this.")
@click.option("--compensate", "compensation", type=click.Choice(COMPENSATIONS),
              help="Fold a linear map fitted on the calibration windows into the kept block before each removed run "
                   "(ReplaceMe): least squares, or cosine distance refined from it. Same shapes and speed.")
@click.option("--compensate-aware", is_flag=True,
              help="With --compensate and --remove/--ratio: at each SLEB step, re-score the best candidates with "
                   "their compensation fitted and remove the best compensated one.")
@click.option("--compensate-top-k", default=Compensation.top_k, show_default=True, type=int, callback=_positive,
              help="Candidates re-scored per step by --compensate-aware.")
@click.option("--compensate-ridge", default=Compensation.ridge, show_default=True,
              help="Ridge towards the identity, relative to trace(M^T M)/d, or 'auto' (4-fold cross-validation "
                   "over the calibration windows).")
@with_heal_options("After removal (and --compensate): distil the pruned model toward the dense one on the "
                   "calibration text")
@click.option("--offload-dir", type=click.Path(file_okay=False),
              help="Keep the decoder blocks on disk and stream them in one at a time (accelerate's disk offload): "
                   "for models larger than memory. sleb uses a temporary folder inside it and deletes it after.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@with_model_options
def prune(model, out_dir, num_remove, ratio, target_params, target_speedup, max_ppl_increase, metric, angular_tokens,
          refine, refine_seconds, beam, eval_spec, eval_windows, from_report, calib, nsamples, seqlen, seed,
          batch_size, early_barrier, latter_barrier, checkpoint, unit, unit_score, speed_at, racing, confidence, tolerance,
          racing_guesses,
          min_windows, compensation, compensate_aware, compensate_top_k,
          compensate_ridge, healing, offload_dir, overwrite, dtype, device,
          trust_remote_code, out_format=PruneConfig.out_format, gguf_type=None):
    """Find MODEL's most redundant blocks (SLEB by default), remove them and save the smaller model.

    MODEL is a hub id, a local folder, a .gguf file, or smollm2-135m (offline). Budgets: one of
    --remove, --ratio, --target-params, --target-speedup, optionally with --max-ppl-increase.
    """
    device = distributed.init_from_env(device)
    from .config import Budget, HeldOut, Refinement
    from .pipeline import prune as run_prune
    from .runfile import speed_line, summary

    try:
        ridge = compensate_ridge if compensate_ridge == "auto" else float(compensate_ridge)
    except ValueError as err:
        raise click.BadParameter(f"a number or 'auto', got {compensate_ridge!r}", param_hint="--compensate-ridge") from err
    config = PruneConfig(
        model, out_dir,
        Budget(remove=num_remove, ratio=ratio, target_params=target_params, target_speedup=target_speedup,
               max_ppl_increase=max_ppl_increase, speedup_context=seqlen),
        metric=metric,
        search=SearchOptions(batch_size=batch_size, early_barrier=early_barrier, latter_barrier=latter_barrier,
                             seed=seed, angular_tokens=angular_tokens, unit=unit,
                             unit_score=unit_score, speed_at=speed_at),
        racing=Racing(confidence=confidence, tolerance=tolerance, min_windows=min_windows,
                      guesses=racing_guesses) if racing else None,
        calibration=Calibration(calib, nsamples=nsamples, seqlen=seqlen),
        heldout=HeldOut(eval_spec, eval_windows),
        refine=Refinement(refine, beam=beam, seconds=refine_seconds),
        compensation=Compensation(compensation, aware=compensate_aware, top_k=compensate_top_k, ridge=ridge),
        heal=healing,
        from_report=from_report, checkpoint=checkpoint, offload_dir=offload_dir, out_format=out_format,
        gguf_type=gguf_type, overwrite=overwrite, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    run = run_prune(config, log=lambda message: say(message, err=True), given=given_flags(click.get_current_context()))
    result = run.result
    say(summary(result))
    budget_info = result.budget
    if budget_info:  # a compensation-aware search has its own count
        say(f"stopped by {budget_info.get('stopped_by')}: {budget_info.get('reason')}; "
            f"{budget_info.get('parameters_after'):,} parameters, ideal speedup {budget_info.get('ideal_speedup'):.3f}x")
    if result.refine is not None:
        r = result.refine
        say(f"calibration loss: greedy {r['greedy_loss']:.4f} (ppl {r['greedy_calibration_ppl']:.3f}) -> "
                   f"refined {r['loss']:.4f} (ppl {r['calibration_ppl']:.3f})")
    if eval_spec is not None:
        h = result.heldout_ppl
        line = f"held-out perplexity on {eval_spec}: dense {h['dense']:.3f}, pruned {h['pruned']:.3f}"
        if "pruned_unhealed" in h and (result.healing or {}).get("best_step"):  # not when the untrained state was kept
            line += f" (healed; before healing {h['pruned_unhealed']:.3f})"
        if "pruned_plain" in h:
            line += f" (compensated; plain removal {h['pruned_plain']:.3f})"
        if "greedy" in h:
            line += f" (greedy {h['greedy']:.3f})"
        say(line)
    say(f"saved to {out_dir}")
    if result.speed is not None:
        say(speed_line(result))
    distributed.finish()


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(),
              help="Folder for compare.md, compare.json and compare.png (frontier.* with --target-speedup).")
@click.option("--metrics", help=f"Comma-separated criteria (default: {','.join(DEFAULT_METRICS)}; with --unit "
                                "sublayer or attention, those of them that rank units): " + describe_criteria() + ".")
@click.option("--ratio", "ratios",
              help="Comma-separated fractions of blocks to remove (each rounded up); with --unit sublayer or "
                   "attention, fractions of the blocks' parameters (the fewest units that reach each). Default: "
                   + ",".join(map(str, DEFAULT_RATIOS)) + "; not with --target-speedup.")
@click.option("--calib", default=Calibration.spec, show_default=True, help="Calibration text spec (its train part).")
@click.option("--eval", "eval_specs", default=",".join(CompareJob.eval_specs), show_default=True,
              help="Comma-separated evaluation specs (their test parts; must not overlap calibration).")
@click.option("--nsamples", default=Calibration.nsamples, show_default=True, type=int, callback=_positive,
              help="Calibration windows.")
@click.option("--seqlen", default=Calibration.seqlen, show_default=True, type=int, callback=_positive,
              help="Tokens per window.")
@click.option("--eval-windows", type=int, callback=_positive, help="At most this many evaluation windows per spec.")
@click.option("--eval-seqlen", type=int, callback=_positive,
              help="Tokens per evaluation window (default: --seqlen); e.g. search on short windows, judge on long.")
@click.option("--seed", default=SearchOptions.seed, show_default=True, type=int,
              help="Seed for the windows and --metrics random.")
@click.option("--angular-tokens", type=click.Choice(ANGULAR_TOKENS), default=SearchOptions.angular_tokens,
              show_default=True)
@click.option("--batch-size", default=SearchOptions.batch_size, show_default=True, type=int, callback=_positive)
@click.option("--early-barrier", default=SearchOptions.early_barrier, show_default=True, type=int,
              callback=_non_negative, help="First blocks never removed.")
@click.option("--latter-barrier", default=SearchOptions.latter_barrier, show_default=True, type=int,
              callback=_non_negative, help="Last blocks never removed.")
@click.option("--compensate", "compensation", type=click.Choice(COMPENSATIONS),
              help="Also evaluate every criterion's blocks with this compensation fitted (rows named "
                   "criterion+linear); with --metrics contiguous-cosine this is ReplaceMe.")
@click.option("--unit", default=SearchOptions.unit, show_default=True,
              help=f"What the criteria remove ({'|'.join(UNITS)}): whole blocks, each block's attention and MLP "
                   "branch (sublayer), or attention branches only; see docs/sublayers.md. With --target-speedup, "
                   "a comma-separated list: one frontier line per unit kind.")
@click.option("--unit-score", type=click.Choice(UNIT_SCORES),
              help="With --unit sublayer/attention: sleb removes the unit with the lowest calibration loss (the "
                   "default), or the lowest loss increase per parameter removed, or per FLOP saved (per-second, in "
                   "the FLOP ideal without --target-speedup; the frontier always ranks units per second saved).")
@click.option("--target-speedup", "target_speedups",
              help="The frontier: comma-separated speedups (each above 1) in the measured cost model of "
                   "--speed-at; for each --unit kind and each, SLEB's search, held-out perplexity and the pruned "
                   "model timed with sleb bench. Writes frontier.md, frontier.json and frontier.png.")
@click.option("--speed-at", default=SearchOptions.speed_at,
              help="With --target-speedup: the shape every block and unit is timed at (once, on the dense model) "
                   "and each pruned model is benchmarked at: prefill:N (one pass over N tokens) or generation:N "
                   f"(new tokens after an N-token prompt; the bench makes {GEN_TOKENS}).")
@click.option("--refine-seconds", type=float,
              help="With --target-speedup: time budget of each attention/sublayer point's swap refinement (checked "
                   "between rounds; default: as long as its search took, at least 30 s).")
@with_heal_options("With --target-speedup: also heal every point (a healed row beside each plain one, at its "
                   "measured speed), as sleb prune --heal would: distil it toward the dense model on the calibration "
                   "text")
@click.option("--overwrite", is_flag=True,
              help="Replace compare.json/.md/.png (or frontier.*) in -o if an earlier sleb compare wrote them.")
@with_model_options
def compare(model, out_dir, metrics, ratios, calib, eval_specs, nsamples, seqlen, eval_windows, eval_seqlen, seed,
            angular_tokens, batch_size, early_barrier, latter_barrier, compensation, unit, unit_score, target_speedups,
            speed_at, refine_seconds, healing, overwrite, dtype, device, trust_remote_code):
    """Run each criterion at each ratio on the same windows and tabulate held-out perplexity.

    With --target-speedup and --speed-at: the frontier, held-out perplexity against measured speedup for
    each --unit kind (docs/sublayers.md).
    """
    from . import frontier
    from .compare import CompareJob, markdown, run_compare
    from .settings import Calibration, SearchOptions

    for flag in sorted(given_flags(click.get_current_context()) & set(HEAL_FLAGS)):
        if not healing.wanted:
            raise BadInput(f"{flag} applies only with --heal; give that too, or leave {flag} out")
    ratio_list = None if ratios is None else _numbers(ratios, "--ratio")
    targets = None if target_speedups is None else _numbers(target_speedups, "--target-speedup")
    units = _split_list(unit)
    if targets is not None:
        check_unit_score(unit_score, units)
    # One unit kind is the search's; several (the frontier only) go to the job, which sets each one's search.
    options = SearchOptions(batch_size=batch_size, early_barrier=early_barrier, latter_barrier=latter_barrier,
                            seed=seed, angular_tokens=angular_tokens,
                            unit=units[0] if len(units) == 1 else SearchOptions.unit,
                            unit_score=unit_score if targets is None and unit_score else SearchOptions.unit_score,
                            speed_at=speed_at)
    job = CompareJob(model, out_dir, metrics=None if metrics is None else _split_list(metrics), ratios=ratio_list,
                     calibration=Calibration(calib, nsamples=nsamples, seqlen=seqlen),
                     eval_specs=_split_list(eval_specs), eval_windows=eval_windows, eval_seqlen=eval_seqlen,
                     search=options, compensation=compensation, target_speedups=targets, refine_seconds=refine_seconds,
                     healing=healing,
                     units=None if len(units) == 1 else units, overwrite=overwrite,
                     dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    table = run_compare(job, log=lambda s: click.echo(s, err=True))
    if job.frontier:
        click.echo(frontier.markdown(table))
        click.echo(f"wrote {out_dir}/{', '.join(frontier.FRONTIER_FILES)}")
        return
    click.echo(markdown(table))
    click.echo(f"wrote {out_dir}/compare.md, compare.json, compare.png")


def _numbers(value: str, flag: str) -> list[float]:
    """`1.1, 1.2` -> [1.1, 1.2]; BadInput (one line) for anything else."""
    try:
        return [float(item) for item in _split_list(value)]
    except ValueError as err:
        raise BadInput(f"{flag} must be comma-separated numbers, got {value!r}") from err


def _click_usage(err: UsageError) -> click.UsageError:
    """A config's `UsageError` as click reports its own (exit 2)."""
    return click.BadParameter(err.reason, param_hint=err.flag) if err.flag else click.UsageError(str(err))


def _split_list(value: str | None) -> list[str]:
    """`a,b , c` -> ["a", "b", "c"] (empty items dropped)."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


@main.command("eval")
@click.argument("model_names", metavar="MODEL [MODEL ...]", nargs=-1, required=True)
@click.option("--ppl", "ppl_specs",
              help="Perplexity on these text specs, comma-separated: wikitext2, c4, gensim-wiki, gensim-lee, "
                   "or .txt/.jsonl/.parquet files (their test parts).")
@click.option("--seqlen", default=EvalConfig.seqlen, show_default=True, type=int, callback=_positive,
              help="Tokens per perplexity window.")
@click.option("--batch-size", default=EvalConfig.batch_size, show_default=True, type=int, callback=_positive,
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
@click.option("--overwrite", is_flag=True, help="Replace --json/--markdown files if an earlier sleb run wrote them.")
@with_model_options
def eval_command(model_names, ppl_specs, seqlen, batch_size, max_windows, task_names, limit, num_fewshot,
                 include_path, json_path, markdown_path, overwrite, dtype, device, trust_remote_code):
    """Evaluate models side by side: perplexity and zero-shot accuracy in one table.

    MODEL is a hub id, a local folder (e.g. a pruned checkpoint), a .gguf file, or smollm2-135m
    (offline). Give the dense model first: later rows show their change against it. Whatever
    finished before a failure is still written to --json/--markdown.
    """
    from .config import EvalConfig
    from .eval_table import render_text, run_eval

    config = EvalConfig(list(model_names), _split_list(ppl_specs), seqlen=seqlen, batch_size=batch_size,
                        max_windows=max_windows, tasks=_split_list(task_names), limit=limit, num_fewshot=num_fewshot,
                        include_path=include_path, json_path=json_path, markdown_path=markdown_path,
                        overwrite=overwrite, dtype=dtype, device=distributed.init_from_env(device),
                        trust_remote_code=trust_remote_code)
    try:
        rows = run_eval(config, log=lambda message: say(message, err=True))
    except UsageError as err:
        raise _click_usage(err) from err
    say(render_text(rows))
    for path in (json_path, markdown_path):
        if path:
            say(f"wrote {path}", err=True)
    distributed.finish()


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("-o", "--output", "out_dir", type=click.Path(),
              help="Folder for report.md and the PNGs (default: RUN_DIR; OUT.gguf.report/ for a .gguf output).")
@click.option("--generate/--no-generate", default=True, show_default=True,
              help="Add greedy generations of the dense and the pruned model, side by side.")
@click.option("--max-new-tokens", default=_REPORT_DEFAULTS["max_new_tokens"].default, show_default=True, type=int,
              callback=_positive,
              help="Tokens generated per prompt.")
@click.option("--dtype", default=_REPORT_DEFAULTS["dtype"].default, show_default=True,
              type=click.Choice(sorted(loading.DTYPES)), help="Weights dtype for the generations.")
@click.option("--device", default=_REPORT_DEFAULTS["device"].default, show_default=True,
              help="Device for the generations.")
@click.option("--overwrite", is_flag=True, help="Replace report.md and the PNGs if an earlier sleb report wrote them.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run model code shipped in the folders (needed for the generations of a --unit sublayer output, "
                   "whose DeciLM code sleb wrote there).")
def report(run_dir, out_dir, generate, max_new_tokens, dtype, device, overwrite, trust_remote_code):
    """Write RUN_DIR/report.md with plots of the search, eval tables and sample generations.

    RUN_DIR is an output of `sleb prune`: its folder or sleb_report.json, or a .gguf output or the
    OUT.gguf.sleb_report.json beside it. Eval JSONs written
    there by `sleb eval --json` are included. The dense model (the report's source) is loaded for
    the generations when it can be; otherwise only the pruned model's are shown.
    """
    loading.check_device(device)
    path = write_report(run_dir, out_dir, generate=generate, max_new_tokens=max_new_tokens, dtype=dtype,
                        device=device, overwrite=overwrite, trust_remote_code=trust_remote_code)
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
@click.option("--cache", type=click.Choice(["auto", "static", "dynamic"]), default=BenchJob.cache, show_default=True,
              help="KV cache for generation: static (preallocated; compiled decode step on CUDA, as serving stacks "
                   "run) or dynamic (generate()'s default). auto: static on CUDA, dynamic elsewhere.")
@click.option("--warmup", default=BenchJob.warmup, show_default=True, type=int, callback=_positive,
              help="Untimed runs per model and workload first (the first also measures peak memory); more follow "
                   "until the last two agree within 25% (compilation).")
@click.option("--repeats", default=BenchJob.repeats, show_default=True, type=int, callback=_positive,
              help="Timed runs per model and workload; the median is reported.")
@click.option("--max-repeats", type=int, callback=_positive,
              help="More timed runs, up to this many, while a model's spread is above 5% (default: 3 x --repeats).")
@click.option("--seed", default=BenchJob.seed, show_default=True, type=int, help="Seed for the input token ids.")
@click.option("--prefill/--no-prefill", default=True, show_default=True, help="Measure prompt processing.")
@click.option("--generation/--no-generation", default=True, show_default=True, help="Measure generation.")
@click.option("--threads", type=int, callback=_positive, help="CPU threads for torch (default: torch's), or for llama.cpp (default: every core but one).")
@click.option("--json", "json_path", type=click.Path(), help="Write every measurement to this file.")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if an earlier sleb run wrote it.")
@click.option("--runtime", type=click.Choice(["transformers", "llama.cpp"]), default="transformers", show_default=True,
              help="llama.cpp: time .gguf files in a real llama.cpp (prefill and generation tokens/s, ideal speedups "
                   "from bytes read and FLOPs per token): its llama-bench where found, else node-llama-cpp "
                   "(`sleb setup-runtime`); see docs/benchmarking.md.")
@click.option("--flash-attention", type=click.Choice(FLASH_ATTENTION), default=LlamaCppJob.flash_attention,
              show_default=True, help="llama.cpp: flash attention for every file alike (checked in llama.cpp's log "
                                      "and recorded).")
@click.option("--llama-bench", "llama_bench", metavar="PATH",
              help="llama.cpp: the llama-bench binary to time with (default: llama-bench on PATH, else node-llama-cpp; "
                   f"{NO_LLAMA_BENCH}: node-llama-cpp).")
@with_model_options
def bench(models_, paper, prefill_batch, prefill_len, gen_batch, gen_prompt, gen_tokens, cache, warmup, repeats,
          max_repeats, seed, prefill, generation, threads, json_path, overwrite, runtime, flash_attention, llama_bench,
          dtype, device, trust_remote_code):
    """Measure prompt processing, generation throughput and memory of each MODEL on the same inputs.

    The first MODEL is the baseline: every other gets its measured speedup and, beside it, the
    ideal speedup its forward FLOPs predict. Models are timed in alternation.
    """
    typed = click.get_current_context().get_parameter_source
    if runtime == "llama.cpp":
        from .llamacpp_bench import format_table as llama_table, run_llamacpp_bench

        # llama.cpp runs each file in its own types on the CPU: --dtype/--device typed out (even as auto) are refused.
        given = [name for name, value in (("--paper", paper), ("--prefill-batch", prefill_batch),
                                          ("--gen-batch", gen_batch), ("--max-repeats", max_repeats),
                                          ("--cache", cache != "auto"),
                                          ("--dtype", typed("dtype") != click.core.ParameterSource.DEFAULT),
                                          ("--device", typed("device") != click.core.ParameterSource.DEFAULT),
                                          ("--trust-remote-code", trust_remote_code)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} applies to --runtime transformers only")
        job = LlamaCppJob(list(models_), prefill_len=(prefill_len or LlamaCppJob.prefill_len) if prefill else 0,
                          gen_prompt=gen_prompt or LlamaCppJob.gen_prompt,
                          gen_tokens=(gen_tokens or LlamaCppJob.gen_tokens) if generation else 0,
                          rounds=repeats, warmup=warmup, threads=threads, json_path=json_path, overwrite=overwrite,
                          flash_attention=flash_attention, llama_bench=llama_bench)
        click.echo(llama_table(run_llamacpp_bench(job)))
        if json_path:
            click.echo(f"wrote {json_path}", err=True)
        return
    flash_given = typed("flash_attention") != click.core.ParameterSource.DEFAULT
    given = [name for name, value in (("--flash-attention", flash_given), ("--llama-bench", llama_bench is not None))
             if value]
    if given:
        raise UsageError(f"{', '.join(given)} applies to --runtime llama.cpp only")
    from .bench import BenchJob, format_table, run_bench

    job = BenchJob(list(models_), prefill_batch=prefill_batch, prefill_len=prefill_len, gen_batch=gen_batch,
                   gen_prompt=gen_prompt, gen_tokens=gen_tokens, paper=paper, cache=cache, warmup=warmup,
                   repeats=repeats, max_repeats=max_repeats, seed=seed, prefill=prefill, generation=generation,
                   threads=threads, json_path=json_path, overwrite=overwrite, dtype=dtype, device=device,
                   trust_remote_code=trust_remote_code)
    result = run_bench(job, progress=lambda message: click.echo(message, err=True))
    click.echo(format_table(result))
    if json_path:
        click.echo(f"wrote {json_path}", err=True)


@main.command("setup-runtime")
def setup_runtime():
    """Install the llama.cpp that `sleb bench --runtime llama.cpp` uses where llama-bench is not on PATH.

    npm installs node-llama-cpp (prebuilt llama.cpp CPU binaries; nothing is compiled) into sleb's cache:
    $SLEB_LLAMA_RUNTIME if set, else llama_runtime in $SLEB_CACHE, $XDG_CACHE_HOME/sleb or ~/.cache/sleb,
    where bench then finds it. Needs Node.js >= 20 with npm.
    """
    from .llamacpp_bench import NODE_PACKAGE, NODE_VERSION, install_node_runtime

    folder = install_node_runtime()
    click.echo(f"{NODE_PACKAGE} {NODE_VERSION} is in {folder}: sleb bench --runtime llama.cpp uses it where "
               "llama-bench is not on PATH")


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
    from .outputs import check_output_folder

    loading.check_device(device)
    check_output_folder(out_dir, inputs=loading.local_paths(model), overwrite=overwrite)
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

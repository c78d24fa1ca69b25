"""The settings of a `sleb prune` (and `sleb eval`) run as one typed value, built once and passed down unchanged.

The CLI builds a `PruneConfig` from its flags; Python users build it themselves. `validate()`
checks everything that can be checked without a model, in one place, raising `BadInput`;
`pipeline.prune` then hands the parts (`sleb.settings`: budget, search options, racing,
calibration, held-out text, refinement, compensation, healing) to the stages that use them and
records `to_dict()` in the run file. Each setting has one default, in its part.

`EvalConfig` is `sleb eval`'s counterpart (run by `sleb.eval_table.run_eval`). This module sits
just below the jobs that run a config (pipeline, eval_table, the CLI): its checks ask the stages.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from . import data, distributed, loading
from .compensate import check_ridge
from .criteria import canonical_metric, check_unit_support, get_criterion
from .errors import BadInput, UsageError
from .gguf_io.reader import is_gguf_path
from .heal import heal_checkpoint_path
from .outputs import check_output_file
from .refine import check_seconds
from .units import unit_kind
# The parts are re-exported: `from sleb.config import Budget, PruneConfig` keeps working.
from .settings import (COMPENSATIONS, HEAL_PARAMETER_SETS, OUTPUT_FORMATS, REFINEMENTS, Budget, Calibration,
                       Compensation, Healing, HeldOut, Racing, Refinement, SearchOptions, _positive_int)

# The command-line spelling of each setting (dotted: a field of a part), for messages that name them.
FLAGS = {
    "model": "MODEL", "dtype": "--dtype", "trust_remote_code": "--trust-remote-code", "metric": "--metric",
    "budget.remove": "--remove", "budget.ratio": "--ratio", "budget.target_params": "--target-params",
    "budget.target_speedup": "--target-speedup", "budget.max_ppl_increase": "--max-ppl-increase",
    "search.batch_size": "--batch-size", "search.early_barrier": "--early-barrier",
    "search.latter_barrier": "--latter-barrier", "search.seed": "--seed", "search.angular_tokens": "--angular-tokens",
    "search.unit": "--unit", "search.unit_score": "--unit-score", "search.speed_at": "--speed-at",
    "racing": "--racing", "racing.confidence": "--confidence", "racing.tolerance": "--tolerance",
    "racing.min_windows": "--min-windows", "racing.guesses": "--racing-guesses",
    "calibration.spec": "--calib", "calibration.nsamples": "--nsamples", "calibration.seqlen": "--seqlen",
    "heldout.spec": "--eval", "heldout.windows": "--eval-windows",
    "refine.method": "--refine", "refine.beam": "--beam", "refine.seconds": "--refine-seconds",
    "compensation.method": "--compensate", "compensation.aware": "--compensate-aware",
    "compensation.top_k": "--compensate-top-k", "compensation.ridge": "--compensate-ridge",
    "heal.params": "--heal", "heal.minutes": "--heal-minutes", "heal.steps": "--heal-steps",
    "heal.windows": "--heal-windows", "heal.heldout_windows": "--heal-heldout-windows", "heal.seqlen": "--heal-seqlen",
    "heal.batch_size": "--heal-batch-size", "heal.lr": "--heal-lr", "heal.top_k": "--heal-top-k",
    "heal.lora_rank": "--heal-lora-rank", "heal.last_blocks": "--heal-last-blocks",
    "heal.eval_every": "--heal-eval-every", "heal.patience": "--heal-patience",
    "heal.checkpointing": "--heal-checkpointing",
    "from_report": "--from-report", "out_format": "--format", "gguf_type": "--gguf-type",
}


# Options that mean something only beside another: flag -> (what it needs, whether the config has it).
# `PruneConfig.validate` refuses one that is set (given on the command line, or not at its default)
# while what it needs is off: an option is honoured or refused, never accepted and ignored.
OPTION_PARENTS = {
    "--confidence": ("--racing", lambda c: c.racing is not None),
    "--tolerance": ("--racing", lambda c: c.racing is not None),
    "--racing-guesses": ("--racing", lambda c: c.racing is not None),
    "--min-windows": ("--racing", lambda c: c.racing is not None),
    "--refine-seconds": ("--refine swap, or --unit-score per-second with a size target other than --remove",
                         lambda c: c.refine.method is not None or (c.search.unit_score == "per-second"
                                                                   and c.budget.size_target() not in (None, "remove"))),
    "--eval-windows": ("--eval", lambda c: c.heldout.spec is not None),
    "--angular-tokens": ("--metric angular", lambda c: c.metric == "angular"),
    "--compensate-ridge": ("--compensate", lambda c: c.compensation.method is not None),
    "--compensate-aware": ("--compensate", lambda c: c.compensation.method is not None),
    "--compensate-top-k": ("--compensate-aware", lambda c: c.compensation.aware),
    # With --heal, --checkpoint also keeps the heal's state (PATH.heal), whatever the search.
    "--checkpoint": ("a step-wise search without --compensate-aware, or --heal",
                     lambda c: not c.compensation.aware or c.heal.wanted),
    "--speed-at": ("a search without --compensate-aware", lambda c: not c.compensation.aware),
    **{flag: ("--heal", lambda c: c.heal.wanted) for flag in (
        "--heal-minutes", "--heal-steps", "--heal-windows", "--heal-heldout-windows", "--heal-seqlen",
        "--heal-batch-size", "--heal-lr", "--heal-top-k", "--heal-lora-rank", "--heal-last-blocks",
        "--heal-eval-every", "--heal-patience", "--heal-checkpointing")},
}
# What a search decides: --from-report applies a recorded order instead, so these are refused with it.
SEARCH_ONLY = ("--metric", "--angular-tokens", "--early-barrier", "--latter-barrier", "--checkpoint", "--racing",
               "--confidence", "--tolerance", "--racing-guesses", "--min-windows", "--refine", "--refine-seconds",
               "--beam", "--unit-score", "--compensate-aware", "--compensate-top-k", "--target-params",
               "--target-speedup", "--max-ppl-increase", "--speed-at")


@dataclass(frozen=True)
class PruneConfig:
    """Everything `sleb prune` does, as one value (the CLI's flags, one field or part each).

    `model` is a hub id, a local folder, a .gguf file or an offline alias; `output` a folder (or
    a .gguf file). `from_report` applies an earlier run's order instead of searching.
    """

    model: str
    output: str
    budget: Budget
    metric: str = "sleb"
    search: SearchOptions = SearchOptions()
    racing: Racing | None = None
    calibration: Calibration = Calibration()
    heldout: HeldOut = HeldOut()
    refine: Refinement = Refinement()
    compensation: Compensation = Compensation()
    heal: Healing = Healing()
    from_report: str | None = None
    checkpoint: str | None = None
    offload_dir: str | None = None
    out_format: str = "auto"
    gguf_type: str | None = None
    overwrite: bool = False
    dtype: str = "auto"
    device: str | None = "auto"
    trust_remote_code: bool = False

    def given(self) -> set[str]:
        """The flags whose settings differ from their defaults (what a Python caller set)."""
        flags = set()
        for key, value in self.work().items():
            if key in FLAGS.values() and value != _DEFAULT_WORK.get(key, value):
                flags.add(key)
        if self.checkpoint is not None:
            flags.add("--checkpoint")
        return flags

    @property
    def search_checkpoint(self) -> str | None:
        """The --checkpoint file of the search: None when no step-wise search runs (with --from-report,
        --compensate-aware or a one-pass criterion --checkpoint keeps only the heal's state)."""
        if (self.checkpoint is None or self.from_report is not None or self.compensation.aware
                or not get_criterion(self.metric).stepwise):
            return None
        return self.checkpoint

    @property
    def heal_checkpoint(self) -> Path | None:
        """With --heal and --checkpoint PATH: PATH.heal, the heal's state (`sleb.heal.heal_checkpoint_path`)."""
        if self.checkpoint is None or not self.heal.wanted:
            return None
        return heal_checkpoint_path(self.checkpoint)

    def heal_identity(self) -> dict:
        """What a heal checkpoint records and a resumed heal must share, known before the model loads: every
        --heal setting but --heal-checkpointing (memory, not numbers, like the search's --batch-size), the seed
        and compensation (the pipeline adds the removed blocks; `sleb.heal.heal` the pruned model's fingerprint
        and the windows' tokens, which check the text whatever its path is spelled)."""
        work = self.work()
        keys = [k for k in work if k.startswith("--heal") and k != "--heal-checkpointing"]
        keys += ["--seed", "--compensate", "--compensate-ridge"]
        return {k: work[k] for k in keys}

    def validate(self, given=()) -> "PruneConfig":
        """Every check that needs no model and no download, in one place (BadInput, one line); returns
        the config with its metric spelled canonically.

        `given`: the flags the user gave (the CLI passes them), refused where they cannot apply even at
        their default values; settings that differ from their defaults count as given too.
        """
        config = replace(self, metric=canonical_metric(self.metric))
        config._check_parents(set(given) | config.given())
        config.budget.validate()
        criterion = get_criterion(config.metric)
        _positive_int(config.calibration.nsamples, "--nsamples")
        _positive_int(config.calibration.seqlen, "--seqlen")
        _positive_int(config.heldout.windows, "--eval-windows")
        loading.parse_dtype(config.dtype)
        loading.check_device(config.device)
        if config.out_format not in OUTPUT_FORMATS:
            raise BadInput(f"unknown output format {config.out_format!r}; choose {', '.join(OUTPUT_FORMATS)}")
        if config.racing is not None:
            config.racing.validate()
            if not criterion.stepwise:
                raise BadInput(f"--racing races SLEB's candidates step by step; it does not apply to --metric "
                               f"{config.metric}")
        refine, comp = config.refine, config.compensation
        if refine.method not in (None, *REFINEMENTS):
            raise BadInput(f"unknown refinement {refine.method!r}; available: {', '.join(REFINEMENTS)}")
        _positive_int(refine.beam, "--beam")
        if refine.beam is not None and config.metric != "sleb":
            raise BadInput(f"--beam searches SLEB's loss step by step; it does not apply to --metric {config.metric}")
        check_seconds(refine.seconds)
        if comp.method not in (None, *COMPENSATIONS):
            raise BadInput(f"unknown compensation {comp.method!r}; choose {', '.join(COMPENSATIONS)}")
        _positive_int(comp.top_k, "--compensate-top-k")
        check_ridge(comp.ridge)
        if comp.aware and (comp.method is None or config.from_report is not None
                           or config.budget.count(1) is None or config.budget.max_ppl_increase is not None
                           or refine.wanted or config.metric != "sleb"):
            raise BadInput("--compensate-aware needs --compensate, --metric sleb and exactly one of --remove or "
                           "--ratio (no other budget, --refine, --beam or --from-report)")
        heal = config.heal
        heal.validate()
        if heal.wanted:
            if config.offload_dir is not None:
                raise BadInput("--heal trains weights in memory; it does not work with --offload-dir")
            if heal.params == "maps" and comp.method is None:
                raise BadInput("--heal maps trains the maps --compensate folds; give --compensate too, or another "
                               f"parameter set ({', '.join(s for s in HEAL_PARAMETER_SETS if s != 'maps')})")
        if config.offload_dir is not None and comp.method is not None:
            raise BadInput("--compensate edits the weights in memory; it does not work with --offload-dir")
        if config.checkpoint is not None and not criterion.stepwise and not heal.wanted:
            raise BadInput(f"--checkpoint applies to step-wise criteria (sleb); {config.metric} ranks the blocks "
                           "in one pass")
        kind = unit_kind(config.search.unit)
        kind.refuse_unsupported({"--compensate-aware": comp.aware, "--heal": heal.wanted,
                                 "--offload-dir": config.offload_dir is not None, "--beam": refine.beam is not None})
        if config.search.unit_score != "loss" and config.racing is not None:
            raise BadInput(f"--racing races the calibration loss; --unit-score {config.search.unit_score} runs the "
                           "exact search")
        kind.check_barriers(config.search.early_barrier)
        check_unit_support(config.metric, kind.name, config.search.unit_score)
        if config.out_format == "gguf" or is_gguf_path(config.output):
            kind.check_gguf(from_gguf=None)  # (the source's kind is known once resolved: sleb.pipeline)
        if config.search.speed_at is not None and distributed.world_size() > 1:
            raise BadInput("--speed-at times the model in one process (each rank's timings would differ); run it "
                           "without torchrun")
        if config.from_report is not None and (config.budget.remove is None) == (config.budget.ratio is None):
            raise BadInput("--from-report applies a recorded order: give exactly one of --remove N or --ratio R")
        # With --from-report too: the calibration text measures what the applied order costs.
        data.check_spec(config.calibration.spec)
        if config.heldout.spec is not None:
            data.check_no_overlap(config.calibration.spec, [config.heldout.spec])
        return config

    def _check_parents(self, given: set[str]) -> None:
        if self.from_report is not None:
            search_only = [flag for flag in SEARCH_ONLY if flag in given
                           and not (flag == "--checkpoint" and self.heal.wanted)]
            if search_only:
                raise BadInput(f"--from-report applies a recorded order instead of searching; "
                               f"{', '.join(search_only)} belong{'s' if len(search_only) == 1 else ''} to a search")
        for flag in sorted(given):
            parent = OPTION_PARENTS.get(flag)
            if parent is not None and not parent[1](self):
                raise BadInput(f"{flag} applies only with {parent[0]}; give that too, or leave {flag} out")

    def work(self) -> dict:
        """The settings that decide the result (not where it goes, nor the device), flat and keyed by their
        command-line flags: torchrun ranks must agree on these (`sleb.distributed.agree`)."""
        flat = {}
        for f in fields(self):
            if f.name in ("output", "overwrite", "device", "checkpoint", "offload_dir"):
                continue
            value = getattr(self, f.name)
            if f.name == "racing":
                flat["racing"] = value is not None
                value = value or Racing(None, None, None)
            if is_dataclass(value):
                flat.update({f"{f.name}.{k}": v for k, v in asdict(value).items()
                             if f"{f.name}.{k}" not in ("budget.speedup_context",)})
            else:
                flat[f.name] = os.fspath(value) if isinstance(value, os.PathLike) else value
        return {FLAGS.get(key, key): value for key, value in flat.items()}

    def to_dict(self) -> dict:
        """Plain JSON-able data (nested parts as dicts; paths as strings)."""
        data = asdict(self)
        for name in ("model", "output", "from_report", "checkpoint", "offload_dir"):
            if data[name] is not None:
                data[name] = os.fspath(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        """The inverse of `to_dict` (unknown keys are refused; missing parts take their defaults)."""
        parts = {"budget": Budget, "search": SearchOptions, "racing": Racing, "calibration": Calibration,
                 "heldout": HeldOut, "refine": Refinement, "compensation": Compensation, "heal": Healing}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(f"unknown prune settings: {', '.join(unknown)}")
        values = dict(data)
        for name, part in parts.items():
            if isinstance(values.get(name), dict):
                values[name] = part(**values[name])
        return cls(**values)


# Every result-deciding setting at its default, flag -> value (what `PruneConfig.given` compares with).
_DEFAULT_WORK = PruneConfig("", "", Budget()).work()


def _names(value) -> list[str]:
    """A list of names (paths as strings) from a list, a tuple, one name or None."""
    values = [] if value is None else [value] if isinstance(value, (str, os.PathLike)) else value
    return [os.fspath(v) for v in values]


@dataclass(frozen=True)
class EvalConfig:
    """Everything `sleb eval` does, as one value (the CLI's flags, one field each).

    `models` are evaluated side by side, the first as the baseline of the table; each gets
    perplexity on every spec of `ppl_specs` (test parts, windows of `seqlen` tokens, at most
    `max_windows`) and lm-eval accuracy on every task of `tasks` (`limit` examples per task, a
    whole number or a fraction below 1). The table goes to `json_path` and/or `markdown_path`.
    """

    models: list[str]
    ppl_specs: list[str] = field(default_factory=list)
    seqlen: int = 2048
    batch_size: int = 1
    max_windows: int | None = None
    tasks: list[str] = field(default_factory=list)
    limit: float | None = None
    num_fewshot: int | None = None
    include_path: str | None = None
    json_path: str | None = None
    markdown_path: str | None = None
    overwrite: bool = False
    dtype: str = "auto"
    device: str | None = "auto"
    trust_remote_code: bool = False

    @property
    def task_limit(self) -> int | float | None:
        """`limit` as lm-eval takes it: an int for a number of examples, a float for a fraction."""
        return int(self.limit) if self.limit is not None and self.limit >= 1 else self.limit

    def inputs(self) -> list:
        """The local files the run reads (models, texts, task folder): outputs must stay clear of them."""
        paths = [p for name in self.models for p in loading.local_paths(name)] + data.local_paths(self.ppl_specs)
        return paths + ([self.include_path] if self.include_path else [])

    def validate(self) -> "EvalConfig":
        """Every check that needs no model (BadInput, one line; `UsageError` for settings that cannot go
        together); returns the config with its name lists as lists (a single name may be given as a string)."""
        config = replace(self, **{name: _names(getattr(self, name)) for name in ("models", "ppl_specs", "tasks")})
        if config.tasks and distributed.world_size() > 1:
            raise UsageError("--tasks (lm-eval) runs in one process; under torchrun give only --ppl")
        if not config.ppl_specs and not config.tasks:
            raise UsageError("give --ppl SPEC[,SPEC...] and/or --tasks TASK[,TASK...]")
        limit = config.limit
        if limit is not None and (limit <= 0 or (limit >= 1 and limit != int(limit))):
            raise UsageError(f"must be a whole number of examples or a fraction in (0, 1), got {limit}", "--limit")
        if not config.models:
            raise BadInput("give at least one model to evaluate")
        _positive_int(config.seqlen, "--seqlen")
        _positive_int(config.batch_size, "--batch-size")
        _positive_int(config.max_windows, "--max-windows")
        for spec in config.ppl_specs:
            data.check_spec(spec)
        loading.parse_dtype(config.dtype)
        loading.check_device(config.device)
        outputs = [(path, label) for path, label in ((config.json_path, "--json"), (config.markdown_path, "--markdown"))
                   if path]
        if len(outputs) == 2 and len({Path(path).expanduser().resolve() for path, _ in outputs}) == 1:
            raise UsageError("--json and --markdown name the same file")
        inputs = config.inputs()
        for path, label in outputs:
            check_output_file(path, inputs=inputs, overwrite=config.overwrite, label=label)
        return config

    def work(self) -> dict:
        """The settings that decide the numbers, keyed by their flags: torchrun ranks must agree on these."""
        return {"MODEL": list(self.models), "--ppl": list(self.ppl_specs), "--seqlen": self.seqlen,
                "--batch-size": self.batch_size, "--max-windows": self.max_windows, "--dtype": self.dtype,
                "--trust-remote-code": self.trust_remote_code}

    def settings(self) -> dict:
        """What the --json file records under "settings"."""
        include = self.include_path
        return {"seqlen": self.seqlen, "batch_size": self.batch_size, "max_windows": self.max_windows,
                "tasks": list(self.tasks), "limit": self.task_limit, "num_fewshot": self.num_fewshot,
                "include_path": os.fspath(include) if include is not None else None, "dtype": self.dtype}

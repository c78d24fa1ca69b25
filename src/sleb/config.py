"""The settings of a `sleb prune` (and `sleb eval`) run as one typed value, built once and passed down unchanged.

The CLI builds a `PruneConfig` from its flags; Python users build it themselves. `validate()`
checks everything that can be checked without a model, in one place, raising `BadInput`;
`pipeline.prune` then hands the parts to the stages that use them (budget -> `budgeted_search`,
`search` and `racing` -> the criterion, `refine` -> refinement, `compensation` -> the fit) and
records `to_dict()` in the run file. Each setting has one default, defined here.

The parts are small frozen dataclasses, so a stage receives exactly the settings it uses:

* `Budget`: how much to remove (one size target and/or a perplexity ceiling);
* `SearchOptions`: what every criterion shares (batch size, barriers, seed, angular tokens);
* `Racing`: the racing search's statistics (None: the exact search);
* `Calibration`, `HeldOut`: the texts, window counts and lengths;
* `Refinement`, `Compensation`, `Healing`: what happens after the search.

`EvalConfig` is `sleb eval`'s counterpart (run by `sleb.eval_table.run_eval`). This module imports
nothing heavy at its top, so a config can be built and checked without torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

from .errors import BadInput, UsageError

ANGULAR_TOKENS = ("last", "all")
SIZE_TARGETS = ("remove", "ratio", "target_params", "target_speedup")
REFINEMENTS = ("swap",)
COMPENSATIONS = ("linear", "linear-cosine")
OUTPUT_FORMATS = ("auto", "safetensors", "gguf")
HEAL_PARAMETER_SETS = ("neighbours", "lora", "tail", "maps")
HEAL_DEFAULT = "lora"  # the set `--heal` alone trains (docs/healing.md)


# The command-line spelling of each setting (dotted: a field of a part), for messages that name them.
FLAGS = {
    "model": "MODEL", "dtype": "--dtype", "trust_remote_code": "--trust-remote-code", "metric": "--metric",
    "budget.remove": "--remove", "budget.ratio": "--ratio", "budget.target_params": "--target-params",
    "budget.target_speedup": "--target-speedup", "budget.max_ppl_increase": "--max-ppl-increase",
    "search.batch_size": "--batch-size", "search.early_barrier": "--early-barrier",
    "search.latter_barrier": "--latter-barrier", "search.seed": "--seed", "search.angular_tokens": "--angular-tokens",
    "search.unit": "--unit", "search.unit_score": "--unit-score",
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
    "--refine-seconds": ("--refine swap", lambda c: c.refine.method is not None),
    "--eval-windows": ("--eval", lambda c: c.heldout.spec is not None),
    "--angular-tokens": ("--metric angular", lambda c: c.metric == "angular"),
    "--compensate-ridge": ("--compensate", lambda c: c.compensation.method is not None),
    "--compensate-aware": ("--compensate", lambda c: c.compensation.method is not None),
    "--compensate-top-k": ("--compensate-aware", lambda c: c.compensation.aware),
    "--checkpoint": ("a step-wise search without --compensate-aware", lambda c: not c.compensation.aware),
    **{flag: ("--heal", lambda c: c.heal.wanted) for flag in (
        "--heal-minutes", "--heal-steps", "--heal-windows", "--heal-heldout-windows", "--heal-seqlen",
        "--heal-batch-size", "--heal-lr", "--heal-top-k", "--heal-lora-rank", "--heal-last-blocks",
        "--heal-eval-every", "--heal-patience")},
}
# What a search decides: --from-report applies a recorded order instead, so these are refused with it.
SEARCH_ONLY = ("--metric", "--angular-tokens", "--early-barrier", "--latter-barrier", "--checkpoint", "--racing",
               "--confidence", "--tolerance", "--racing-guesses", "--min-windows", "--refine", "--refine-seconds",
               "--beam", "--unit-score", "--compensate-aware", "--compensate-top-k", "--target-params",
               "--target-speedup", "--max-ppl-increase")


UNITS = ("block", "sublayer", "attention")  # sleb.units
UNIT_SCORES = ("loss", "per-parameter")


@dataclass(frozen=True)
class SearchOptions:
    """Settings every criterion and refinement shares (see `sleb.search` for their meaning)."""

    batch_size: int = 1
    early_barrier: int = 1
    latter_barrier: int = 1
    seed: int = 0
    angular_tokens: str = "last"
    unit: str = "block"  # what is removed: see sleb.units (block, sublayer, attention)
    # How a branch search ranks candidates: `loss` (the calibration loss, as for blocks) or `per-parameter`
    # (the loss increase per parameter removed: units differ in size).
    unit_score: str = "loss"

    def __post_init__(self):
        if self.unit not in UNITS:
            raise BadInput(f"unknown unit {self.unit!r}; choose {', '.join(UNITS)}")
        if self.unit_score not in UNIT_SCORES:
            raise BadInput(f"unknown unit score {self.unit_score!r}; choose {', '.join(UNIT_SCORES)}")
        if self.unit_score != "loss" and self.unit == "block":
            raise BadInput("--unit-score per-parameter ranks units of different sizes; blocks are all alike (use --unit)")
        if self.batch_size < 1:
            raise BadInput(f"batch size must be at least 1, got {self.batch_size}")
        if self.early_barrier < 0 or self.latter_barrier < 0:
            raise BadInput(f"barriers must be 0 or more, got early {self.early_barrier}, latter {self.latter_barrier}")
        if self.angular_tokens not in ANGULAR_TOKENS:
            raise BadInput(f"angular_tokens must be one of {', '.join(ANGULAR_TOKENS)}, got {self.angular_tokens!r}")

    def candidates(self, alive) -> list[int]:
        """Alive blocks that may be removed: all but the first `early_barrier` and last `latter_barrier` alive ones."""
        alive = list(alive)
        return alive[self.early_barrier : len(alive) - self.latter_barrier]


@dataclass(frozen=True)
class Racing:
    """The racing search (`sleb.racing`): per-step `confidence` that the pick's calibration loss is within
    `tolerance` (a fraction) of the best candidate's; no candidate is dropped on fewer than `min_windows`.

    The defaults were measured on SmolLM2 (24 x 128 tokens, 4 removals, two window draws): 0.9 / 0.005
    ran 3.59x and 3.44x faster than the exact search, 0.95 / 0.001 2.40x and 2.20x, all with the exact
    search's blocks. A tolerance of 0.5% of the calibration loss is about what 24 windows resolve there
    (the standard error of the best block's paired difference with each of the next ten is 0.3-0.9% of
    the loss); in 160 replayed steps the pick was never more than 0.37% worse than the best
    (benchmarks/racing_replay.py).
    """

    confidence: float = 0.9
    tolerance: float = 0.005
    min_windows: int = 4
    # Likely leaders each step scores on every window first; the best is the reference the others race.
    # On SmolLM2 a second guess paid a little (the 4-step search at 24 windows, replayed: 3.05x -> 3.10x).
    guesses: int = 2

    def validate(self) -> None:
        if not (isinstance(self.confidence, (int, float)) and 0.0 < self.confidence <= 1.0):
            raise BadInput(f"--confidence must be in (0, 1], got {self.confidence}")
        if not (isinstance(self.tolerance, (int, float)) and 0.0 <= self.tolerance < 1.0):
            raise BadInput(f"--tolerance (racing) is a fraction of the calibration loss in [0, 1), got {self.tolerance}")
        if self.min_windows < 2:
            raise BadInput(f"racing needs at least 2 windows before dropping a candidate, got min_windows={self.min_windows}")
        _positive_int(self.guesses, "--racing-guesses")


@dataclass
class Budget:
    """How much to remove. Give one size target and/or `max_ppl_increase` (see `sleb.budgets`)."""

    remove: int | None = None
    ratio: float | None = None
    target_params: float | None = None  # fraction of the dense parameters (<= 1) or an absolute count
    target_speedup: float | None = None  # ideal (FLOP-model) speedup over the dense model
    max_ppl_increase: float | None = None  # ceiling on calibration ppl, as a multiple of the dense model's
    speedup_context: int = 2048  # context length at which the FLOP model counts attention

    def count(self, num_blocks: int) -> int | None:
        """Blocks removed for `remove` or `ratio` (a ratio rounds up, as in the paper: 20% of 32 blocks is 7);
        None for the other budgets, whose count depends on the search."""
        if self.remove is not None:
            return self.remove
        if self.ratio is not None:
            return math.ceil(self.ratio * num_blocks - 1e-9)
        return None

    def size_target(self) -> str | None:
        given = [name for name in SIZE_TARGETS if getattr(self, name) is not None]
        if len(given) > 1:
            raise BadInput(f"give at most one of --remove, --ratio, --target-params, --target-speedup (got {given})")
        return given[0] if given else None

    def validate(self) -> None:
        """Reject budgets no removal can meet (before any model work)."""
        target = self.size_target()
        for name in ("ratio", "target_params", "target_speedup", "max_ppl_increase"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise BadInput(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if target is None and self.max_ppl_increase is None:
            raise BadInput("give a budget: --remove, --ratio, --target-params, --target-speedup or --max-ppl-increase")
        if self.remove is not None and (isinstance(self.remove, bool) or self.remove < 1):
            raise BadInput(f"--remove must be at least 1, got {self.remove}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise BadInput(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.target_params is not None and self.target_params <= 0:
            raise BadInput(f"--target-params must be positive (a fraction or a parameter count), got {self.target_params}")
        if self.target_speedup is not None and self.target_speedup <= 1:
            raise BadInput(f"--target-speedup must be above 1 (removing blocks cannot slow the model), got {self.target_speedup}")
        if self.max_ppl_increase is not None and self.max_ppl_increase <= 1:
            raise BadInput(
                f"--max-ppl-increase must be above 1: removing a block cannot be relied on to keep calibration "
                f"perplexity at or below {self.max_ppl_increase} x the dense model's"
            )


@dataclass(frozen=True)
class Calibration:
    """The calibration text (a spec of `sleb.data`; its train part) and its windows."""

    spec: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048


@dataclass(frozen=True)
class HeldOut:
    """Held-out perplexity of the dense and pruned model on `spec`'s test part (None: none)."""

    spec: str | None = None
    windows: int | None = None


@dataclass(frozen=True)
class Refinement:
    """After a greedy search: `beam` width W (keep the W best sets per step) and/or `method` "swap"
    (exchange removed and kept blocks while that lowers the calibration loss, for up to `seconds`)."""

    method: str | None = None
    beam: int | None = None
    seconds: float | None = None

    @property
    def wanted(self) -> bool:
        return self.method is not None or self.beam is not None


@dataclass(frozen=True)
class Compensation:
    """Linear compensation of the removed runs (`sleb.compensate`): `method` linear or linear-cosine
    (None: none), `ridge` relative to trace(M^T M)/d or "auto" (cross-validated); `aware` picks each
    block by its compensated loss among the `top_k` best plain candidates."""

    method: str | None = None
    aware: bool = False
    top_k: int = 3
    ridge: float | str = "auto"


@dataclass(frozen=True)
class Healing:
    """How to heal (`params` None: no healing). `minutes` and/or `steps` bound the training (the
    teacher pass counts towards `minutes`); `windows` training windows and `heldout_windows` held-out
    windows of `seqlen` tokens (None: the calibration length) are cut, without overlap, from the
    calibration text's train part; `batch_size` windows per step; `lr` None takes the parameter
    set's default. The held-out perplexity is measured every `eval_every` steps; training stops after
    `patience` measurements without improvement."""

    params: str | None = None
    minutes: float | None = None
    steps: int | None = None
    windows: int = 256
    heldout_windows: int = 16
    seqlen: int | None = None
    batch_size: int = 4
    lr: float | None = None
    top_k: int = 64
    lora_rank: int = 16
    last_blocks: int = 2
    eval_every: int = 10
    patience: int = 4

    @property
    def wanted(self) -> bool:
        return self.params is not None

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else HEAL_DEFAULT_LR[self.params]

    def validate(self) -> None:
        """Refuse settings no heal can run with (BadInput, one line, before any model loads)."""
        if not self.wanted:
            return
        if self.params not in HEAL_PARAMETER_SETS:
            raise BadInput(f"unknown --heal parameter set {self.params!r}; choose {', '.join(HEAL_PARAMETER_SETS)}")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes)
                                             and self.minutes > 0):
            raise BadInput(f"--heal-minutes must be a positive number of minutes, got {self.minutes}")
        for name, flag in (("steps", "--heal-steps"), ("windows", "--heal-windows"),
                           ("heldout_windows", "--heal-heldout-windows"), ("seqlen", "--heal-seqlen"),
                           ("batch_size", "--heal-batch-size"), ("top_k", "--heal-top-k"),
                           ("lora_rank", "--heal-lora-rank"), ("last_blocks", "--heal-last-blocks"),
                           ("eval_every", "--heal-eval-every"), ("patience", "--heal-patience")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BadInput(f"{flag} must be a whole number of at least 1, got {value!r}")
        if self.seqlen is not None and self.seqlen < 2:
            raise BadInput(f"--heal-seqlen must be at least 2, got {self.seqlen}")
        if self.minutes is None and self.steps is None:
            raise BadInput("--heal needs a budget: --heal-minutes and/or --heal-steps")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise BadInput(f"--heal-lr must be a positive number, got {self.lr}")


# Learning rates measured on SmolLM2 (docs/healing.md): full weights take a small step, adapters a larger one.
HEAL_DEFAULT_LR = {"neighbours": 1e-4, "lora": 1e-3, "tail": 5e-5, "maps": 1e-4}


def _positive_int(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BadInput(f"{name} must be a whole number of at least 1, got {value!r}")


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

    def validate(self, given=()) -> "PruneConfig":
        """Every check that needs no model and no download, in one place (BadInput, one line); returns
        the config with its metric spelled canonically.

        `given`: the flags the user gave (the CLI passes them), refused where they cannot apply even at
        their default values; settings that differ from their defaults count as given too.
        """
        from . import data, loading
        from .compensate import check_ridge
        from .criteria import canonical_metric, check_unit_support, get_criterion
        from .refine import check_seconds

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
            from . import distributed

            if distributed.world_size() > 1:
                raise BadInput("--heal runs in one process; heal the saved model without torchrun")
        if config.offload_dir is not None and comp.method is not None:
            raise BadInput("--compensate edits the weights in memory; it does not work with --offload-dir")
        if config.checkpoint is not None and not criterion.stepwise:
            raise BadInput(f"--checkpoint applies to step-wise criteria (sleb); {config.metric} ranks the blocks "
                           "in one pass")
        unit = config.search.unit
        if unit != "block":
            given = [flag for flag, on in (("--compensate-aware", comp.aware), ("--heal", heal.wanted),
                                           ("--offload-dir", config.offload_dir is not None),
                                           ("--refine/--beam", refine.wanted)) if on]
            if given:
                raise BadInput(f"--unit {unit} does not work with {', '.join(given)} yet; use --unit block for those")
            if config.search.unit_score != "loss" and config.racing is not None:
                raise BadInput("--racing races the calibration loss; --unit-score per-parameter runs the exact search")
            if config.search.early_barrier < 1:
                raise BadInput(f"--unit {unit} needs --early-barrier 1 or more: the first layer of a DeciLM model keeps "
                               "its attention (vLLM and llama.cpp take the head size from it)")
            check_unit_support(config.metric, unit, config.search.unit_score)
            from .gguf_export import is_gguf_path

            if config.out_format == "gguf" or is_gguf_path(config.output):
                if unit != "attention":
                    raise BadInput("a GGUF output takes --unit attention only: llama.cpp's deci architecture skips a "
                                   "layer without MLP entirely, attention included; save --unit sublayer to a folder")
        if config.from_report is not None and (config.budget.remove is None) == (config.budget.ratio is None):
            raise BadInput("--from-report applies a recorded order: give exactly one of --remove N or --ratio R")
        # With --from-report too: the calibration text measures what the applied order costs.
        data.check_spec(config.calibration.spec)
        if config.heldout.spec is not None:
            data.check_no_overlap(config.calibration.spec, [config.heldout.spec])
        return config

    def _check_parents(self, given: set[str]) -> None:
        if self.from_report is not None:
            search_only = [flag for flag in SEARCH_ONLY if flag in given]
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
        from . import data, loading

        paths = [p for name in self.models for p in loading.local_paths(name)] + data.local_paths(self.ppl_specs)
        return paths + ([self.include_path] if self.include_path else [])

    def validate(self) -> "EvalConfig":
        """Every check that needs no model (BadInput, one line; `UsageError` for settings that cannot go
        together); returns the config with its name lists as lists (a single name may be given as a string)."""
        from pathlib import Path

        from . import data, distributed, loading
        from .outputs import check_output_file

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

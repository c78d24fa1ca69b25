"""The parts of a run's settings: small frozen dataclasses, each with its one default, and the checks
that need nothing but the values.

Each stage receives exactly the part it uses:

* `Budget`: how much to remove (one size target and/or a perplexity ceiling);
* `SearchOptions`: what every criterion shares (batch size, barriers, seed, angular tokens, unit);
* `Racing`: the racing search's statistics (None: the exact search);
* `Calibration`, `HeldOut`: the texts, window counts and lengths;
* `Refinement`, `Compensation`, `Healing`: what happens after the search.

This module sits at the bottom of the package (it imports only `sleb.errors`), so every stage can
take its part from here; `sleb.config` assembles them into a whole job (`PruneConfig`) and checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BadInput

ANGULAR_TOKENS = ("last", "all")
SIZE_TARGETS = ("remove", "ratio", "target_params", "target_speedup")
REFINEMENTS = ("swap",)
COMPENSATIONS = ("linear", "linear-cosine")
OUTPUT_FORMATS = ("auto", "safetensors", "gguf")
HEAL_PARAMETER_SETS = ("neighbours", "lora", "tail", "maps")
HEAL_DEFAULT = "lora"  # the set `--heal` alone trains (docs/healing.md)


UNITS = ("block", "sublayer", "attention")  # sleb.units
UNIT_SCORES = ("loss", "per-parameter", "per-second")
SPEED_MODES = ("prefill", "generation")  # the shapes `--speed-at` times (sleb.timing)


def parse_speed_at(spec: str) -> tuple[str, int]:
    """`prefill:N` (one forward pass over N tokens, batch 1) or `generation:N` (one new token at a context of N
    tokens, with the KV cache) as (mode, N); BadInput (one line) for anything else."""
    mode, _, tokens = str(spec).partition(":")
    if mode not in SPEED_MODES or not tokens.isdigit() or int(tokens) < 1:
        raise BadInput(f"--speed-at takes prefill:N or generation:N (N tokens, at least 1), got {spec!r}")
    return mode, int(tokens)


@dataclass(frozen=True)
class SearchOptions:
    """Settings every criterion and refinement shares (see `sleb.search` for their meaning)."""

    batch_size: int = 1
    early_barrier: int = 1
    latter_barrier: int = 1
    seed: int = 0
    angular_tokens: str = "last"
    unit: str = "block"  # what is removed: see sleb.units (block, sublayer, attention)
    # How a branch search ranks candidates: `loss` (the calibration loss, as for blocks), `per-parameter`
    # (the loss increase per parameter removed: units differ in size) or `per-second` (per unit of cost
    # saved in the cost model: measured seconds with `speed_at`, else FLOPs per token).
    unit_score: str = "loss"
    # The cost model (sleb.timing): None, the FLOP ideal; `prefill:N` or `generation:N`, each unit timed at
    # that shape before the search. It prices --unit-score per-second and --target-speedup.
    speed_at: str | None = None

    def __post_init__(self):
        if self.unit not in UNITS:
            raise BadInput(f"unknown unit {self.unit!r}; choose {', '.join(UNITS)}")
        if self.unit_score not in UNIT_SCORES:
            raise BadInput(f"unknown unit score {self.unit_score!r}; choose {', '.join(UNIT_SCORES)}")
        if self.unit_score != "loss" and self.unit == "block":
            raise BadInput(f"--unit-score {self.unit_score} ranks units of different sizes; blocks are all alike "
                           "(use --unit)")
        if self.speed_at is not None:
            parse_speed_at(self.speed_at)
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
    `patience` measurements without improvement. `checkpointing`: gradient checkpointing over the blocks
    the gradient passes through (recompute them in the backward pass instead of keeping their
    activations: the memory of one block's activations instead of all of them, for about one more
    forward pass per step; docs/healing.md gives the peak memory either way)."""

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
    checkpointing: bool = True

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
        if not isinstance(self.checkpointing, bool):
            raise BadInput(f"--heal-checkpointing is on or off (True or False), got {self.checkpointing!r}")


# Learning rates measured on SmolLM2 (docs/healing.md): full weights take a small step, adapters a larger one.
HEAL_DEFAULT_LR = {"neighbours": 1e-4, "lora": 1e-3, "tail": 5e-5, "maps": 1e-4}


def differing_settings(theirs: dict, ours: dict) -> str:
    """The entries of `ours` that `theirs` (a checkpoint's record) holds with another value, as `key X there vs
    Y now`, comma-separated; empty when none do (an entry `theirs` lacks is not compared)."""
    return ", ".join(f"{k} {theirs[k]!r} there vs {ours[k]!r} now" for k in sorted(ours)
                     if k in theirs and theirs[k] != ours[k])


def _positive_int(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BadInput(f"{name} must be a whole number of at least 1, got {value!r}")

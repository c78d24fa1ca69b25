"""What a search removes: whole blocks (SLEB's unit), or the attention and MLP branches of each block.

Every decoder block is two residual branches, `h = x + attn(norm(x))` and `h + mlp(norm(h))`, and
they are not equally redundant (BlockPruner, arXiv 2406.10594; FinerCut, 2405.18218). With
`unit="sublayer"` each branch is a candidate; with `unit="attention"` only the attention branches
are (fewer attention layers also shrink the KV cache). Skipping a branch makes it the identity
(`x + 0`); `sleb.arch.find_branches` finds the branches and proves that this is exact.

Units have integer ids so that the scoring machinery (prefix tree, state cache, racing) runs on them
unchanged: with blocks, the id is the block index; with branches, block i's attention is 2i and its
MLP 2i + 1, and a variant is the ordered list of the ids it runs. The barriers protect whole blocks:
the first `early_barrier` and last `latter_barrier` blocks keep both branches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from torch import nn

from .arch import (BRANCH_KINDS, LAYER_INDEX_ATTRIBUTES, BlockRunner, Branches, find_blocks, find_branches,
                   per_layer_config_fields, renumber_layer_indices, skipped, text_config)
from .settings import UNITS, SearchOptions
from .errors import BadInput, SlebError


def check_unit(unit: str) -> str:
    if unit not in UNIT_KINDS:
        raise BadInput(f"unknown unit {unit!r}; choose {', '.join(UNIT_KINDS)}")
    return unit


def _no_op(entry, branch: str) -> bool:
    part = entry.get(branch) if isinstance(entry, dict) else getattr(entry, branch, None)
    return bool(part.get("no_op") if isinstance(part, dict) else getattr(part, "no_op", False))


def check_whole_layers(name: str, config) -> None:
    """Before a branch search loads `name`: refuse (one line) a model whose `config` says some layers lack their
    attention or MLP already (`block_configs[i]` with `no_op`, the DeciLM / Nemotron-NAS layout of a
    `--unit sublayer` output). `find_branches` refuses such blocks too, once loaded."""
    for index, entry in enumerate(getattr(text_config(config), "block_configs", None) or []):
        lost = [branch for branch in ("attention", "ffn") if _no_op(entry, branch)]
        if lost:
            raise BadInput(f"{name} is a DeciLM model whose layer {index} has no {' or '.join(lost)} already; a branch "
                           "search needs whole layers: use --unit block, or search the model it was cut from")


@dataclass(frozen=True)
class UnitKind:
    """One kind of removable unit, and everything the rest of sleb asks about it: its ids and labels,
    which units are candidates, how a model runs, views and loses them, what `--ratio` counts, which
    features and outputs can hold it. Code outside this module asks the kind (`unit_kind(name)`); it
    does not compare unit names. A new kind is one `UnitKind` in `UNIT_KINDS` (and its name in
    `sleb.settings.UNITS`) plus its tests.
    """

    name: str
    # The branches that are candidates (`sleb.arch.BRANCH_KINDS`); empty: whole blocks, one unit each.
    candidate_branches: tuple[str, ...] = ()
    # What `--ratio` counts: the blocks (SLEB's budget, rounded up) or a fraction of the blocks' parameters.
    ratio_of_parameters: bool = False
    # Flags of features that do not handle this kind yet (refused before any model loads).
    unsupported: tuple[str, ...] = ()
    # Where the result can be saved: "vanilla" (a plain checkpoint) or "decilm" (the DeciLM folder);
    # as GGUF: "any" (from any source), "deci" (llama.cpp's deci, from a GGUF source only) or None.
    folder_layout: str = "vanilla"
    gguf_layout: str | None = "any"
    # Why a GGUF cannot hold this kind (gguf_layout None), for the refusal.
    gguf_refusal: str = ""

    @property
    def whole_blocks(self) -> bool:
        return not self.candidate_branches

    @property
    def noun(self) -> str:
        """`block`, or `sublayer unit` / `attention unit`."""
        return "block" if self.whole_blocks else f"{self.name} unit"

    @property
    def short_noun(self) -> str:
        """`block`, or `unit` (a branch's label says which)."""
        return "block" if self.whole_blocks else "unit"

    def space(self, num_blocks: int) -> "UnitSpace":
        return UnitSpace(self.name, num_blocks)

    def runner(self, model) -> BlockRunner:
        """The runner whose units a search over this kind scores."""
        return BlockRunner(model) if self.whole_blocks else BranchRunner(model)

    def branches(self, model, input_ids: torch.Tensor | None = None) -> Branches | None:
        """The branches, proven skippable on `input_ids` (a short probe by default); None for whole blocks."""
        if input_ids is None:
            input_ids = (torch.arange(8) * 7919 % model.get_input_embeddings().num_embeddings)[None]
        return self.runner(model).prepare(input_ids)

    def view(self, model, removed):
        """A context in which `model` runs without `removed` (restored after)."""
        return pruned_view(model, list(removed)) if self.whole_blocks else units_view(model, list(removed))

    def remove(self, model, removed: list[int]):
        """Apply the removals in place (see `remove_units`)."""
        return remove_blocks(model, list(removed)) if self.whole_blocks else _remove_branches(model, removed, self)

    def refuse_unsupported(self, given: dict[str, bool]) -> None:
        """Refuse, in one line, the features given (flag -> on) that do not handle this kind yet."""
        on = [flag for flag, wanted in given.items() if wanted and flag in self.unsupported]
        if on:
            raise BadInput(f"--unit {self.name} does not work with {', '.join(on)} yet; use --unit block for those")

    def check_source(self, name: str, config) -> None:
        """Before loading: whether the model `name` (its `config`) has the units this kind removes."""
        if not self.whole_blocks:
            check_whole_layers(name, config)

    def check_criterion(self, metric: str, ranks_branches: bool, flag: str = "--metric") -> None:
        """Refuse a criterion that cannot rank this kind's units (`ranks_branches`: whether it ranks single
        units rather than contiguous windows of whole blocks)."""
        if not self.whole_blocks and not ranks_branches:
            raise BadInput(f"{flag} {metric} ranks contiguous windows of whole blocks; not with --unit {self.name}")

    def recorded_count(self, budget, num_blocks: int, source: str) -> int:
        """How many removals of a recorded order `--remove` / `--ratio` ask for (a ratio of branch units would
        be a share of parameters, which a recorded order does not state: refused)."""
        if self.ratio_of_parameters and budget.remove is None:
            raise BadInput(f"{source} records a --unit {self.name} search: give --remove N (units) to apply its first "
                           "N removals")
        return budget.count(num_blocks)

    def record_entries(self, result) -> dict:
        """What a run file says of the units beyond the removal order (a block run file keeps the shape it
        always had; a branch run names its unit and labels its removals)."""
        if self.whole_blocks:
            return {}
        return {"unit": self.name, "removed_units": [result.label(u) for u in result.removed]}

    def check_barriers(self, early_barrier: int) -> None:
        if self.folder_layout == "decilm" and early_barrier < 1:
            raise BadInput(f"--unit {self.name} needs --early-barrier 1 or more: the first layer of a DeciLM model "
                           "keeps its attention (vLLM and llama.cpp take the head size from it)")

    def check_gguf(self, from_gguf: bool | None) -> None:
        """Whether a .gguf output can hold this kind's result, from a GGUF source or a Hugging Face model
        (None: the source is not known yet)."""
        if self.gguf_layout is None:
            raise BadInput(self.gguf_refusal)
        if self.gguf_layout == "deci" and from_gguf is False:
            raise BadInput(f"--unit {self.name} writes GGUF from a GGUF source (its tensors copied); from a "
                           "Hugging Face model, save the DeciLM folder (-o DIR)")


_BRANCH_FEATURES = ("--compensate-aware", "--offload-dir", "--beam")
UNIT_KINDS = {kind.name: kind for kind in (
    UnitKind("block"),
    UnitKind("sublayer", candidate_branches=BRANCH_KINDS, ratio_of_parameters=True, unsupported=_BRANCH_FEATURES,
             folder_layout="decilm", gguf_layout="deci"),
    UnitKind("attention", candidate_branches=("attn",), ratio_of_parameters=True, unsupported=_BRANCH_FEATURES,
             folder_layout="decilm", gguf_layout="deci"),
)}
assert tuple(UNIT_KINDS) == UNITS, "sleb.settings.UNITS names the registered unit kinds"


def unit_kind(name: str) -> UnitKind:
    return UNIT_KINDS[check_unit(name)]


@dataclass(frozen=True)
class UnitSpace:
    """The units of a model with `num_blocks` blocks, and which of them a search may remove."""

    kind: str
    num_blocks: int

    @property
    def strategy(self) -> UnitKind:
        return unit_kind(self.kind)

    @property
    def per_block(self) -> int:
        return 1 if self.strategy.whole_blocks else len(BRANCH_KINDS)

    @property
    def count(self) -> int:
        return self.num_blocks * self.per_block

    def block_of(self, unit: int) -> int:
        return unit // self.per_block

    def branch_of(self, unit: int) -> str | None:
        """`attn` or `mlp` for a branch unit, None for a block."""
        return None if self.strategy.whole_blocks else BRANCH_KINDS[unit % self.per_block]

    def unit_id(self, block: int, branch: str | None = None) -> int:
        return block if self.strategy.whole_blocks else block * self.per_block + BRANCH_KINDS.index(branch)

    def label(self, unit: int) -> str:
        """`12` for a block, `12.attn` / `12.mlp` for a branch."""
        branch = self.branch_of(unit)
        return str(unit) if branch is None else f"{self.block_of(unit)}.{branch}"

    def labels(self, units) -> str:
        """The units as people read them: `[3, 5]` for blocks, `3.attn, 5.mlp` for branches."""
        return str(list(units)) if self.strategy.whole_blocks else ", ".join(self.label(u) for u in units)

    def describe_removed(self, removed) -> list[str]:
        """The summary's first lines: what went, in removal order (and for blocks, what stayed)."""
        if not self.strategy.whole_blocks:
            return [f"removed {len(removed)} {self.kind} units of {self.num_blocks} blocks (in removal order): "
                    f"{self.labels(removed)}"]
        return [f"removed {len(removed)} of {self.num_blocks} blocks (in removal order): {list(removed)}",
                f"kept blocks: {self.kept(removed)}"]

    def size_phrase(self) -> str:
        """`5 blocks`, or `5 blocks (10 sublayer units)`."""
        whole = f"{self.num_blocks} blocks"
        return whole if self.strategy.whole_blocks else f"{whole} ({self.count} {self.strategy.noun}s)"

    def report_lines(self, removed, kept) -> list[str]:
        """`sleb report`'s first lines: what went and what stayed, in the original numbering."""
        whole = self.strategy.whole_blocks
        what = "of" if whole else f"{self.kind} units (attention and MLP branches) of the"
        return [f"- **Removed {len(removed)} {what} {self.num_blocks} blocks** (in removal order, original "
                f"numbering): {self.labels(removed)}",
                f"- Kept {'blocks' if whole else 'units'}: {self.labels(kept)}"]

    def kept(self, removed) -> list[int]:
        gone = set(removed)
        return [u for u in range(self.count) if u not in gone]

    def lost_branches(self, removed) -> dict[int, set]:
        """Block -> what `removed` takes from it: its branches (`attn`, `mlp`), or {None} for a whole block."""
        lost: dict[int, set] = {}
        for u in removed:
            lost.setdefault(self.block_of(u), set()).add(self.branch_of(u))
        return lost

    def gone_blocks(self, removed) -> list[int]:
        """The blocks `removed` deletes whole (every unit of theirs; `remove_units` deletes such a block)."""
        return sorted(b for b, lost in self.lost_branches(removed).items() if len(lost) == self.per_block)

    def surviving_blocks(self, removed) -> list[int]:
        """The original index of each block of the pruned model, in order."""
        gone = set(self.gone_blocks(removed))
        return [b for b in range(self.num_blocks) if b not in gone]

    def candidates(self, alive, options: SearchOptions) -> list[int]:
        """Alive units the search may remove next (see the module docstring for the barriers)."""
        alive = list(alive)
        if self.strategy.whole_blocks:
            return options.candidates(alive)
        allowed = set(options.candidates(range(self.num_blocks)))
        return [u for u in alive if self.block_of(u) in allowed and self.branch_of(u) in self.strategy.candidate_branches]

    def max_remove(self, options: SearchOptions) -> int:
        return len(self.candidates(range(self.count), options))


class BranchRunner(BlockRunner):
    """A `BlockRunner` whose units are branches: unit 2i runs block i with its MLP skipped (the attention
    branch alone), unit 2i + 1 runs it with its attention skipped. Running 2i then 2i + 1 is block i
    (`find_branches` checks that on the first windows it sees)."""

    def __post_init__(self):
        super().__post_init__()
        self.branches: Branches | None = None

    @property
    def num_units(self) -> int:
        return len(BRANCH_KINDS) * len(self.blocks.modules)

    def unit_module(self, index: int) -> torch.nn.Module:
        return self.blocks.modules[index // len(BRANCH_KINDS)]

    def prepare(self, input_ids: torch.Tensor) -> Branches:
        """Find the branches (and refuse a family whose branches cannot be skipped exactly)."""
        if self.branches is None:
            self.branches = find_branches(self, input_ids)
        return self.branches

    @torch.no_grad()
    def block(self, index: int, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        branches = self.prepare(input_ids)
        block, kind = divmod(index, len(BRANCH_KINDS))
        other = BRANCH_KINDS[1 - kind]
        with skipped(self.blocks.modules[block], branches, (other,)):
            return super().block(block, hidden, input_ids)


def unit_runner(model, unit: str) -> BlockRunner:
    """The runner whose units a search over `unit` scores."""
    return unit_kind(unit).runner(model)


def model_branches(model) -> Branches:
    """`find_branches` on a short probe of token ids (no text needed): the branches, proven skippable."""
    return UNIT_KINDS["sublayer"].branches(model)


@contextlib.contextmanager
def units_view(model, removed: list[int]) -> Iterator[None]:
    """Temporarily skip branch units (ids as in `UnitSpace("sublayer", ...)`) in place, restored after.

    With nothing to skip the model runs as it is, without looking for its branches: a pruned model (one
    that lost branches, scored after a heal) has none left to find."""
    if not removed:
        yield
        return
    branches = model_branches(model)
    blocks = BranchRunner(model).blocks.modules
    with contextlib.ExitStack() as stack:
        for u in removed:
            block, kind = divmod(u, len(BRANCH_KINDS))
            stack.enter_context(skipped(blocks[block], branches, (BRANCH_KINDS[kind],)))
        yield


def lost_parts(model, removed: list[int], unit: str) -> dict[int, tuple[str, ...]]:
    """Before `remove_units`: for each block of the pruned model that keeps one branch, the children its
    removed branch leaves behind (the zero stand-in's attribute and the norms serving only that branch, which
    the saved model drops): nothing there runs, so nothing there is trained. Empty for whole blocks."""
    kind = unit_kind(unit)
    if kind.whole_blocks or not removed:
        return {}
    branches = kind.branches(model)
    space = kind.space(len(find_blocks(model).modules))
    survivors = space.surviving_blocks(removed)
    return {survivors.index(b): tuple(part for kind_ in sorted(kinds) for part in (branches.name(kind_),
                                                                                     *branches.norms.get(kind_, ())))
            for b, kinds in space.lost_branches(removed).items() if len(kinds) < space.per_block}


def remove_units(model, removed: list[int], unit: str):
    """Apply a search's removals in place: blocks are deleted (`remove_blocks`); a removed branch is
    replaced by a weightless zero stand-in, and a block that loses both branches is deleted (exactly the
    same function, since `find_branches` proved it the identity). Returns the model."""
    return unit_kind(unit).remove(model, removed)


@torch.no_grad()
def _remove_branches(model, removed: list[int], kind: UnitKind):
    runner = BranchRunner(model)
    space = kind.space(len(runner.blocks.modules))
    if len(set(removed)) != len(removed) or not all(isinstance(u, int) and 0 <= u < space.count for u in removed):
        raise BadInput(f"units to remove must be distinct ids in [0, {space.count}), got {list(removed)}")
    branches = kind.branches(model)
    gone = {}
    for u in removed:
        gone.setdefault(space.block_of(u), set()).add(space.branch_of(u))
    whole = sorted(b for b, kinds in gone.items() if kinds == set(BRANCH_KINDS))
    for b, kinds in gone.items():
        if b not in whole:
            for branch in kinds:
                setattr(runner.blocks.modules[b], branches.name(branch), branches.standins[branch])
    if whole:
        remove_blocks(model, whole)
    return model


def remove_blocks(model: nn.Module, removed: list[int]) -> nn.Module:
    """Delete blocks in place (indices into the current block list) and keep the config in step.

    The layer count in the config drops, every config field with one entry per layer is sliced to
    the kept blocks, and every block's layer index is renumbered so the KV cache lines up.
    """
    blocks = find_blocks(model)
    n = len(blocks.modules)
    removed_set = set(removed)
    if len(removed_set) != len(removed) or not all(isinstance(i, int) and 0 <= i < n for i in removed):
        raise SlebError(f"blocks to remove must be distinct indices in [0, {n}), got {list(removed)}")
    if len(removed_set) >= n:
        raise SlebError(f"cannot remove all {n} blocks")
    kept = [i for i in range(n) if i not in removed_set]
    cfg = text_config(model)
    for name in per_layer_config_fields(cfg, n):
        value = getattr(cfg, name)
        setattr(cfg, name, type(value)(value[i] for i in kept))
    blocks.replace(nn.ModuleList([blocks.modules[i] for i in kept]))
    cfg.num_hidden_layers = len(kept)
    renumber_layer_indices(blocks.modules)
    return model


@contextlib.contextmanager
def pruned_view(model, removed: list[int]) -> Iterator:
    """Temporarily remove blocks in place (as `sleb.remove_blocks` does) and restore them after.

    Lets a pruned variant be evaluated or measured without copying the model.
    """
    blocks = find_blocks(model)
    original = blocks.modules
    cfg = text_config(model)
    saved_fields = {name: getattr(cfg, name) for name in per_layer_config_fields(cfg, len(original))}
    saved_layers = cfg.num_hidden_layers
    saved_indices = [
        (module, attr, getattr(module, attr))
        for block in original
        for module in block.modules()
        for attr in LAYER_INDEX_ATTRIBUTES
        if isinstance(getattr(module, attr, None), int)
    ]
    try:
        if removed:
            remove_blocks(model, list(removed))
        yield model
    finally:
        blocks.replace(original)
        cfg.num_hidden_layers = saved_layers
        for name, value in saved_fields.items():
            setattr(cfg, name, value)
        for module, attr, value in saved_indices:
            setattr(module, attr, value)

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
    if unit not in UNITS:
        raise BadInput(f"unknown unit {unit!r}; choose {', '.join(UNITS)}")
    return unit


@dataclass(frozen=True)
class UnitSpace:
    """The units of a model with `num_blocks` blocks, and which of them a search may remove."""

    kind: str
    num_blocks: int

    @property
    def per_block(self) -> int:
        return 1 if self.kind == "block" else len(BRANCH_KINDS)

    @property
    def count(self) -> int:
        return self.num_blocks * self.per_block

    def block_of(self, unit: int) -> int:
        return unit // self.per_block

    def branch_of(self, unit: int) -> str | None:
        """`attn` or `mlp` for a branch unit, None for a block."""
        return None if self.kind == "block" else BRANCH_KINDS[unit % self.per_block]

    def unit_id(self, block: int, branch: str | None = None) -> int:
        return block if self.kind == "block" else block * self.per_block + BRANCH_KINDS.index(branch)

    def label(self, unit: int) -> str:
        """`12` for a block, `12.attn` / `12.mlp` for a branch."""
        branch = self.branch_of(unit)
        return str(unit) if branch is None else f"{self.block_of(unit)}.{branch}"

    def candidates(self, alive, options: SearchOptions) -> list[int]:
        """Alive units the search may remove next (see the module docstring for the barriers)."""
        alive = list(alive)
        if self.kind == "block":
            return options.candidates(alive)
        allowed = set(options.candidates(range(self.num_blocks)))
        return [u for u in alive if self.block_of(u) in allowed
                and (self.kind == "sublayer" or self.branch_of(u) == "attn")]

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
    return BlockRunner(model) if check_unit(unit) == "block" else BranchRunner(model)


def model_branches(model) -> Branches:
    """`find_branches` on a short probe of token ids (no text needed): the branches, proven skippable."""
    vocab = model.get_input_embeddings().num_embeddings
    return BranchRunner(model).prepare((torch.arange(8) * 7919 % vocab)[None])


@contextlib.contextmanager
def units_view(model, removed: list[int]) -> Iterator[None]:
    """Temporarily skip branch units (ids as in `UnitSpace("sublayer", ...)`) in place, restored after."""
    branches = model_branches(model)
    blocks = BranchRunner(model).blocks.modules
    with contextlib.ExitStack() as stack:
        for u in removed:
            block, kind = divmod(u, len(BRANCH_KINDS))
            stack.enter_context(skipped(blocks[block], branches, (BRANCH_KINDS[kind],)))
        yield


@torch.no_grad()
def remove_units(model, removed: list[int], unit: str):
    """Apply a unit search's removals in place: blocks are deleted (`sleb.remove_blocks`); a removed
    branch is replaced by a weightless zero stand-in, and a block that loses both branches is deleted
    (exactly the same function, since `find_branches` proved it the identity). Returns the model."""
    if check_unit(unit) == "block":
        return remove_blocks(model, list(removed))
    runner = BranchRunner(model)
    space = UnitSpace(unit, len(runner.blocks.modules))
    if len(set(removed)) != len(removed) or not all(isinstance(u, int) and 0 <= u < space.count for u in removed):
        raise BadInput(f"units to remove must be distinct ids in [0, {space.count}), got {list(removed)}")
    branches = runner.prepare((torch.arange(8) * 7919 % model.get_input_embeddings().num_embeddings)[None])
    gone = {}
    for u in removed:
        gone.setdefault(space.block_of(u), set()).add(space.branch_of(u))
    whole = sorted(b for b, kinds in gone.items() if kinds == set(BRANCH_KINDS))
    for b, kinds in gone.items():
        if b not in whole:
            for kind in kinds:
                setattr(runner.blocks.modules[b], branches.name(kind), branches.standins[kind])
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

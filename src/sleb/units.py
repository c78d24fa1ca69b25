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

from . import loading
from .arch import BRANCH_KINDS, BlockRunner, Branches, find_branches, skipped, text_config
from .config import UNITS, SearchOptions
from .errors import BadInput


def check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise BadInput(f"unknown unit {unit!r}; choose {', '.join(UNITS)}")
    return unit


def _no_op(entry, branch: str) -> bool:
    part = entry.get(branch) if isinstance(entry, dict) else getattr(entry, branch, None)
    return bool(part.get("no_op") if isinstance(part, dict) else getattr(part, "no_op", False))


def check_whole_layers(name: str, trust_remote_code: bool = False) -> None:
    """Before a branch search loads `name`: refuse (one line) a model whose config says some layers lack their
    attention or MLP already (`block_configs[i]` with `no_op`, the DeciLM / Nemotron-NAS layout of a
    `--unit sublayer` output). `find_branches` refuses such blocks too, once loaded."""
    config, _ = loading.peek(name, trust_remote_code)
    for index, entry in enumerate(getattr(text_config(config), "block_configs", None) or []):
        lost = [branch for branch in ("attention", "ffn") if _no_op(entry, branch)]
        if lost:
            raise BadInput(f"{name} is a DeciLM model whose layer {index} has no {' or '.join(lost)} already; a branch "
                           "search needs whole layers: use --unit block, or search the model it was cut from")


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
    from .export import remove_blocks

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

"""Scoring block sequences on calibration windows, sharing every computation that can be shared.

A *variant* of the model is the ordered tuple of block positions it runs. Its score is the sum
over calibration windows of the mean next-token cross-entropy. Variants that start with the same
blocks share those blocks' hidden states: the variants are put in a prefix tree and walked depth
first, each tree node's hidden states computed once per window batch and dropped as soon as its
last child has started. For one SLEB step (the current model with each candidate skipped) this
runs the blocks before a candidate once for all candidates, and only the blocks after it for the
candidate itself.

The loop is over window batches, so windows can be batched for speed, sharded across processes
(`torch.distributed`: each rank takes every world_size-th batch and the scores are summed), and
any search built on it can checkpoint between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .arch import BlockRunner


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    ends: list[int] = field(default_factory=list)  # indices of variants that end at this node
    size: int = 0  # number of blocks under this node (tree edges), for ordering children


def _prefix_tree(variants: Sequence[Sequence[int]]) -> _Node:
    root = _Node()
    for index, variant in enumerate(variants):
        node = root
        for block in variant:
            node = node.children.setdefault(block, _Node())
        node.ends.append(index)

    def measure(node: _Node) -> int:
        node.size = sum(1 + measure(child) for child in node.children.values())
        return node.size

    measure(root)
    return root


def tree_cost(variants: Sequence[Sequence[int]]) -> int:
    """Block forwards per window batch that `variant_losses` needs (the edges of the prefix tree)."""
    return _prefix_tree(variants).size


def distributed_shard() -> tuple[int, int]:
    """(rank, world_size) when torch.distributed is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def window_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """This process's share of the window batches (all of them unless running distributed)."""
    rank, world = distributed_shard()
    batches = list(torch.split(windows, max(1, batch_size)))
    return batches[rank::world]


@torch.no_grad()
def variant_losses(
    runner: BlockRunner,
    windows: torch.Tensor,
    variants: Sequence[Sequence[int]],
    batch_size: int = 1,
    on_variant=None,
) -> torch.Tensor:
    """Score each variant: sum over windows of the mean next-token cross-entropy (float64).

    Args:
        runner: the model, run block by block.
        windows: LongTensor [n, seqlen] of calibration token ids.
        variants: block sequences (positions in the runner's block list), in the order they run.
        batch_size: windows per forward pass; scores do not depend on it beyond float rounding.
        on_variant: called with a variant's index each time one window batch of it is scored
            (progress reporting).
    """
    tree = _prefix_tree(variants)
    totals = torch.zeros(len(variants), dtype=torch.float64)

    def walk(node: _Node, holder: list[torch.Tensor], batch: torch.Tensor) -> None:
        # The hidden states arrive in a one-item list that is emptied here, so this frame holds
        # the only reference and can drop it early.
        hidden = holder.pop()
        if node.ends:
            losses = runner.window_losses(hidden, batch).sum()
            for index in node.ends:
                totals[index] += losses
                if on_variant is not None:
                    on_variant(index)
        # Children with fewer blocks below go first, so the largest subtree runs last, after this
        # node's hidden states are released: memory stays at a few states for SLEB-shaped trees.
        children = sorted(node.children.items(), key=lambda item: item[1].size)
        for i, (block, child) in enumerate(children):
            out = [runner.block(block, hidden, batch)]
            if i == len(children) - 1:
                hidden = None
            walk(child, out, batch)

    for batch in window_batches(windows, batch_size):
        walk(tree, [runner.embed(batch)], batch)

    if distributed_shard()[1] > 1:
        reduced = totals.to(runner.model.get_input_embeddings().weight.device)
        torch.distributed.all_reduce(reduced)
        totals = reduced.cpu()
    return totals

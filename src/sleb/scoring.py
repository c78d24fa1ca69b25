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

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from . import distributed
from .arch import BlockRunner
from .errors import CheckFailed


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


def window_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """This process's share of the window batches (all of them unless running distributed)."""
    rank, world = distributed.rank(), distributed.world_size()
    batches = list(torch.split(windows, max(1, batch_size)))
    return batches[rank::world]


class StateCache:
    """Hidden states of prefix-tree nodes kept between scoring calls, within a byte budget.

    A greedy search scores nearly the same tree at every step: after block r goes, the variant
    that skips candidate c < r shares its first blocks with the previous step's variant that
    skipped c, up to r. Keeping node states across calls lets the walk resume from the deepest
    stored prefix instead of the embeddings. Keys are (window batch, block prefix), valid only for
    one model and one set of windows and batch size: make a new cache for each search. Least
    recently used states are evicted first.
    """

    def __init__(self, budget_bytes: int):
        self.budget = max(0, int(budget_bytes))
        self.used = 0
        self._states: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
        return state

    def put(self, key: tuple, state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if size > self.budget or key in self._states:
            return
        while self.used + size > self.budget:
            _, old = self._states.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        self._states[key] = state
        self.used += size


def default_cache_budget(device: torch.device) -> int:
    """An eighth of the memory free where the hidden states live (system RAM for the CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 8
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
    return available // 8


def _chain(node: _Node, block: int) -> list[tuple[int, _Node]]:
    """The edges from `node` through `block` down a run of single-child nodes that end no variant."""
    path = [(block, node.children[block])]
    while len(path[-1][1].children) == 1 and not path[-1][1].ends:
        (next_block, next_node), = path[-1][1].children.items()
        path.append((next_block, next_node))
    return path


@torch.no_grad()
def variant_losses(
    runner: BlockRunner,
    windows: torch.Tensor,
    variants: Sequence[Sequence[int]],
    batch_size: int = 1,
    on_variant=None,
    cache: StateCache | None = None,
) -> torch.Tensor:
    """Score each variant: sum over windows of the mean next-token cross-entropy (float64).

    Args:
        runner: the model, run block by block.
        windows: LongTensor [n, seqlen] of calibration token ids.
        variants: block sequences (positions in the runner's block list), in the order they run.
        batch_size: windows per forward pass; scores do not depend on it beyond float rounding.
        on_variant: called with a variant's index each time one window batch of it is scored
            (progress reporting).
        cache: hidden states kept across calls (see StateCache); None computes everything.
    """
    totals = torch.zeros(len(variants), dtype=torch.float64)
    for b, batch in enumerate(window_batches(windows, batch_size)):
        totals += batch_losses(runner, batch, b, variants, on_variant=on_variant, cache=cache).sum(dim=1)

    return distributed.all_reduce_sum(totals, runner.model.get_input_embeddings().weight.device)


@torch.no_grad()
def batch_losses(
    runner: BlockRunner,
    batch: torch.Tensor,
    b: int,
    variants: Sequence[Sequence[int]],
    on_variant=None,
    cache: StateCache | None = None,
) -> torch.Tensor:
    """Per-window losses [len(variants), len(batch)] (float64) of one window batch, by one tree walk.

    `b` names the batch in `cache` keys: the same batch must always get the same `b`. The tree is
    built from `variants` alone, so a caller that scores fewer variants pays only for their blocks.
    """
    tree = _prefix_tree(variants)
    out_losses = torch.zeros(len(variants), batch.shape[0], dtype=torch.float64)

    def advance(prefix: tuple, node: _Node, block: int, hidden) -> tuple[tuple, _Node, torch.Tensor]:
        """Hidden states at the end of the chain through `block`, from the deepest cached node on it."""
        path = _chain(node, block)
        keys = []
        for edge_block, _ in path:
            prefix = prefix + (edge_block,)
            keys.append((b, prefix))
        start, state = -1, hidden
        if cache is not None:
            for j in range(len(path) - 1, -1, -1):
                found = cache.get(keys[j])
                if found is not None:
                    start, state = j, found
                    break
        for j in range(start + 1, len(path)):
            state = runner.block(path[j][0], state, batch)
            if cache is not None:
                cache.put(keys[j], state)
        return keys[-1][1], path[-1][1], state

    def walk(node: _Node, prefix: tuple, holder: list[torch.Tensor]) -> None:
        # The hidden states arrive in a one-item list that is emptied here, so this frame holds
        # the only reference and can drop it early.
        hidden = holder.pop()
        if node.ends:
            losses = runner.window_losses(hidden, batch)
            for index in node.ends:
                out_losses[index] = losses
                if on_variant is not None:
                    on_variant(index)
        # Children with fewer blocks below go first, so the largest subtree runs last, after this
        # node's hidden states are released: memory stays at a few states for SLEB-shaped trees.
        children = sorted(node.children, key=lambda block: node.children[block].size)
        for i, block in enumerate(children):
            child_prefix, child, state = advance(prefix, node, block, hidden)
            out = [state]
            del state
            if i == len(children) - 1:
                hidden = None
            walk(child, child_prefix, out)

    root = cache.get((b, ())) if cache is not None else None
    if root is None:
        root = runner.embed(batch)
        if cache is not None:
            cache.put((b, ()), root)
    holder = [root]
    del root
    walk(tree, (), holder)
    return out_losses


def check_finite_dense(runner: BlockRunner, calib: torch.Tensor, loss: float) -> None:
    """Stop before searching when the dense model's calibration loss is NaN or infinite, naming the window."""
    if math.isfinite(loss):
        return
    bad = None
    for i in range(calib.shape[0]):
        window = calib[i : i + 1]
        hidden = runner.embed(window)
        for b in range(runner.num_units):
            hidden = runner.block(b, hidden, window)
        if not torch.isfinite(runner.window_losses(hidden, window)).all():
            bad = i
            break
    where = f"first at window {bad}" if bad is not None else "on this process's windows"
    raise CheckFailed(
        f"the dense model's calibration loss is {loss} ({where}): NaN or Inf weights, or overflow in "
        f"{str(runner.model.dtype).removeprefix('torch.')}; try --dtype float32 or bfloat16, or check the weights"
    )


@dataclass
class BoundaryStats:
    """What one pass over the calibration windows records about the hidden states at block boundaries.

    Boundary b is the hidden state entering block b (boundary L leaves the last block, before the
    final norm). Each matrix is [L + 1, L + 1], entry (i, j) for i < j compares boundaries i and j,
    averaged over windows.
    """

    cos_all: torch.Tensor  # mean over all tokens of cos(h_i, h_j)
    angular_all: torch.Tensor  # mean over all tokens of arccos(cos(h_i, h_j)) / pi
    angular_last: torch.Tensor  # arccos(cos(h_i, h_j)) / pi on each window's last token
    windows: int


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@torch.no_grad()
def boundary_stats(runner: BlockRunner, windows: torch.Tensor, batch_size: int = 1) -> BoundaryStats:
    """One pass of the dense model over `windows`, comparing every pair of block boundaries (unit
    boundaries for a `sleb.units.BranchRunner`)."""
    num_blocks = runner.num_units
    size = num_blocks + 1
    cos_all = torch.zeros(size, size, dtype=torch.float64)
    ang_all = torch.zeros(size, size, dtype=torch.float64)
    ang_last = torch.zeros(size, size, dtype=torch.float64)
    count = 0
    for batch in window_batches(windows, batch_size):
        hidden = runner.embed(batch)
        states = [hidden.float().cpu()]
        for b in range(num_blocks):
            hidden = runner.block(b, hidden, batch)
            current = hidden.float().cpu()
            for i, earlier in enumerate(states):
                cos = F.cosine_similarity(earlier, current, dim=-1).double()  # [batch, tokens]
                cos_all[i, b + 1] += cos.mean(dim=1).sum()
                ang_all[i, b + 1] += _angle(cos).mean(dim=1).sum()
                ang_last[i, b + 1] += _angle(cos[:, -1]).sum()
            states.append(current)
        count += batch.shape[0]
        del states, hidden
    device = runner.model.get_input_embeddings().weight.device
    cos_all, ang_all, ang_last = distributed.all_reduce_sum(torch.stack([cos_all, ang_all, ang_last]), device)
    count = int(distributed.all_reduce_sum(torch.tensor([count], dtype=torch.float64), device).item())
    return BoundaryStats(cos_all / count, ang_all / count, ang_last / count, count)

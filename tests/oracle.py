"""Independent brute-force implementations used as test oracles (and by benchmarks/search_speed.py).

Deliberately plain: every candidate is scored with a full `model(input_ids)` forward in which the
skipped blocks are made identities by forward hooks, and the loss is computed from the logits
here. Nothing from `sleb`'s scoring machinery is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decoder_blocks(model):
    """The block list, found the obvious way for the families the tests build."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        module = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        return module
    raise AssertionError(f"oracle does not know where {type(model).__name__} keeps its blocks")


def _identity_hook(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.no_grad()
def loss_sum(model, windows, skip=()):
    """Sum over windows of mean next-token cross-entropy, with blocks in `skip` made identities."""
    blocks = decoder_blocks(model)
    handles = [blocks[i].register_forward_hook(_identity_hook, with_kwargs=True) for i in skip]
    try:
        total = 0.0
        for row in windows:
            ids = row[None].to(model.get_input_embeddings().weight.device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += F.cross_entropy(logits, ids[0, 1:]).item()
        return total
    finally:
        for h in handles:
            h.remove()


def brute_force_sleb(model, windows, num_remove, early_barrier=1, latter_barrier=1):
    """The paper's greedy Metric3 search, exactly as written: returns (removed, per-step scores)."""
    n = len(decoder_blocks(model))
    alive, removed, steps = list(range(n)), [], []
    for _ in range(num_remove):
        scores = {}
        for c in alive[early_barrier : len(alive) - latter_barrier]:
            scores[c] = loss_sum(model, windows, skip=removed + [c])
        best = min(scores, key=lambda c: (scores[c], c))
        removed.append(best)
        alive.remove(best)
        steps.append(scores)
    return removed, steps


# -- sublayer units: each block's attention and MLP branch ------------------------------------------
BRANCH_ATTRIBUTES = {"attn": ("self_attn", "attn"), "mlp": ("mlp",)}


def branch_module(block, kind):
    """A block's attention or MLP module, found by the names the test families use."""
    for name in BRANCH_ATTRIBUTES[kind]:
        if hasattr(block, name):
            return getattr(block, name)
    raise AssertionError(f"oracle does not know the {kind} branch of {type(block).__name__}")


def _zero_hook(module, args, kwargs, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def loss_sum_units(model, windows, skip=()):
    """`loss_sum` with branch units skipped: unit 2i is block i's attention, 2i + 1 its MLP; a skipped
    branch's output is replaced by zeros."""
    blocks = decoder_blocks(model)
    handles = [branch_module(blocks[u // 2], ("attn", "mlp")[u % 2]).register_forward_hook(_zero_hook, with_kwargs=True)
               for u in skip]
    try:
        return loss_sum(model, windows)
    finally:
        for h in handles:
            h.remove()


def brute_force_units(model, windows, num_remove, unit="sublayer", early_barrier=1, latter_barrier=1, sizes=None):
    """BlockPruner's greedy search over branches, written plainly: returns (removed unit ids, per-step scores).

    With `sizes` (unit id -> parameter count) the pick is the lowest loss increase per parameter (a decrease:
    the largest decrease times size)."""
    n = len(decoder_blocks(model))
    allowed = range(early_barrier, n - latter_barrier)
    alive = [2 * b + k for b in allowed for k in ((0, 1) if unit == "sublayer" else (0,))]
    removed, steps = [], []
    for _ in range(num_remove):
        base = loss_sum_units(model, windows, skip=removed)
        scores = {u: loss_sum_units(model, windows, skip=removed + [u]) for u in alive}
        if sizes is None:
            best = min(scores, key=lambda u: (scores[u], u))
        else:
            def rank(u):
                delta = scores[u] - base
                return delta / sizes[u] if delta > 0 else delta * sizes[u]
            best = min(scores, key=lambda u: (rank(u), u))
        removed.append(best)
        alive.remove(best)
        steps.append(scores)
    return removed, steps


@torch.no_grad()
def unit_cosine_scores(model, windows):
    """1 - mean cosine(unit input, unit output) over all tokens of all windows, for every branch unit of a
    pre-norm model whose branch outputs are added to the residual stream as they are (Llama): the input of
    block i plus its attention output is where 2i leaves and 2i + 1 starts."""
    blocks = decoder_blocks(model)
    sums = {}
    for row in windows:
        seen = {}
        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: seen.__setitem__(("in", i), (args[0] if args else kwargs["hidden_states"])),
                with_kwargs=True))
            handles.append(block.register_forward_hook(
                lambda m, args, out, i=i: seen.__setitem__(("out", i), out[0] if isinstance(out, tuple) else out)))
            handles.append(branch_module(block, "attn").register_forward_hook(
                lambda m, args, out, i=i: seen.__setitem__(("attn", i), out[0] if isinstance(out, tuple) else out)))
        try:
            model(input_ids=row[None], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for i in range(len(blocks)):
            x, y = seen[("in", i)].float(), seen[("out", i)].float()
            mid = x + seen[("attn", i)].float()
            for unit, (a, b) in ((2 * i, (x, mid)), (2 * i + 1, (mid, y))):
                sums[unit] = sums.get(unit, 0.0) + F.cosine_similarity(a, b, dim=-1).mean().item()
    return {u: 1.0 - s / len(windows) for u, s in sums.items()}


# -- the per-second unit score and a speed target ----------------------------------------------------
def cost_after(removed, costs, dense, rest=None):
    """The model's cost without `removed`: `dense` less each unit's cost, and a block's `rest` (by block) when
    both its units are gone."""
    gone = set(removed)
    return dense - sum(costs[u] for u in gone) - sum(r for b, r in (rest or {}).items() if {2 * b, 2 * b + 1} <= gone)


def brute_force_per_second(model, windows, costs, dense, rest=None, unit="sublayer", num_remove=None, target=None,
                           early_barrier=1, latter_barrier=1):
    """Greedy by the loss increase per cost saved (a decrease: decrease times cost saved), where a unit saves its
    cost and, once its sibling is gone, its block's rest; stops after `num_remove` units or once
    dense / cost_after >= `target`. Returns (removed, per-step scores)."""
    n = len(decoder_blocks(model))
    allowed = range(early_barrier, n - latter_barrier)
    alive = [2 * b + k for b in allowed for k in ((0, 1) if unit == "sublayer" else (0,))]
    removed, steps = [], []
    while alive and (num_remove is None or len(removed) < num_remove):
        base = loss_sum_units(model, windows, skip=removed)
        scores = {u: loss_sum_units(model, windows, skip=removed + [u]) for u in alive}

        def rank(u):
            delta = scores[u] - base
            saved = cost_after(removed, costs, dense, rest) - cost_after(removed + [u], costs, dense, rest)
            return delta / saved if delta > 0 else delta * saved

        best = min(scores, key=lambda u: (rank(u), u))
        removed.append(best)
        alive.remove(best)
        steps.append(scores)
        if target is not None and dense / cost_after(removed, costs, dense, rest) >= target - 1e-12:
            break
    return removed, steps


def swap_refine_units(model, windows, removed, feasible, unit="sublayer", early_barrier=1, latter_barrier=1,
                      drops=True):
    """Exchange a removed unit for a kept candidate, or put a removed unit back, while that lowers the loss
    and the set stays `feasible`: each round the lowest-loss move (ties: lowest removed, then lowest kept id,
    putting back counting as -1). Returns (the set, sorted; its loss)."""
    n = len(decoder_blocks(model))
    allowed = range(early_barrier, n - latter_barrier)
    cands = [2 * b + k for b in allowed for k in ((0, 1) if unit == "sublayer" else (0,))]
    gone = set(removed)
    current = loss_sum_units(model, windows, skip=sorted(gone))
    while True:
        moves = [(r, k, gone - {r} | {k}) for r in sorted(gone) for k in cands if k not in gone]
        moves += [(r, -1, gone - {r}) for r in sorted(gone)] if drops and len(gone) > 1 else []
        moves = [m for m in moves if feasible(sorted(m[2]))]
        if not moves:
            break
        scored = [(loss_sum_units(model, windows, skip=sorted(new)), r, k, new) for r, k, new in moves]
        loss, _, _, new = min(scored, key=lambda m: (m[0], m[1], m[2]))
        if not loss < current - 1e-9 * abs(current):
            break
        gone, current = new, loss
    return sorted(gone), current

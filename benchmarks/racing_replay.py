"""Why racing saves what it saves: replay `race_step` on complete per-window loss tables.

    python benchmarks/racing_replay.py --nsamples 24 --seqlen 128 --steps 2 [--tables FILE] [--orders 20]

First the exact search's steps are scored completely (every candidate on every window: one
exact search, `--steps` steps, on the offline model; `--tables` caches them as JSON). Then
`sleb.racing.race_step` is replayed on those tables, in `--orders` random window orders, for a grid
of settings (confidence, tolerance, min_windows, and the reference: the best of the search's own
`--guesses` -- Metric1 in step 1, then the previous replayed step's longest survivors -- or the true
best one, an oracle no search has). Each order is replayed as one whole search: every step on the
same order, each step's guesses taken from the step before. A replay costs no model time, so the
grid shows which setting buys what.

Cost model: a candidate costs, per window, the blocks after it plus the head, counted as
`--head-blocks` blocks (11 for SmolLM2 at 128 tokens: head 146 ms vs a block 13.2 ms, measured);
the shared trunk before the first candidate is cached between steps and left out. "speedup" is the
exact step's cost over the replay's; "misses" counts replays whose pick is worse than the best
candidate by more than the tolerance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

import sleb
from sleb import racing
from sleb.arch import BlockRunner
from sleb.criteria import boundary_stats
from sleb.scoring import StateCache, batch_losses


def loss_tables(model, windows: torch.Tensor, steps: int, batch_size: int) -> dict:
    """Every candidate's per-window loss at each of the exact search's first `steps` steps."""
    runner = BlockRunner(model)
    n = len(runner.blocks.modules)
    stats = boundary_stats(runner, windows, batch_size)
    metric1 = [1.0 - float(stats.cos_all[b, b + 1]) for b in range(n)]  # SLEB's Metric1 per block
    cache = StateCache(2 * 1024**3)
    removed: list[int] = []
    tables = []
    for step in range(steps):
        alive = [b for b in range(n) if b not in removed]
        cands = alive[1:-1]  # the default barriers
        variants = [[b for b in alive if b != c] for c in cands]
        rows = [batch_losses(runner, batch, i, variants, cache=cache)
                for i, batch in enumerate(torch.split(windows, batch_size))]
        table = torch.cat(rows, dim=1)
        tables.append({"alive": alive, "cands": cands, "losses": table.tolist()})
        removed.append(cands[int(table.sum(dim=1).argmin())])
        print(f"step {step + 1}: removed {removed[-1]}", flush=True)
    return {"blocks": n, "removed": removed, "metric1": metric1, "tables": tables}


def step_cost(data: dict, step: int, head_blocks: float) -> float:
    """The exact step's cost in block-windows: every candidate on every window."""
    entry = data["tables"][step]
    alive, windows = entry["alive"], len(entry["losses"][0])
    return sum(len(alive) - 1 - alive.index(c) + head_blocks for c in entry["cands"]) * windows


def replay(data: dict, step: int, order: list[int], reference: str, head_blocks: float,
           previous: racing.RaceOutcome | None = None, guesses: int = racing.REFERENCE_GUESSES, **settings):
    """(speedup over the exact step, relative regret of the pick, the race) of one racing step on one window
    order; `previous` is the replayed race of the step before on the same order, which ranks the
    reference guesses as the search does."""
    entry = data["tables"][step]
    cands, alive = entry["cands"], entry["alive"]
    table = torch.tensor(entry["losses"], dtype=torch.float64)
    unit = {c: len(alive) - 1 - alive.index(c) + head_blocks for c in cands}
    cost = [0.0]

    def fake_batch_losses(runner, batch, b, variants, on_variant=None, cache=None):
        rows = [table[cands.index(v[0])][batch[:, 0]] for v in variants]
        cost[0] += sum(unit[v[0]] for v in variants) * batch.shape[0]
        return torch.stack(rows)

    totals = table.sum(dim=1)
    if reference == "best":
        ref = cands[int(totals.argmin())]
    else:  # as the search does: Metric1 in the first step, then the previous race's survivors
        prior = (dict(enumerate(data["metric1"])) if previous is None
                 else racing.survival_prior(previous.scores, previous.windows))
        ref = racing.likeliest(prior, cands, guesses)
    original = racing.batch_losses
    racing.batch_losses = fake_batch_losses
    try:
        out = racing.race_step(None, torch.tensor(order).unsqueeze(1), {c: (c,) for c in cands}, reference=ref,
                               **settings)
    finally:
        racing.batch_losses = original
    exact = sum(unit[c] for c in cands) * table.shape[1]
    best = float(totals.min())
    return exact / cost[0], (float(totals[cands.index(out.best)]) - best) / best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="gensim-wiki")
    parser.add_argument("--nsamples", type=int, default=24)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="for building the tables (scores do not change)")
    parser.add_argument("--tables", type=Path, help="cache of the loss tables: read if it exists, else written")
    parser.add_argument("--orders", type=int, default=20, help="random window orders per setting")
    parser.add_argument("--head-blocks", type=float, default=11.0)
    parser.add_argument("--confidence", default="0.95,0.9")
    parser.add_argument("--tolerance", default="0.001,0.005")
    parser.add_argument("--min-windows", default="4,6")
    parser.add_argument("--guesses", default="1,2,3", help="reference guesses completed first (best one is used)")
    args = parser.parse_args()

    if args.tables and args.tables.exists():
        data = json.loads(args.tables.read_text())
    else:
        model, tokenizer = sleb.load(args.model, dtype="float32", device="cpu")
        windows = sleb.calibration(tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
        data = loss_tables(model, windows, args.steps, args.batch_size)
        if args.tables:
            args.tables.write_text(json.dumps(data))
    steps = len(data["tables"])
    windows = len(data["tables"][0]["losses"][0])
    print(f"\n{args.model}: racing replayed on the exact search's complete loss tables ({windows} windows, "
          f"{steps} steps, removed {data['removed']}), {args.orders} window orders per setting\n")
    print("| reference | confidence | tolerance | min_windows | "
          + " | ".join(f"step {s + 1} speedup (misses)" for s in range(steps)) + " | whole search |")
    print("|---|---|---|---|" + "---|" * (steps + 1))
    exact = sum(step_cost(data, s, args.head_blocks) for s in range(steps))
    references = [("search", int(k)) for k in args.guesses.split(",")] + [("best", 1)]
    grid = itertools.product(references, [float(x) for x in args.confidence.split(",")],
                             [float(x) for x in args.tolerance.split(",")], [int(x) for x in args.min_windows.split(",")])
    for (reference, guesses), confidence, tolerance, min_windows in grid:
        g = torch.Generator().manual_seed(0)
        chains = []  # one replayed search (every step, one window order) per order
        for _ in range(args.orders):
            order, previous, chain = torch.randperm(windows, generator=g).tolist(), None, []
            for step in range(steps):
                chain.append(replay(data, step, order, reference, args.head_blocks, previous, guesses,
                                    confidence=confidence, tolerance=tolerance, min_windows=min_windows))
                previous = chain[-1][2]
            chains.append(chain)
        cells = []
        for step in range(steps):
            runs = [chain[step] for chain in chains]
            misses = sum(r[1] > tolerance for r in runs)
            cells.append(f"{statistics.mean(r[0] for r in runs):.2f}x ({misses}/{args.orders})")
        raced = [sum(step_cost(data, s, args.head_blocks) / r[0] for s, r in enumerate(chain)) for chain in chains]
        cells.append(f"{statistics.mean(exact / r for r in raced):.2f}x")
        name = f"search's, best of {guesses}" if reference == "search" else "oracle: the true best"
        print(f"| {name} | {confidence} | {tolerance} | {min_windows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

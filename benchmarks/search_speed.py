"""Brute-force SLEB (the paper's loop) vs `sleb.search` on the offline model: time and order.

    python benchmarks/search_speed.py [--nsamples 2] [--seqlen 256] [--remove 3] [--rounds 2] [--batch-size 1]

All methods search the same calibration windows of gensim-wiki with the same fp32 model. They run
in alternation, `--rounds` times, and the fastest round of each is reported, so a load change on
the machine does not favour one method. The brute force is tests/oracle.py: a full model forward
per candidate, the skipped blocks made identities by hooks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import sleb  # noqa: E402
from oracle import brute_force_sleb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="gensim-wiki")
    parser.add_argument("--nsamples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--remove", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="also time sleb.search at this batch size if > 1")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = sleb.load(args.model, dtype="float32", device="cpu")
    windows = sleb.calibration(tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)

    methods = {
        "brute force (paper loop)": lambda: brute_force_sleb(model, windows, args.remove),
        "sleb.search, prefix tree only (cache_bytes=0)": lambda: sleb.search(
            model, windows, args.remove, cache_bytes=0, progress=False),
        "sleb.search (default: + state cache across steps)": lambda: sleb.search(
            model, windows, args.remove, progress=False),
    }
    if args.batch_size > 1:
        methods[f"sleb.search, batch_size={args.batch_size}"] = lambda: sleb.search(
            model, windows, args.remove, batch_size=args.batch_size, progress=False)

    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    seconds = {name: [] for name in methods}
    outcome = {}
    for _ in range(args.rounds):
        for name, run in methods.items():
            start = time.perf_counter()
            outcome[name] = run()
            seconds[name].append(time.perf_counter() - start)

    brute_name = next(iter(methods))
    brute_order, brute_scores = outcome[brute_name]
    brute_s = min(seconds[brute_name])
    print(f"model {args.model}, {args.nsamples} x {args.seqlen} tokens of {args.calib}, remove {args.remove}, "
          f"{args.threads} threads, torch {torch.__version__}, best of {args.rounds} alternated rounds; "
          f"load average before: {load_before}, after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| method | seconds (each round) | speedup | removal order | same order | max score diff |")
    print("|---|---|---|---|---|---|")
    rounds = lambda name: " / ".join(f"{s:.1f}" for s in seconds[name])  # noqa: E731
    print(f"| {brute_name} | {rounds(brute_name)} | 1.00x | {brute_order} | - | - |")
    for name in list(methods)[1:]:
        result = outcome[name]
        worst = max(abs(result.steps[k].scores[c] - s) for k, step in enumerate(brute_scores) for c, s in step.items())
        print(f"| {name} | {rounds(name)} | {brute_s / min(seconds[name]):.2f}x | {result.removed} | "
              f"{'yes' if result.removed == brute_order else 'NO'} | {worst:.1e} |")


if __name__ == "__main__":
    main()

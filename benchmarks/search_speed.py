"""Brute-force SLEB (the paper's loop) vs `sleb.search` on the offline model: time and order.

    python benchmarks/search_speed.py [--nsamples 4] [--seqlen 256] [--remove 3] [--batch-size 4]

Both search the same calibration windows of gensim-wiki with the same fp32 model on this machine.
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
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--remove", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = sleb.load(args.model, dtype="float32", device="cpu")
    windows = sleb.calibration(tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)

    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.perf_counter()
    brute_order, brute_scores = brute_force_sleb(model, windows, args.remove)
    brute_s = time.perf_counter() - start

    variants = [
        ("sleb.search, prefix tree only (cache off, batch 1)", dict(cache_bytes=0, batch_size=1)),
        ("sleb.search, + state cache across steps (batch 1)", dict(batch_size=1)),
        (f"sleb.search, + state cache, batch {args.batch_size}", dict(batch_size=args.batch_size)),
    ]
    rows = []
    for name, kwargs in variants:
        start = time.perf_counter()
        result = sleb.search(model, windows, args.remove, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        worst = max(abs(result.steps[k].scores[c] - s) for k, step in enumerate(brute_scores) for c, s in step.items())
        rows.append((name, seconds, result.removed, worst))

    print(f"model {args.model}, {args.nsamples} x {args.seqlen} tokens of {args.calib}, remove {args.remove}, "
          f"{args.threads} threads, torch {torch.__version__}, load average before: {load_before}")
    print()
    print("| method | seconds | speedup | removal order | same order | max score diff |")
    print("|---|---|---|---|---|---|")
    print(f"| brute force (paper loop, batch 1) | {brute_s:.1f} | 1.00x | {brute_order} | - | - |")
    for name, seconds, removed, worst in rows:
        print(f"| {name} | {seconds:.1f} | {brute_s / seconds:.2f}x | {removed} | "
              f"{'yes' if removed == brute_order else 'NO'} | {worst:.1e} |")


if __name__ == "__main__":
    main()

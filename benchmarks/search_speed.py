"""Brute-force SLEB (the paper's loop) vs `sleb.search`, exact and racing, on the offline model: time and order.

    python benchmarks/search_speed.py [--nsamples 2] [--seqlen 256] [--remove 3] [--rounds 2] [--batch-size 1]
    # racing vs exact at 24 windows, with held-out perplexity of each pick (the issue-11 check):
    python benchmarks/search_speed.py --nsamples 24 --seqlen 128 --remove 4 --rounds 1 --no-brute \
        --racing 0.95 --tolerance 0,0.001 --heldout gensim-wiki,gensim-lee

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
    parser.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="also time sleb.search at this batch size if > 1")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--racing", default="0.95,1.0",
                        help="comma-separated confidences: a racing sleb.search row for each ('' for none)")
    parser.add_argument("--tolerance", default="0.001",
                        help="comma-separated racing tolerances: a row for each confidence and tolerance")
    parser.add_argument("--no-brute", action="store_true",
                        help="skip the brute force (slow beyond a few windows); speedups are then against the "
                             "first sleb.search row")
    parser.add_argument("--heldout", default="",
                        help="comma-separated text specs: held-out perplexity of each row's pick (their test parts)")
    parser.add_argument("--heldout-seqlen", type=int, default=512)
    parser.add_argument("--heldout-windows", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = sleb.load(args.model, dtype="float32", device="cpu")
    windows = sleb.calibration(tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)

    methods = {} if args.no_brute else {
        "brute force (paper loop)": lambda: brute_force_sleb(model, windows, args.remove)}
    if not args.no_brute:  # the prefix tree's own gain over the paper's loop
        methods["sleb.search, prefix tree only (cache_bytes=0)"] = lambda: sleb.search(
            model, windows, args.remove, cache_bytes=0, progress=False)
    methods["sleb.search (default: + state cache across steps)"] = lambda: sleb.search(
        model, windows, args.remove, progress=False)
    if args.batch_size > 1:
        methods[f"sleb.search, batch_size={args.batch_size}"] = lambda: sleb.search(
            model, windows, args.remove, batch_size=args.batch_size, progress=False)
    for confidence in [float(c) for c in args.racing.split(",") if c.strip()]:
        for tolerance in [float(t) for t in args.tolerance.split(",")] if confidence < 1 else [0.0]:
            methods[f"sleb.search racing, confidence={confidence}, tolerance={tolerance}"] = (
                lambda confidence=confidence, tolerance=tolerance: sleb.search(
                    model, windows, args.remove, racing=True, confidence=confidence, tolerance=tolerance,
                    progress=False))

    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    seconds = {name: [] for name in methods}
    outcome = {}
    for _ in range(args.rounds):
        for name, run in methods.items():
            start = time.perf_counter()
            outcome[name] = run()
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {seconds[name][-1]:.1f} s, removed {outcome[name].removed if hasattr(outcome[name], 'removed') else outcome[name][0]}",
                  file=sys.stderr, flush=True)

    base_name = next(iter(methods))
    if args.no_brute:  # the reference is the first exact sleb.search row
        ref = outcome[base_name]
        base_order, base_scores = ref.removed, [s.scores for s in ref.steps]
    else:
        base_order, base_scores = outcome[base_name]
    base_s = min(seconds[base_name])
    print(f"model {args.model}, {args.nsamples} x {args.seqlen} tokens of {args.calib} (seed {args.seed}), remove {args.remove}, "
          f"{args.threads} threads, torch {torch.__version__}, best of {args.rounds} alternated rounds; "
          f"load average before: {load_before}, after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    heldout = [s.strip() for s in args.heldout.split(",") if s.strip()]
    ppl_cache: dict[tuple, list[float]] = {}

    def heldout_ppl(removed: list[int]) -> list[float]:
        from sleb.units import pruned_view

        key = tuple(sorted(removed))
        if key not in ppl_cache:
            with pruned_view(model, list(removed)):
                ppl_cache[key] = [sleb.perplexity(model, tokenizer, spec, args.heldout_seqlen, progress=False,
                                                  max_windows=args.heldout_windows).ppl for spec in heldout]
        return ppl_cache[key]

    print("| method | seconds (each round) | speedup | removal order | same order | max score diff "
          "| candidate windows scored |" + "".join(f" held-out ppl {s} |" for s in heldout))
    print("|---|---|---|---|---|---|---|" + "---|" * len(heldout))
    rounds = lambda name: " / ".join(f"{s:.1f}" for s in seconds[name])  # noqa: E731
    base_ppl = heldout_ppl(base_order) if heldout else []
    ppl_cells = lambda values: "".join(  # noqa: E731
        f" {v:.3f} ({100 * (v / b - 1):+.2f}%) |" for v, b in zip(values, base_ppl))
    first = 0 if args.no_brute else 1
    if not args.no_brute:
        print(f"| {base_name} | {rounds(base_name)} | 1.00x | {base_order} | - | - | all |{ppl_cells(base_ppl)}")
    for name in list(methods)[first:]:
        result = outcome[name]
        # Racing rows: compare complete scores only (the others are lower bounds or estimates).
        worst = max((abs(result.steps[k].scores[c] - s) for k, step in enumerate(base_scores) for c, s in step.items()
                     if k < len(result.steps) and result.steps[k].kinds.get(c, "complete") == "complete"), default=0.0)
        kinds = [s for s in result.steps if s.kinds]
        scored = (f"{sum(sum(s.windows.values()) for s in kinds)} of "
                  f"{sum(len(s.scores) for s in kinds) * args.nsamples}") if kinds else "all"
        print(f"| {name} | {rounds(name)} | {base_s / min(seconds[name]):.2f}x | {result.removed} | "
              f"{'yes' if result.removed == base_order else 'NO'} | {worst:.1e} | {scored} |"
              f"{ppl_cells(heldout_ppl(result.removed)) if heldout else ''}")
    if heldout:
        print(f"\nheld-out: {args.heldout_windows} windows of {args.heldout_seqlen} tokens of each spec's test part; "
              f"dense {', '.join(f'{s} {v:.3f}' for s, v in zip(heldout, heldout_ppl([])))}; "
              "% is against the first row's pick")


if __name__ == "__main__":
    main()

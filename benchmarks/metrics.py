"""Every redundancy criterion on the offline model, and greedy SLEB vs beam / swap refinement.

    python benchmarks/metrics.py [--nsamples 8] [--seqlen 256] [--ratios 0.1,0.2,0.3] [--eval-windows 16]
                                 [--beam 2] [--refine-seconds 900] [--out benchmarks/results/metrics]

Part 1 is `sleb compare`: each criterion searches once on the same gensim-wiki calibration windows
(train part) and each pruned model is evaluated on the test parts of gensim-wiki and gensim-lee.
Part 2 prunes the largest ratio with greedy SLEB, beam search and swap refinement on the same
windows and reports calibration loss and held-out perplexity of each. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import sleb
from sleb.budgets import budgeted_search
from sleb.config import Budget, Refinement
from sleb.evaluate import heldout_perplexity
from sleb.compare import compare_model, markdown
from sleb.result import count_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="gensim-wiki")
    parser.add_argument("--eval", default="gensim-wiki,gensim-lee")
    parser.add_argument("--metrics", default="sleb,cosine,angular,ppl-oneshot,last")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--beam", type=int, default=2, help="beam width for part 2 (0 skips the beam)")
    parser.add_argument("--refine-seconds", type=float, default=900.0)
    parser.add_argument("--skip-refine", action="store_true", help="only part 1")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/metrics")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    specs = args.eval.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]

    model, tokenizer = sleb.load(args.model, dtype="float32", device="cpu")
    table = compare_model(model, tokenizer, metrics=args.metrics.split(","), ratios=ratios, calib_spec=args.calib,
                          eval_specs=specs, nsamples=args.nsamples, seqlen=args.seqlen,
                          max_eval_windows=args.eval_windows, out_dir=out, progress=False)
    print("## Criteria compared\n")
    print(markdown(table))
    if args.skip_refine:
        return

    windows = sleb.calibration(tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    count = max(r["removed_blocks"] for r in table["rows"])

    def heldout(removed):
        return heldout_perplexity(model, tokenizer, specs, removed, args.seqlen, max_windows=args.eval_windows)

    runs = {}
    t0 = time.perf_counter()
    greedy = budgeted_search(model, windows, Budget(remove=count), progress=False)
    runs["greedy SLEB"] = (greedy.removed, count_loss(greedy, count), time.perf_counter() - t0)
    if args.beam:
        t0 = time.perf_counter()
        beam = budgeted_search(model, windows, Budget(remove=count), refine=Refinement(beam=args.beam), progress=False)
        runs[f"beam {args.beam}"] = (beam.removed, beam.refine["loss"], time.perf_counter() - t0)
    t0 = time.perf_counter()
    from sleb.refine import refine_swap

    swapped = refine_swap(model, windows, greedy, max_seconds=args.refine_seconds, progress=False)
    runs["greedy + swap"] = (swapped.removed, swapped.refine["loss"],
                             runs["greedy SLEB"][2] + time.perf_counter() - t0)
    swap_info = swapped.refine["stages"][-1]

    rows = []
    for name, (removed, loss, seconds) in runs.items():
        rows.append({"method": name, "removed": sorted(removed), "calibration_loss": loss,
                     "calibration_ppl": math.exp(loss / args.nsamples), "eval_ppl": heldout(removed),
                     "seconds": seconds})
    (out / "refine.json").write_text(json.dumps({"count": count, "rows": rows, "swap": swap_info}, indent=2))
    base = rows[0]["eval_ppl"]
    print(f"## Greedy vs refined at {count} of {table['num_blocks']} blocks\n")
    print("| method | removed | calibration loss | calibration ppl | "
          + " | ".join(f"{s} ppl (vs greedy)" for s in specs) + " | seconds |")
    print("|---|---|---|---|" + "---|" * len(specs) + "---|")
    for r in rows:
        cells = " | ".join(f"{r['eval_ppl'][s]:.2f} ({r['eval_ppl'][s] / base[s] - 1:+.1%})" for s in specs)
        print(f"| {r['method']} | {r['removed']} | {r['calibration_loss']:.4f} | {r['calibration_ppl']:.3f} | "
              f"{cells} | {r['seconds']:.0f} |")
    print(f"\nswap refinement: {swap_info['rounds']} rounds, swaps {[(s['out'], s['in']) for s in swap_info['swaps']]}, "
          f"stopped: {swap_info['stopped']}")


if __name__ == "__main__":
    main()

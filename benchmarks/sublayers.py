"""Block SLEB vs the sublayer search vs the attention-only search, at an equal parameter count removed.

    python benchmarks/sublayers.py [--blocks 6] [--nsamples 16] [--seqlen 64] [--exact] [--eval-windows 16]
                                   [--eval-seqlen 256] [--cloze 200] [--units sublayer,attention]
                                   [--unit-score loss|per-parameter] [--compensate linear]
                                   [--fit-nsamples 16] [--fit-seqlen 256] [--out DIR]

On the offline model (SmolLM2-135M-Instruct, fp32): SLEB removes `--blocks` whole blocks (greedy Metric3,
racing unless `--exact`, on `--nsamples` x `--seqlen` tokens of gensim-wiki's train part, seed 0); their
parameters are the budget. The sublayer search (attention and MLP branches) and the attention-only search
then remove units on the same windows until at least that many parameters are gone. Each pruned model
(made in memory with `sleb.units.remove_units`) is scored on the first `--eval-windows` windows of
`--eval-seqlen` tokens of the test parts of gensim-wiki and gensim-lee (never calibrated on), and on
benchmarks/compensate.py's local 4-way cloze task (`--cloze N` items; 0: none). Prints a Markdown table
with the KV cache per token (attention layers kept x 2 x key/value width x 4 bytes). `--unit-score` applies to
the sublayer search (attention units are all one size, so both rules rank them alike). With `--compensate`, every
search also gets a row `NAME+linear`: the same units with `sleb.compensate` fitted before they are removed, on `--fit-nsamples` x `--fit-seqlen` tokens of gensim-wiki's train part (the
16 x 256 of docs/results.md's compensation table; the searches keep their own windows).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

import sleb
from sleb.arch import find_blocks, kv_width
from sleb.sizes import Sizer
from sleb.units import BranchRunner, UnitSpace, remove_units

sys.path.insert(0, str(Path(__file__).parent))
from compensate import CLOZE_TASK, write_cloze_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--exact", action="store_true", help="the exact search instead of racing")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--cloze", type=int, default=200)
    parser.add_argument("--units", default="sublayer,attention", help="the branch searches to run")
    parser.add_argument("--unit-score", default="loss", choices=["loss", "per-parameter"],
                        help="how the branch searches rank units (per-parameter runs them exactly)")
    parser.add_argument("--compensate", choices=["linear", "linear-cosine"],
                        help="also each search's units with this compensation folded in")
    parser.add_argument("--fit-nsamples", type=int, default=16)
    parser.add_argument("--fit-seqlen", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("runs/sublayers"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# load average at start: {os.getloadavg()}", file=sys.stderr)
    model, tokenizer = sleb.load("smollm2-135m", dtype="float32", device="cpu")
    calib = sleb.calibration(tokenizer, "gensim-wiki", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    blocks = find_blocks(model).modules
    runner = BranchRunner(model)
    branches = runner.prepare(calib[:1])
    space = UnitSpace("sublayer", len(blocks))
    unit_params = dict(enumerate(Sizer.of(model, args.seqlen, branches).block_params))
    block_params = {b: sum(p.numel() for p in blocks[b].parameters()) for b in range(len(blocks))}

    searches = {}
    started = time.perf_counter()
    searches["block"] = sleb.search(model, calib, args.blocks, racing=not args.exact, progress=True)
    searches["block"].seconds = time.perf_counter() - started
    budget = sum(block_params[b] for b in searches["block"].removed)
    print(f"# block SLEB removed {searches['block'].removed}: {budget:,} parameters", file=sys.stderr)
    for unit in args.units.split(","):
        started = time.perf_counter()
        max_remove = UnitSpace(unit, len(blocks)).max_remove(sleb.SearchOptions())
        score = args.unit_score if unit == "sublayer" else "loss"
        searches[unit] = sleb.search(
            model, calib, max_remove, unit=unit, unit_score=score,
            racing=not args.exact and score == "loss", progress=True,
            stop_when=lambda r: sum(unit_params[u] for u in r.removed) >= budget)
        searches[unit].seconds = time.perf_counter() - started
        print(f"# {unit}: removed {[space.label(u) for u in searches[unit].removed]}", file=sys.stderr)

    task = write_cloze_task(args.out / "task", args.cloze) if args.cloze else None
    specs = ["gensim-wiki", "gensim-lee"]
    rows = []
    variants = [("dense", None, False)]
    for name, result in searches.items():
        variants.append((name, result, False))
        if args.compensate:
            variants.append((f"{name}+{args.compensate}", result, True))
    for name, result, fitted in variants:
        pruned = copy.deepcopy(model)
        fit_ppl = None
        if fitted:
            fit_windows = sleb.calibration(tokenizer, "gensim-wiki", nsamples=args.fit_nsamples,
                                           seqlen=args.fit_seqlen, seed=0)
            fit_ppl = sleb.compensate(pruned, fit_windows, result.removed, objective=args.compensate, unit=result.unit,
                                      progress=False).calibration_ppl
        if result is not None:
            remove_units(pruned, result.removed, result.unit)
        removed = 0 if result is None else (budget if result.unit == "block" else
                                           sum(unit_params[u] for u in result.removed))
        kept_attention = len(blocks) if result is None else (
            len(blocks) - len(result.removed) if result.unit == "block" else
            len(blocks) - sum(1 for u in result.removed if space.branch_of(u) == "attn"))
        row = {"model": name, "units": 0 if result is None else len(result.removed),
               "removed": [] if result is None else ([str(b) for b in result.removed] if result.unit == "block"
                                                     else [space.label(u) for u in result.removed]),
               "params_removed": removed, "attention_layers": kept_attention,
               "kv_bytes_per_token": kept_attention * 2 * kv_width(model) * 4,
               "search_s": 0.0 if result is None else result.seconds,
               "calibration_ppl": fit_ppl if fitted else None if result is None else result.calibration_ppl(),
               "ppl": {s: sleb.perplexity(pruned, tokenizer, s, args.eval_seqlen, max_windows=args.eval_windows,
                                          progress=False).ppl for s in specs}}
        if task is not None:
            row["cloze_acc"] = sleb.zero_shot(pruned, tokenizer, [CLOZE_TASK], include_path=task)[CLOZE_TASK].accuracy
        rows.append(row)
        print(f"# {name}: {row['ppl']}", file=sys.stderr)
        del pruned
    (args.out / "sublayers.json").write_text(json.dumps(rows, indent=2))

    base = next(row["ppl"] for row in rows if row["model"] == "block")
    print(f"| search | units removed | parameters removed | attention layers | KV cache / token | "
          f"calibration ppl | {' | '.join(f'{s} ppl (vs block SLEB)' for s in specs)} | cloze acc | search s |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * (len(specs) + 2))
    for row in rows:
        cells = [f"{row['ppl'][s]:.2f} ({100 * (row['ppl'][s] / base[s] - 1):+.1f}%)" for s in specs]
        acc = f"{100 * row['cloze_acc']:.1f}%" if "cloze_acc" in row else "-"
        print(f"| {row['model']} | {row['units']} | {row['params_removed'] / 1e6:.2f} M | {row['attention_layers']} | "
              f"{row['kv_bytes_per_token'] / 1024:.0f} KiB | "
              f"{'-' if row['calibration_ppl'] is None else format(row['calibration_ppl'], '.2f')} | "
              f"{' | '.join(cells)} | {acc} | {row['search_s']:.0f} |")
    for row in rows[1:]:
        if "+" not in row["model"]:
            print(f"\n{row['model']}: {', '.join(row['removed'])}")
    print(f"# load average at end: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()

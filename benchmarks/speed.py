"""What SLEB buys in speed and memory, alone and with weight quantization, on the offline model.

    python benchmarks/speed.py                     # CPU-sized defaults (prefill 1x512, generation 4/32/32)
    python benchmarks/speed.py --paper             # the paper's sizes (prefill 1x2048, generation 64/64/128)

Runs one SLEB search for the larger ratio (the greedy order is nested, so its first removals are
the smaller ratio's), saves the pruned checkpoints, quantizes dense and pruned with `sleb.quantize`
(int8 and int4), reloads every checkpoint from disk, benchmarks all of them together with
`sleb.bench` (models in alternation, dense fp32 as the baseline) and measures perplexity on
gensim-lee. Prints one Markdown table; `--json FILE` keeps everything. Artefacts go to --workdir
and are reused on a rerun (the search resumes from its checkpoint file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import sleb
from sleb import sizes as B
from sleb.arch import find_blocks
from sleb import Budget
from sleb.loading import local_checkpoint
from sleb.quantize import quantize, quiet_bitsandbytes

quiet_bitsandbytes()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.1,0.2", help="Fractions of blocks to remove (rounded up).")
    parser.add_argument("--methods", default="int8,int4", help="Quantization methods applied to every model.")
    parser.add_argument("--calib", default="gensim-wiki")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--search-checkpoint", help="Search state file (default: in --workdir, named by the calibration).")
    parser.add_argument("--workdir", default="runs/speed")
    parser.add_argument("--prefill-batch", type=int, default=1)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--gen-prompt", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--paper", action="store_true", help="Prefill 1x2048 and generation 64/64/128 (slow on CPU).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ppl-seqlen", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="Write the bench result, perplexities and removals here.")
    args = parser.parse_args()
    if args.paper:
        args.prefill_batch, args.prefill_len, args.gen_batch, args.gen_prompt, args.gen_tokens = 1, 2048, 64, 64, 128
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = [m for m in args.methods.split(",") if m]

    log(f"loading {args.model}")
    dense, tokenizer = sleb.load(args.model, dtype="float32", device=args.device)
    num_blocks = len(find_blocks(dense).modules)
    counts = {r: Budget(ratio=r).count(num_blocks) for r in ratios}
    checkpoint = args.search_checkpoint or work / f"search-{args.calib}-{args.nsamples}x{args.seqlen}.json"
    windows = sleb.calibration(tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    log(f"SLEB search for {max(counts.values())} of {num_blocks} blocks on {args.nsamples} x {args.seqlen} "
        f"tokens of {args.calib} (checkpoint {checkpoint})")
    result = sleb.search(dense, windows, max(counts.values()), checkpoint=checkpoint)
    log(f"removal order {result.removed}")

    sources = {"dense": local_checkpoint(args.model)}
    for ratio, count in counts.items():
        folder = work / f"pruned-{round(ratio * 100)}"
        removed = result.removed[:count]
        report = folder / "sleb_report.json"
        if not (report.is_file() and json.loads(report.read_text()).get("removed") == removed):
            log(f"saving {folder} (removed {removed})")
            model, tok = sleb.load(args.model, dtype="float32", device=args.device)
            sleb.remove_blocks(model, removed)
            partial = sleb.SearchResult.from_dict({**result.to_dict(), "removed": removed,
                                                   "steps": result.to_dict()["steps"][:count]})
            sleb.save(model, tok, folder, partial, overwrite=True,
                      report={"source": args.model, "calibration_spec": args.calib, "seed": 0})
            del model
        sources[f"sleb-{round(ratio * 100)}%"] = str(folder)

    names = list(sources)
    for name in list(names):
        for method in methods:
            folder = work / f"{name.replace('%', '')}-{method}"
            report = folder / "sleb_report.json"
            fresh = report.is_file() and report.stat().st_mtime >= Path(sources[name], "config.json").stat().st_mtime
            if not fresh:
                log(f"quantizing {name} to {method} -> {folder}")
                quantize(sources[name], folder, method, dtype="float32", device=args.device, overwrite=True)
            sources[f"{name} {method}"] = str(folder)

    loaded = [("dense", dense, tokenizer)]
    for name, folder in sources.items():
        if name != "dense":
            log(f"loading {folder}")
            model, tok = sleb.load(folder, dtype="float32", device=args.device)
            loaded.append((name, model, tok))

    config = B.BenchConfig(prefill_batch=args.prefill_batch, prefill_len=args.prefill_len, gen_batch=args.gen_batch,
                           gen_prompt=args.gen_prompt, gen_tokens=args.gen_tokens, warmup=args.warmup,
                           repeats=args.repeats)
    log(f"benchmarking {len(loaded)} models in alternation")
    bench = B.bench(loaded, config, progress=log)

    ppl = {}
    for name, model, tok in loaded:
        log(f"perplexity of {name} on gensim-lee")
        ppl[name] = sleb.perplexity(model, tok, "gensim-lee", seqlen=args.ppl_seqlen, max_windows=args.ppl_windows,
                                    progress=False)

    c, info = config, bench.machine
    print(f"{args.model}: SLEB removal order {result.removed} ({args.nsamples} x {args.seqlen} tokens of {args.calib}); "
          f"{info['processor']}, {info['cpu_count']} CPUs, {info['torch_threads']} threads, torch {info['torch']}, "
          f"transformers {info.get('transformers')}, bitsandbytes {info.get('bitsandbytes')}, "
          f"load average {info.get('load_average_1m')} when the benchmark ended")
    print(f"prefill {c.prefill_batch}x{c.prefill_len} tokens, no KV cache; generation batch {c.gen_batch}, prompt "
          f"{c.gen_prompt}, {c.gen_tokens} new tokens, greedy; median of {c.repeats} after {c.warmup} warm-up, "
          f"models in alternation (± half the min-max range); perplexity: gensim-lee, "
          f"{ppl['dense'].windows} x {args.ppl_seqlen} tokens")
    print()
    print("| model | blocks | weights MiB | prefill ms | speedup | ideal | decode tok/s | speedup | ideal "
          "| peak MiB | ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in bench.models:
        peak = max(m.prefill_peak_bytes, m.generation_peak_bytes)
        print(f"| {m.name} | {m.blocks} | {m.weight_bytes / 2**20:.0f} | {m.prefill.median * 1e3:.0f} "
              f"±{m.prefill.spread:.0%} | {m.prefill_speedup:.2f}x | {m.prefill_ideal_speedup:.2f}x "
              f"| {m.generation_tokens_per_s:.1f} ±{m.generation.spread:.0%} | {m.generation_speedup:.2f}x "
              f"| {m.generation_ideal_speedup:.2f}x | {peak / 2**20:.0f} | {ppl[m.name].ppl:.2f} |")
    for m in bench.models:
        if m.quantization is None and m.name != "dense":
            print(f"\n{m.name}: measured/ideal = {m.prefill_speedup / m.prefill_ideal_speedup:.3f} (prefill), "
                  f"{m.generation_speedup / m.generation_ideal_speedup:.3f} (generation)", end="")
    print()
    if args.json:
        data = bench.to_dict()
        data.update(removal_order=result.removed, perplexity={k: v.to_dict() for k, v in ppl.items()},
                    sources=sources)
        Path(args.json).write_text(json.dumps(data, indent=2))
        log(f"wrote {args.json}")
    if any(not math.isfinite(p.ppl) for p in ppl.values()):
        sys.exit("a perplexity is not finite")


if __name__ == "__main__":
    main()

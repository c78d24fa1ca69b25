"""One short GPU check at the Llama-2-7B shape (random bf16 weights): search time and generation speed.

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json        # on one CUDA GPU, ~6-8 minutes
    python benchmarks/gpu_check.py --tiny                            # CPU dry run with tiny shapes (~1 min)

1. Search: `sleb.search` exact vs racing (same windows, same run, alternated) for `--remove`
   blocks on `--nsamples x --seqlen` random token windows. Random weights make every candidate
   nearly alike, so racing drops few of them here: this row times the machinery (batch-by-batch
   walks, the reference's completion) against the exact search, not the gain real weights give.
2. Generation: `sleb.bench` on the dense model and a 20%-pruned copy (7 of 32 blocks removed),
   the paper's generation workload (64 sequences, 64 + 128 tokens), once with the dynamic KV
   cache and once with the static cache (compiled decode step on CUDA), speedups and the ideal.

The model is built from a LlamaConfig (hidden 4096, 32 blocks, 32 heads, MLP 11008, vocab 32000)
straight on the device in bf16; nothing is downloaded. Prints Markdown tables as it goes and
writes everything to --json. Each part can be skipped (--no-search, --no-generation).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import sleb  # noqa: E402
from sleb import bench as B  # noqa: E402
from tiny_models import tiny_tokenizer  # noqa: E402

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=259, max_position_embeddings=256)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(shape: dict, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def search_part(model, args, report: dict) -> None:
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, model.config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    runs = {
        "exact": lambda: sleb.search(model, windows, args.remove, batch_size=args.batch_size, progress=False),
        f"racing (confidence {args.confidence})": lambda: sleb.search(
            model, windows, args.remove, batch_size=args.batch_size, progress=False, racing=True,
            confidence=args.confidence),
    }
    seconds = {name: [] for name in runs}
    results = {}
    for round_ in range(args.rounds):
        for name, run in runs.items():
            log(f"search round {round_ + 1}: {name}")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    exact = results["exact"]
    print(f"\n### Search: {args.nsamples} x {args.seqlen} random tokens, remove {args.remove}, "
          f"batch {args.batch_size}, best of {args.rounds} alternated rounds\n")
    print("| search | seconds (each round) | speedup | removed | same | candidate windows scored |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, result in results.items():
        racing = [s for s in result.steps if s.kinds]
        scored = sum(sum(s.windows.values()) for s in racing) if racing else None
        total = sum(len(s.scores) for s in result.steps) * args.nsamples
        speedup = min(seconds["exact"]) / min(seconds[name])
        print(f"| {name} | {' / '.join(f'{s:.1f}' for s in seconds[name])} | {speedup:.2f}x | {result.removed} | "
              f"{'yes' if result.removed == exact.removed else 'NO'} | "
              f"{'all' if scored is None else f'{scored} of {total}'} |")
        rows.append({"name": name, "seconds": seconds[name], "speedup": speedup, "removed": result.removed,
                     "windows_scored": scored, "windows_exact": total})
    report["search"] = {"nsamples": args.nsamples, "seqlen": args.seqlen, "remove": args.remove, "rows": rows}


def generation_part(model, args, report: dict) -> None:
    tokenizer = tiny_tokenizer(words=model.config.vocab_size - 3)
    pruned = copy.deepcopy(model)
    removed = list(range(1, 1 + args.prune))  # which blocks does not matter for speed: random weights
    sleb.remove_blocks(pruned, removed)
    sizes = B.PAPER_SIZES if not args.tiny else {**B.PAPER_SIZES, "gen_batch": 4, "gen_prompt": 16, "gen_tokens": 16}
    report["generation"] = {}
    for cache in ("dynamic", "static"):
        config = B.BenchConfig(**sizes, prefill=False, cache=cache, warmup=1, repeats=args.repeats)
        log(f"generation, {cache} cache")
        result = B.bench([("dense", model, tokenizer), (f"-{args.prune} blocks", pruned, tokenizer)], config,
                         progress=log)
        print(f"\n### Generation, {cache} cache\n")
        print(B.format_table(result))
        report["generation"][cache] = result.to_dict()
    dyn, sta = (report["generation"][c]["models"] for c in ("dynamic", "static"))
    print("\n| cache | dense tok/s | pruned tok/s | speedup | ideal |")
    print("|---|---|---|---|---|")
    for cache, models in (("dynamic", dyn), ("static", sta)):
        print(f"| {cache} | {models[0]['generation_tokens_per_s']:.0f} | {models[1]['generation_tokens_per_s']:.0f} | "
              f"{models[1]['generation_speedup']:.2f}x | {models[1]['generation_ideal_speedup']:.2f}x |")
    del pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="dry run: tiny shapes, small sizes, CPU unless CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nsamples", type=int, default=24)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--remove", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--confidence", type=float, default=sleb.racing.CONFIDENCE)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--prune", type=int, default=7, help="blocks removed for the generation check (7 of 32 = 20%%)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()
    if args.tiny:
        args.nsamples, args.seqlen, args.batch_size = min(args.nsamples, 12), min(args.seqlen, 32), 2
        args.prune = min(args.prune, 2)
    elif args.device == "cpu":
        sys.exit("the 7B shape needs a CUDA device; use --tiny for a CPU dry run")
    shape, dtype = (TINY, torch.float32) if args.tiny else (SEVEN_B, torch.bfloat16)
    log(f"building a random {'tiny' if args.tiny else 'Llama-2-7B'}-shaped model on {args.device} ({dtype})")
    model = build(shape, args.device, dtype)
    report = {"args": vars(args), "shape": shape, "dtype": str(dtype), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        if not args.no_search:
            search_part(model, args, report)
        if not args.no_generation:
            generation_part(model, args, report)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
            log(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Disk offload (`--offload-dir`) vs in memory: peak resident memory, time and removal order of the same search.

    python benchmarks/offload_memory.py [--model M] [--nsamples 4] [--seqlen 64] [--remove 2] [--cache-mib N]
    python benchmarks/offload_memory.py --build-random DIR [--shape 22,2048,5632]   # then --model DIR

--build-random writes a random-weight Llama-style model (fp32 safetensors, one shard per block, plus
the offline SmolLM2 tokenizer, whose vocabulary sets the embedding size) to DIR, outside the repo, for
measuring where the blocks are most of the memory. It holds one shard in memory at a time, so it
builds models larger than memory too. The default shape is TinyLlama-1.1B's (hidden 2048, MLP
5632, 22 blocks, 32 heads, 4 KV heads, untied head) with SmolLM2's 49152-token vocabulary: 1.17B
parameters, 4.4 GiB.

Each mode runs in its own process (peak RSS is per process: ru_maxrss, which counts resident pages
of memory-mapped files too), loading the offline model in fp32 on the CPU, then searching the same
gensim-wiki windows. With --offload-dir every decoder block stays on disk (the safetensors file is
read in place) and is brought in for each call; the embeddings and the head stay in memory.

The GGUF -> safetensors conversion is cached: run once beforehand (this script loads the model in
a separate process first), so neither mode's peak includes it. Besides the whole-process peak, the
table gives /proc/self/status after loading (RssAnon: heap; RssFile: mapped files, i.e. the
checkpoint pages in use plus ~135 MiB of shared libraries) and the peak above the process's RSS
after `import torch, transformers, sleb` (what the model, the data and the search add). The search's
hidden-state cache (sleb's default: an eighth of the free memory, the same in both modes) is part
of both peaks; --cache-mib pins it. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time, torch
import transformers, sleb
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields

base = status()["VmRSS"]
model, tokenizer = sleb.load(args["model"], dtype="float32", device="cpu", offload_dir=args["offload"])
after_load = status()
windows = sleb.calibration(tokenizer, "gensim-wiki", nsamples=args["nsamples"], seqlen=args["seqlen"], seed=0)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cache = None if args["cache_mib"] is None else args["cache_mib"] << 20
start = time.perf_counter()
result = sleb.search(model, windows, args["remove"], progress=False, cache_bytes=cache)
print(json.dumps({"seconds": time.perf_counter() - start, "removed": result.removed,
                  "scores": [s.scores for s in result.steps], "import_kib": base, "loaded_kib": loaded,
                  "after_load": after_load, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

WARM = "import sys, sleb; sleb.load(sys.argv[1], dtype='float32', device='cpu')"


def build_random(folder: str, shape: str, seed: int = 0) -> None:
    """A random-weight LlamaForCausalLM in `folder`, written shard by shard (one block in memory at a time)."""
    import json
    import os
    from pathlib import Path

    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sleb.loading import peek

    layers, hidden, intermediate = (int(x) for x in shape.split(","))
    target = Path(folder)
    if target.exists() and any(target.iterdir()):
        raise SystemExit(f"{target} exists and is not empty")
    source_config, tokenizer = peek("smollm2-135m")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id, pad_token_id=source_config.pad_token_id, dtype="float32",
    )
    with init_empty_weights():  # shapes and names only: no weights are allocated here
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    # One shard per block, one for the embeddings, one for the final norm and the head.
    groups: dict[str, list[str]] = {}
    for name in shapes:
        if name.startswith("model.layers."):
            key = "layer%05d" % int(name.split(".")[2])
        else:
            key = "embed" if "embed_tokens" in name else "zhead"
        groups.setdefault(key, []).append(name)
    target.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, key in enumerate(sorted(groups), start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in groups[key]:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name])
            else:
                tensors[name] = torch.empty(shapes[name]).normal_(0.0, config.initializer_range, generator=generator)
            weight_map[name] = file
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(target / file), metadata={"format": "pt"})
        del tensors
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"{target}: random-weight Llama, {layers} blocks, hidden {hidden}, MLP {intermediate}, "
          f"vocab {config.vocab_size}: {params / 1e9:.2f}B parameters, {total / 2**30:.2f} GiB fp32 "
          f"({len(groups)} shards); pid {os.getpid()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--remove", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-mib", type=int, default=None,
                        help="hidden-state cache of the search (default: sleb's, an eighth of the free memory)")
    parser.add_argument("--build-random", metavar="DIR",
                        help="write a random-weight Llama-style model to DIR (then measure with --model DIR)")
    parser.add_argument("--shape", default="22,2048,5632", metavar="BLOCKS,HIDDEN,MLP",
                        help="--build-random's shape (32 heads, 4 KV heads; default 22,2048,5632: 1.17B params)")
    args = parser.parse_args()
    if args.build_random:
        build_random(args.build_random, args.shape)
        return
    # The one-time GGUF conversion (and any download) in a process of its own, outside the measurements.
    subprocess.run([sys.executable, "-c", WARM, args.model], check=True, capture_output=True)
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode, offload in (("in memory", None), ("--offload-dir", scratch)):
            settings = {**vars(args), "offload": offload}
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{out.stderr[-2000:]}")
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["in memory"]
    cache = "sleb's default" if args.cache_mib is None else f"{args.cache_mib} MiB"
    print(f"{args.model} fp32 on CPU, exact search of {args.remove} blocks on {args.nsamples} x {args.seqlen} tokens, "
          f"{args.threads} threads, hidden-state cache {cache}; MiB; peak = ru_maxrss of the whole process "
          "(python + torch included); the checkpoint loaded once beforehand (GGUF conversion cached, page cache warm)\n")
    print("| mode | peak RSS | peak above python + torch | python + torch | after load: RssAnon / RssFile | "
          "peak up to calibration | search s | removed | same order | max score diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, row in rows.items():
        diff = max(abs(a[k] - b[k]) for a, b in zip(row["scores"], base["scores"]) for k in a)
        load = row["after_load"]
        print(f"| {mode} | {row['peak_kib'] / 1024:.0f} | {(row['peak_kib'] - row['import_kib']) / 1024:.0f} | "
              f"{row['import_kib'] / 1024:.0f} | {load['RssAnon'] / 1024:.0f} / {load['RssFile'] / 1024:.0f} | "
              f"{row['loaded_kib'] / 1024:.0f} | {row['seconds']:.1f} | {row['removed']} | "
              f"{'yes' if row['removed'] == base['removed'] else 'NO'} | {diff:.1e} |")
    off = rows["--offload-dir"]
    print(f"\npeak RSS offloaded / in memory: {off['peak_kib'] / base['peak_kib']:.2f}; above python + torch: "
          f"{(off['peak_kib'] - off['import_kib']) / (base['peak_kib'] - base['import_kib']):.2f}")


if __name__ == "__main__":
    main()

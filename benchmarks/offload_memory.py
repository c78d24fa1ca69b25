"""Disk offload (`--offload-dir`) vs in memory: peak resident memory, time and removal order of the same search.

    python benchmarks/offload_memory.py [--nsamples 4] [--seqlen 64] [--remove 2] [--cache-mib N]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--remove", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-mib", type=int, default=None,
                        help="hidden-state cache of the search (default: sleb's, an eighth of the free memory)")
    args = parser.parse_args()
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
          "(python + torch included); GGUF conversion cached beforehand\n")
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

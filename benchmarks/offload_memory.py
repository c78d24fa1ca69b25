"""Disk offload (`--offload-dir`) vs in memory: peak resident memory, time and removal order of the same search.

    python benchmarks/offload_memory.py [--nsamples 4] [--seqlen 64] [--remove 2]

Each mode runs in its own process (peak RSS is per process: ru_maxrss), loading the offline model in
fp32 on the CPU, then searching the same gensim-wiki windows. With --offload-dir every decoder block
stays on disk (the safetensors file is read in place) and is brought in for each call; the
embeddings and the head stay in memory. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time, torch
import sleb
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model, tokenizer = sleb.load(args["model"], dtype="float32", device="cpu", offload_dir=args["offload"])
windows = sleb.calibration(tokenizer, "gensim-wiki", nsamples=args["nsamples"], seqlen=args["seqlen"], seed=0)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = sleb.search(model, windows, args["remove"], progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "removed": result.removed,
                  "scores": [s.scores for s in result.steps], "import_kib": base, "loaded_kib": loaded,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--remove", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode, offload in (("in memory", None), ("--offload-dir", scratch)):
            settings = {**vars(args), "offload": offload}
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{out.stderr[-2000:]}")
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["in memory"]
    print(f"{args.model} fp32 on CPU, exact search of {args.remove} blocks on {args.nsamples} x {args.seqlen} tokens, "
          f"{args.threads} threads; peak RSS of the whole process (python + torch included)\n")
    print("| mode | peak RSS MiB | after load MiB | python + torch MiB | search s | removed | same order | "
          "max score diff |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, row in rows.items():
        diff = max(abs(a[k] - b[k]) for a, b in zip(row["scores"], base["scores"]) for k in a)
        print(f"| {mode} | {row['peak_kib'] / 1024:.0f} | {row['loaded_kib'] / 1024:.0f} | "
              f"{row['import_kib'] / 1024:.0f} | {row['seconds']:.1f} | {row['removed']} | "
              f"{'yes' if row['removed'] == base['removed'] else 'NO'} | {diff:.1e} |")
    print(f"\npeak RSS offloaded / in memory: {rows['--offload-dir']['peak_kib'] / base['peak_kib']:.2f}")


if __name__ == "__main__":
    main()

"""`sleb prune` in one process vs under torchrun with N processes: wall time, and the same removal order.

    python benchmarks/torchrun_speed.py --nproc 2                     # the offline model on CPU (gloo)
    python benchmarks/torchrun_speed.py --nproc 8 --model meta-llama/Llama-2-7b-hf --device auto --nsamples 128 --seqlen 2048

Each run is the real command line in a subprocess (model loading included, as a user sees it).
On a CPU machine the processes share the cores (threads per process = cores / N), so expect
little gain there; on GPUs each rank has its own device and scoring is near-linear in ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(nproc: int, args, out: Path) -> tuple[float, dict]:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    command = [sys.executable, *launcher, "-m", "sleb", "prune", args.model, "-o", str(out), "--remove",
               str(args.remove), "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--device", args.device, "--dtype", args.dtype]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{nproc} process(es) failed:\n{proc.stderr[-2000:]}")
    return seconds, json.loads((out / "sleb_report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--remove", type=int, default=2)
    parser.add_argument("--calib", default="gensim-wiki")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(n, *run(n, args, Path(tmp) / f"n{n}")) for n in (1, args.nproc)]
    base = rows[0][1]
    print(f"| processes | wall s (load + search + save) | speedup | search s | removed | world size |")
    print("|---:|---:|---:|---:|---|---:|")
    for n, seconds, report in rows:
        print(f"| {n} | {seconds:.1f} | {base / seconds:.2f}x | {report['search_seconds']:.1f} | {report['removed']} "
              f"| {report['distributed']['world_size']} |")
    same = rows[0][2]["removed"] == rows[1][2]["removed"]
    print(f"\nsame removal order: {same}")


if __name__ == "__main__":
    main()

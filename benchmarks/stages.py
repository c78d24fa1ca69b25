"""Wall time and peak memory of each stage of the pipeline on one model, each stage a command of its own.

    python benchmarks/stages.py MODEL --out DIR [--order RUN] [--remove 6] [--search-remove 9]
                                [--calib gensim-wiki --nsamples 8 --seqlen 64] [--eval-windows 8]
                                [--heal-steps 4] [--stages convert,search,apply,compensate,heal,bench]

Every stage is one `sleb` command (or, for `convert`, the GGUF -> fp32 conversion the first command of a
run does), run in its own process, one after the other; its wall time and the peak resident memory of
that process (`ru_maxrss` from `os.wait4`: the whole command, loading included) are printed in a Markdown
table with the command itself. The stages:

* convert: dequantize MODEL (a .gguf) once into a fresh cache under DIR (`SLEB_CACHE`; every later
  stage reads it);
* search: `sleb prune MODEL -o DIR/search.gguf --remove SEARCH_REMOVE --racing` (skipped with --order,
  whose order is used instead);
* apply: the first --remove removals of that order, GGUF in, GGUF out (kept tensors copied byte for
  byte), with the held-out perplexity of dense and pruned (--eval);
* compensate: the same with `--compensate linear` (a folder: the compensated weights are new);
* heal: the same with `--compensate linear --heal` (LoRA, batch 1, --heal-seqlen 256, --heal-steps);
* bench: `sleb bench --runtime llama.cpp MODEL DIR/apply.gguf` (needs the llama.cpp runtime).

Run it on an otherwise idle machine for the times; the memory figures do not depend on the load.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("convert", "search", "apply", "compensate", "heal", "bench")
CONVERT = "import sys; from sleb.loading import local_checkpoint; print(local_checkpoint(sys.argv[1]))"


def commands(args) -> dict[str, list[str]]:
    sleb = [sys.executable, "-m", "sleb"]
    out = args.out
    order = args.order or str(out / "search.gguf")
    calib = ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    held_out = ["--eval", args.eval, "--eval-windows", str(args.eval_windows)]
    apply = [*sleb, "prune", args.model, "--from-report", order, "--remove", str(args.remove), *calib]
    return {
        "convert": [sys.executable, "-c", CONVERT, args.model],
        "search": [*sleb, "prune", args.model, "-o", str(out / "search.gguf"), "--remove", str(args.search_remove),
                   "--racing", *calib, "--batch-size", "4"],
        "apply": [*apply, "-o", str(out / "apply.gguf"), *held_out],
        "compensate": [*apply, "-o", str(out / "compensate"), "--compensate", "linear", *held_out],
        "heal": [*apply, "-o", str(out / "heal"), "--compensate", "linear", "--heal", "--heal-steps",
                 str(args.heal_steps), "--heal-seqlen", "256", "--heal-batch-size", "1", "--heal-windows", "8",
                 "--heal-heldout-windows", "2", "--heal-eval-every", str(args.heal_steps), *held_out],
        "bench": [*sleb, "bench", "--runtime", "llama.cpp", args.model, str(out / "apply.gguf"), "--repeats", "3",
                  "--json", str(out / "bench.json")],
    }


def run_stage(name: str, argv: list[str], log: Path, env: dict) -> tuple[float, float, int]:
    """(seconds, peak RSS in GiB, exit status) of one command, its output in `log`."""
    start = time.perf_counter()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 2**20, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--order", help="an earlier run (folder, .gguf or its run file): skip the search")
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--search-remove", type=int, default=9)
    parser.add_argument("--calib", default="gensim-wiki")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--eval", default="gensim-wiki")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--heal-steps", type=int, default=4)
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args()
    wanted = args.stages.split(",")
    if unknown := sorted(set(wanted) - set(STAGES)):
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    if args.order and "search" in wanted:
        wanted.remove("search")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLEB_CACHE": str(args.out / "cache")}
    argvs = commands(args)
    print(f"{args.model}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the start\n")
    print("| stage | wall | peak RSS (GiB) | load avg after | command |\n|---|---:|---:|---:|---|")
    for name in (s for s in STAGES if s in wanted):
        argv = argvs[name]
        seconds, gib, status = run_stage(name, argv, args.out / f"{name}.log", env)
        shown = shlex.join(["sleb", *argv[3:]] if argv[1:3] == ["-m", "sleb"] else ["python", *argv[1:]])
        print(f"| {name} | {seconds / 60:.1f} min | {gib:.2f} | {os.getloadavg()[0]:.2f} | `{shown}` |", flush=True)
        if status != 0:
            raise SystemExit(f"stage {name} failed (exit {status}); its log: {args.out / f'{name}.log'}")


if __name__ == "__main__":
    main()

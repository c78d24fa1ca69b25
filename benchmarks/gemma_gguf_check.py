"""A pruned Gemma-2/3 GGUF checked against its source: layer pattern, llama.cpp, perplexity (issue #31).

    python benchmarks/gemma_gguf_check.py SOURCE.gguf PRUNED.gguf [--length 1024] [--windows 4]

PRUNED.gguf is a `sleb prune SOURCE.gguf -o PRUNED.gguf ...` output (its run file beside it names
the removed blocks). Prints the source's layer pattern as llama.cpp reads it, the pattern written
into PRUNED.gguf, and perplexity on WINDOWS windows of LENGTH tokens (BOS first) of gensim-wiki's
test split: in transformers for the dense model, the dense model with the same blocks skipped, and
the pruned file reloaded (plainly, and with its layer types set from the file's pattern); in
llama.cpp (`llama_runtime/perplexity.mjs`, needs `make llama-runtime`) for both files. Use windows
longer than the sliding window (Gemma-3: 512) so that sliding and global layers differ.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
from pathlib import Path

import gguf
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import sleb
from sleb.data import documents
from sleb.gguf_io.reader import block_count, swa_pattern, swa_pattern_key
from sleb.runfile import report_path

RUNTIME = Path(__file__).parents[1] / "llama_runtime"


def hf_perplexity(model, windows) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            nll += model(x, labels=x).loss.item() * (len(w) - 1)
            n += len(w) - 1
    return math.exp(nll / n)


def llama_cpp_perplexity(path: Path, windows_file: Path) -> dict:
    proc = subprocess.run(["node", "perplexity.mjs", str(path), str(windows_file)], cwd=RUNTIME,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("pruned", type=Path)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)

    removed = json.loads(report_path(args.pruned).read_text())["removed"]
    arch, n = block_count(gguf.GGUFReader(args.source))
    kept = [i for i in range(n) if i not in removed]
    source_pattern = swa_pattern(gguf.GGUFReader(args.source), arch, n)
    written = [bool(v) for v in gguf.GGUFReader(args.pruned).fields[swa_pattern_key(arch)].contents()]
    print(f"removed {removed}; kept {kept}")
    print("source pattern as llama.cpp reads it:", [int(v) for v in source_pattern])
    print("written pattern:", [int(v) for v in written], "| the kept source entries:",
          written == [source_pattern[i] for i in kept])

    folder = args.source.parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=args.source.name)
    docs, joiner = documents("gensim-wiki", "test")
    ids = tokenizer(joiner.join(docs), add_special_tokens=False)["input_ids"]
    step = args.length - 1
    windows = [[tokenizer.bos_token_id] + ids[k * step:(k + 1) * step] for k in range(args.windows)]
    print(f"{args.windows} windows of {args.length} tokens (BOS + {step}) from gensim-wiki's test split")

    results = {}
    dense = AutoModelForCausalLM.from_pretrained(folder, gguf_file=args.source.name, dtype=torch.float32).eval()
    results["transformers, dense"] = hf_perplexity(dense, windows)
    sleb.remove_blocks(dense, removed)
    results["transformers, dense with the blocks skipped"] = hf_perplexity(dense, windows)
    del dense
    plain = AutoModelForCausalLM.from_pretrained(args.pruned.parent, gguf_file=args.pruned.name,
                                                 dtype=torch.float32).eval()
    print("transformers' plain reload of the pruned file, layer types:",
          [int(t == "sliding_attention") for t in plain.config.layer_types])
    results["transformers, pruned file, plain reload"] = hf_perplexity(plain, windows)
    del plain
    config = AutoConfig.from_pretrained(args.pruned.parent, gguf_file=args.pruned.name)
    config.layer_types = ["sliding_attention" if s else "full_attention" for s in written]
    fixed = AutoModelForCausalLM.from_pretrained(args.pruned.parent, gguf_file=args.pruned.name, config=config,
                                                 dtype=torch.float32).eval()
    results["transformers, pruned file, layer types from the file"] = hf_perplexity(fixed, windows)
    del fixed
    with tempfile.TemporaryDirectory() as tmp:
        windows_file = Path(tmp) / "windows.json"
        windows_file.write_text(json.dumps(windows))
        for label, path in [("llama.cpp, dense file", args.source), ("llama.cpp, pruned file", args.pruned)]:
            ran = llama_cpp_perplexity(path.resolve(), windows_file)
            results[label] = ran["perplexity"]
            results["llama.cpp release"] = ran["llama_cpp"]["release"]
    for label, value in results.items():
        print(f"{label}: {value if isinstance(value, str) else round(value, 3)}")


if __name__ == "__main__":
    main()

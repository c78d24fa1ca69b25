"""Block SLEB against the speed-aware unit search at the same measured speed, plain and healed (#32).

    python benchmarks/speed_aware.py MODEL --out DIR [--remove 6] [--speed-at generation:1024,prefill:1024]
                                     [--units sublayer,attention] [--calib gensim-wiki --nsamples 16 --seqlen 64]
                                     [--eval gensim-wiki,gensim-lee --eval-seqlen 256 --eval-windows 16]
                                     [--heal-minutes 10] [--refine-seconds 300]

For each shape of --speed-at, every step a command of its own (`sleb prune`, `sleb bench`, `sleb eval`):

1. block SLEB removes --remove blocks (once, for every shape): DIR/block;
2. `sleb bench MODEL DIR/block` at the shape (`generation:N`: 32 new tokens after N, batch 1, compared by
   decode tokens/s; `prefill:N`: one N-token pass) gives block SLEB's measured speedup S;
3. for each unit kind, `sleb prune --unit U --unit-score per-second --target-speedup S --speed-at SHAPE`:
   DIR/TAG/U (TAG: the shape with ':' as '-');
4. `sleb bench` of the dense model, block SLEB and every unit result, in alternation, at the shape;
5. `sleb eval` of them all on the --eval texts' test parts (--eval-windows x --eval-seqlen tokens);
6. with --heal-minutes: each result again with `--from-report ... --heal lora --heal-minutes M`, and its eval.

A step whose output exists is not run again (delete it to redo), so an interrupted run goes on. Then it prints
one Markdown table per shape: measured speedup (± the two models' spreads) and held-out perplexity, each
unit result's perplexity change against block SLEB's. Run on an otherwise idle machine: the unit searches
time the dense model first (their cost model), and the benches are timings.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

BENCH_TOKENS = ["--prefill-batch", "1", "--gen-batch", "1", "--gen-tokens", "32"]


def run(argv: list[str], log: Path) -> None:
    """Run one step, its output in `log`; stop the whole benchmark if it fails."""
    print("$ " + shlex.join(argv), flush=True)
    with open(log, "w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}); see {log}")


def bench_shape(speed_at: str) -> tuple[str, list[str]]:
    """The bench's figure for a shape and its flags."""
    mode, tokens = speed_at.split(":")
    if mode == "prefill":
        return "prefill", ["--prefill-len", tokens, "--no-generation", *BENCH_TOKENS]
    return "decode", ["--gen-prompt", tokens, "--no-prefill", *BENCH_TOKENS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--speed-at", default="generation:1024")
    parser.add_argument("--units", default="sublayer,attention")
    parser.add_argument("--calib", default="gensim-wiki")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval", default="gensim-wiki,gensim-lee")
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--refine-seconds", type=float, default=300.0)
    parser.add_argument("--heal-minutes", type=float)
    args = parser.parse_args()

    sleb = [sys.executable, "-m", "sleb"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    calib = ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
             "--batch-size", str(args.batch_size)]
    units = [u for u in args.units.split(",") if u]
    remote = ["--trust-remote-code"]  # the unit results are DeciLM folders (sleb wrote them here)
    evaluate = ["--ppl", args.eval, "--seqlen", str(args.eval_seqlen), "--max-windows", str(args.eval_windows),
                "--batch-size", "4"]
    heal = ["--heal", "lora", "--heal-minutes", str(args.heal_minutes), "--heal-seqlen", str(args.eval_seqlen)]

    block = out / "block"
    if not block.exists():
        run([*sleb, "prune", args.model, "-o", str(block), "--remove", str(args.remove), *calib], out / "block.log")
    if args.heal_minutes and not (out / "block-heal").exists():
        run([*sleb, "prune", args.model, "-o", str(out / "block-heal"), "--from-report", str(block),
             "--remove", str(args.remove), *calib, *heal], out / "block-heal.log")

    for speed_at in args.speed_at.split(","):
        tag = speed_at.replace(":", "-")
        shape_dir = out / tag
        shape_dir.mkdir(exist_ok=True)
        figure, flags = bench_shape(speed_at)
        first = shape_dir / "bench-block.json"
        if not first.exists():
            run([*sleb, "bench", args.model, str(block), *flags, "--json", str(first)], shape_dir / "bench-block.log")
        target = round(json.loads(first.read_text())["models"][1][f"{figure}_speedup"], 3)
        print(f"{speed_at}: block SLEB's measured {figure} speedup {target}x is the units' target", flush=True)
        folders = {}
        for unit in units:
            folder = shape_dir / unit
            folders[unit] = folder
            if not folder.exists():
                run([*sleb, "prune", args.model, "-o", str(folder), "--unit", unit, "--unit-score", "per-second",
                     "--target-speedup", str(target), "--speed-at", speed_at, "--refine-seconds",
                     str(args.refine_seconds), *calib], shape_dir / f"{unit}.log")
            if args.heal_minutes and not (shape_dir / f"{unit}-heal").exists():
                count = len(json.loads((folder / "sleb_report.json").read_text())["removed_units"])
                run([*sleb, "prune", args.model, "-o", str(shape_dir / f"{unit}-heal"), "--from-report", str(folder),
                     "--unit", unit, "--remove", str(count), *calib, *heal], shape_dir / f"{unit}-heal.log")
        models = [args.model, str(block), *map(str, folders.values())]
        bench_json = shape_dir / "bench.json"
        if not bench_json.exists():
            run([*sleb, "bench", *models, *remote, *flags, "--json", str(bench_json)], shape_dir / "bench.log")
        evals = {"plain": (shape_dir / "eval.json", models)}
        if args.heal_minutes:
            evals["healed"] = (shape_dir / "eval-heal.json",
                               [args.model, str(out / "block-heal"), *(f"{f}-heal" for f in folders.values())])
        for kind, (path, named) in evals.items():
            if not path.exists():
                run([*sleb, "eval", *named, *remote, *evaluate, "--json", str(path)], path.with_suffix(".log"))
        print(table(speed_at, figure, json.loads(bench_json.read_text()),
                    {k: json.loads(p.read_text()) for k, (p, _) in evals.items()}, units))


def _ppl(evaluation: dict) -> list[dict[str, float]]:
    """Per model (in order), perplexity by text spec from a `sleb eval --json` file."""
    return [{spec: value["ppl"] for spec, value in row["perplexity"].items()} for row in evaluation["models"]]


def table(speed_at: str, figure: str, bench: dict, evals: dict[str, dict], units: list[str]) -> str:
    names = ["dense", "block SLEB", *(f"{u} per-second" for u in units)]
    specs = list(_ppl(evals["plain"])[0])
    head = ["model", f"{figure} speedup", *(f"{kind} {spec}" for kind in evals for spec in specs)]
    lines = [f"### {speed_at}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = bench["models"][0][figure]
    ppls = {kind: _ppl(e) for kind, e in evals.items()}
    for i, name in enumerate(names):
        m = bench["models"][i]
        row = [name, f"{m[f'{figure}_speedup']:.2f}x ±{dense['spread'] + m[figure]['spread']:.0%}"]
        for kind in evals:
            for spec in specs:
                value, block = ppls[kind][i][spec], ppls[kind][1][spec]
                row.append(f"{value:.2f}" + (f" ({value / block - 1:+.1%})" if i >= 2 else ""))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("(±: the two models' spreads added; brackets: against block SLEB's perplexity)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

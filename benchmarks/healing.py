"""Healing on the offline model: plain SLEB vs --compensate linear vs --heal with each parameter set.

    python benchmarks/healing.py --order RUN_DIR [--remove 6] [--minutes 10] [--sets neighbours,lora,tail,maps]
                                 [--seqlen 256] [--eval-windows 16] [--cloze 200] [--out DIR]

`--order` is a `sleb prune` output on the offline model (e.g. `make demo`'s runs/smollm2-sleb): its
first `--remove` removals are applied (`sleb prune --from-report`), then each variant is made by
`sleb.prune` exactly as the command line makes it (calibration text gensim-wiki, train part):
plain, `--compensate linear` and `--heal SET --heal-minutes M` for each set (`maps` with
`--compensate linear`, whose maps it trains). A set may be written `SET+linear` (heal after
`--compensate linear`) and `SET@LR` (`--heal-lr LR`), e.g. `lora+linear@2e-3`. Every saved model is reloaded and scored on the first
`--eval-windows` windows of `--seqlen` tokens of the test parts of gensim-wiki and gensim-lee
(never trained or calibrated on) and, with `--cloze N`, on benchmarks/compensate.py's local 4-way
next-words task. Prints a Markdown table; run it on an otherwise idle machine, since the heal
budget is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import sleb
from sleb.config import Budget, Calibration, Compensation, Healing, PruneConfig

sys.path.insert(0, str(Path(__file__).parent))
from compensate import CLOZE_TASK, write_cloze_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", required=True, help="a sleb prune output folder on smollm2-135m")
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=10.0, help="--heal-minutes of each healed variant")
    parser.add_argument("--sets", default="neighbours,lora,tail,maps")
    parser.add_argument("--windows", type=int, default=Healing.windows, help="--heal-windows")
    parser.add_argument("--seqlen", type=int, default=256, help="calibration, healing and evaluation window length")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows of the compensation fit")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--cloze", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/healing"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# load average at start: {os.getloadavg()}", file=sys.stderr)

    def variant(name: str, compensation: str | None = None, heal: str | None = None, lr: float | None = None) -> Path:
        out = args.out / name
        config = PruneConfig("smollm2-135m", str(out), Budget(remove=args.remove), from_report=args.order,
                             calibration=Calibration("gensim-wiki", nsamples=args.nsamples, seqlen=args.seqlen),
                             compensation=Compensation(compensation),
                             heal=Healing(heal, minutes=args.minutes, windows=args.windows, lr=lr) if heal else Healing(),
                             dtype="float32", device="cpu", overwrite=True)
        started = time.perf_counter()
        sleb.prune(config, log=lambda line: print(line, file=sys.stderr))
        print(f"# {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return out

    rows = [("dense", "smollm2-135m"), ("SLEB", variant("plain")), ("SLEB + linear", variant("linear", "linear"))]
    for spec in args.sets.split(","):
        spec, _, lr = spec.partition("@")
        name, _, extra = spec.partition("+")
        linear = name == "maps" or extra == "linear"
        label = f"SLEB + heal {name}" + (" (+ linear)" if linear else "") + (f" lr {lr}" if lr else "")
        rows.append((label, variant(f"heal-{spec.replace('+', '-')}{'-' + lr if lr else ''}",
                                    "linear" if linear else None, name, float(lr) if lr else None)))

    specs = ["gensim-wiki", "gensim-lee"]
    task = write_cloze_task(args.out / "task", args.cloze) if args.cloze else None
    table = []
    for label, path in rows:
        model, tokenizer = sleb.load(str(path), dtype="float32", device="cpu")
        row = {"model": label}
        row["ppl"] = {s: sleb.perplexity(model, tokenizer, s, args.seqlen, max_windows=args.eval_windows,
                                         progress=False).ppl for s in specs}
        if task is not None:
            row["cloze_acc"] = sleb.zero_shot(model, tokenizer, [CLOZE_TASK], include_path=task)[CLOZE_TASK].accuracy
        run_file = Path(path) / "sleb_report.json"
        row["healing"] = json.loads(run_file.read_text()).get("healing") if run_file.is_file() else None
        table.append(row)
        print(f"# {label}: {row['ppl']}", file=sys.stderr)
    (args.out / "healing.json").write_text(json.dumps(table, indent=2))

    plain = table[1]["ppl"]
    print(f"| model | {' | '.join(f'{s} ppl (vs SLEB)' for s in specs)} | cloze acc | trained params | steps | "
          "heal s |")
    print("|---|" + "---:|" * (len(specs) + 4))
    for row in table:
        cells = [f"{row['ppl'][s]:.2f} ({100 * (row['ppl'][s] / plain[s] - 1):+.1f}%)" for s in specs]
        acc = f"{100 * row['cloze_acc']:.1f}%" if "cloze_acc" in row else "-"
        h = row["healing"] or {}
        print(f"| {row['model']} | {' | '.join(cells)} | {acc} | {h.get('trained_parameters', 0):,} | "
              f"{h.get('steps', '-')} | {h.get('seconds', 0):.0f} |")
    print(f"# load average at end: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()

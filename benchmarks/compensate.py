"""Linear compensation on the offline model: plain SLEB vs + linear vs + linear-cosine vs compensation-aware.

    python benchmarks/compensate.py [--nsamples 16] [--seqlen 256] [--ratios 0.1,0.2,0.3] [--eval-windows 32]
                                    [--order FILE] [--aware-ratios 0.2] [--aware-order FILE] [--out DIR]

One SLEB search on gensim-wiki calibration windows (train part, seed 0) for the largest ratio; its
order's prefixes give the smaller ratios (greedy SLEB is nested). `--order` reuses a search: a
`sleb_report.json` or a `sleb prune --checkpoint` file made on the same windows (the checkpoint of
an unfinished search is fine as long as it covers the counts asked for). Compensation-aware search
(`sleb.compensated_search.aware_search`, least squares, top 3) runs once for the largest
`--aware-ratios` count, reusing the plain search's scores while the sets agree; its prefixes give
the smaller ones.
Every model is scored on the calibration windows and on the first `--eval-windows` windows of the
test parts of gensim-wiki and gensim-lee (never calibrated on), and for zero-shot accuracy through
lm-eval on a local task built here from the gensim-lee test part (`--cloze N` questions; 0: none):
a news passage of 24 words, and the choice between its true next 6 words and 3 spans of 6 words
from other test articles (chance: 25%). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

import sleb
from sleb.arch import BlockRunner, find_blocks
from sleb.units import pruned_view
from sleb.runfile import result_from_run
from sleb import Budget, Compensation, SearchOptions
from sleb.compensate import compensate
from sleb.compensated_search import aware_search
from sleb.data import token_sha256
from sleb.scoring import variant_losses
from sleb.search import SearchResult


def load_order(path: Path, windows: torch.Tensor) -> SearchResult:
    data = json.loads(path.read_text())
    result = result_from_run(data) if "format" in data else SearchResult.from_dict(data)
    if result.calibration_sha256 and result.calibration_sha256 != token_sha256(windows):
        raise SystemExit(f"{path} was searched on other calibration windows")
    return result


CLOZE_TASK = "sleb_lee_cloze"
def write_cloze_task(folder: Path, questions: int, seed: int = 0) -> Path:
    """A 4-way next-words task from the gensim-lee test part (held out from every calibration), as lm-eval YAML."""
    from sleb.data import documents
    from sleb.evaluate import write_local_task

    docs, _ = documents("gensim-lee", "test")
    words = [d.split() for d in docs if len(d.split()) >= 40]
    rng = random.Random(seed)
    rows = []
    for i in range(questions):
        doc = i % len(words)
        start = rng.randrange(0, len(words[doc]) - 30)
        context, truth = words[doc][start:start + 24], words[doc][start + 24:start + 30]
        others = [d for d in range(len(words)) if d != doc]
        spans = []
        for other in rng.sample(others, 3):
            at = rng.randrange(0, len(words[other]) - 6)
            spans.append(" ".join(words[other][at:at + 6]))
        answer = rng.randrange(4)
        spans.insert(answer, " ".join(truth))
        rows.append({"question": " ".join(context), "choices": spans, "answer": answer})
    return write_local_task(folder, CLOZE_TASK, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="gensim-wiki")
    parser.add_argument("--eval", default="gensim-wiki,gensim-lee")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--search-nsamples", type=int,
                        help="windows for the searches (default --nsamples; fewer to save CPU: compensation still "
                             "fits on --nsamples)")
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--aware-ratios", default="0.1,0.2,0.3", help="empty: no compensation-aware rows")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--order", type=Path, help="reuse this plain SLEB search (report or checkpoint JSON)")
    parser.add_argument("--sets", help="instead of searching: plain SLEB sets found earlier, ';'-separated "
                                       "comma lists (e.g. 14,17,16;3,12,13); --ratios is then ignored")
    parser.add_argument("--aware-order", type=Path, help="reuse this compensation-aware search (JSON written here)")
    parser.add_argument("--skip-dense", action="store_true", help="no dense row")
    parser.add_argument("--aware-only", action="store_true", help="only the compensation-aware rows")
    parser.add_argument("--cloze", type=int, default=200, help="questions of the local zero-shot task (0: none)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compensate"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    specs = args.eval.split(",")

    model, tokenizer = sleb.load(args.model, dtype="float32", device="cpu")
    windows = sleb.calibration(tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    search_windows = windows
    if args.search_nsamples and args.search_nsamples != args.nsamples:
        search_windows = sleb.calibration(tokenizer, args.calib, nsamples=args.search_nsamples, seqlen=args.seqlen,
                                          seed=0)
    n = len(find_blocks(model).modules)
    counts = [Budget(ratio=float(r)).count(n) for r in args.ratios.split(",")]
    aware_counts = [Budget(ratio=float(r)).count(n) for r in args.aware_ratios.split(",") if r.strip()]

    plain: SearchResult | None = None
    given = [[int(b) for b in part.split(",")] for part in (args.sets or "").split(";") if part.strip()]
    if given:
        counts = [len(s) for s in given]
    elif args.order:
        plain = load_order(args.order, search_windows)
    else:
        started = time.perf_counter()
        plain = sleb.search(model, search_windows, max(counts), batch_size=args.batch_size)
        print(f"SLEB search for {max(counts)} blocks: {time.perf_counter() - started:.0f} s")
        (args.out / "sleb_order.json").write_text(json.dumps(plain.to_dict()))
    if plain is not None and len(plain.removed) < max(counts):
        raise SystemExit(f"the plain search records {len(plain.removed)} removals; {max(counts)} needed")

    aware = None
    if aware_counts:
        if args.aware_order:
            aware = load_order(args.aware_order, search_windows)
        else:
            path = args.out / "aware_order.json"
            if plain is None:
                raise SystemExit("compensation-aware rows need --order or a search (not --sets): give --aware-order")
            aware = aware_search(model, search_windows, max(aware_counts),
                                 compensation=Compensation("linear", aware=True, top_k=args.top_k),
                                 options=SearchOptions(batch_size=args.batch_size), plain=plain,
                                 on_step=lambda r: path.write_text(json.dumps(r.to_dict())))
            print(f"compensation-aware search for {max(aware_counts)} blocks: {aware.seconds:.0f} s")

    snapshot = {k: v.clone() for k, v in model.state_dict().items()}

    def heldout(removed: list[int]) -> dict[str, float]:
        with pruned_view(model, removed):
            return {s: sleb.perplexity(model, tokenizer, s, args.seqlen, batch_size=args.batch_size,
                                       max_windows=args.eval_windows, progress=False).ppl for s in specs}

    task_folder = write_cloze_task(args.out / "task", args.cloze) if args.cloze else None

    def accuracy(removed: list[int]) -> dict[str, float]:
        if task_folder is None:
            return {}
        from sleb.evaluate import zero_shot

        with pruned_view(model, removed):
            result = zero_shot(model, tokenizer, [CLOZE_TASK], batch_size=args.batch_size, include_path=task_folder)
        return {"cloze_acc": result[CLOZE_TASK].accuracy}

    def calibration_ppl(removed: list[int]) -> float:
        kept = [b for b in range(n) if b not in set(removed)]
        loss = variant_losses(BlockRunner(model), windows, [kept], batch_size=args.batch_size)[0].item()
        return math.exp(loss / len(windows))

    rows = [] if args.skip_dense else [{"method": "dense", "removed": [], "calibration_ppl": calibration_ppl([]),
                                        **heldout([]), **accuracy([])}]
    print(rows[-1:], flush=True)

    def add(method: str, search: SearchResult | list[int], k: int, objective: str | None) -> None:
        removed = search[:k] if isinstance(search, list) else search.removed[:k]
        row = {"method": method, "removed": removed, "blocks": k}
        same = search_windows is windows and isinstance(search, SearchResult)
        if objective is None:
            row["calibration_ppl"] = search.calibration_ppl(k) if same else calibration_ppl(removed)
        else:
            comp = compensate(model, windows, removed, objective=objective, batch_size=args.batch_size,
                              calibration_ppl_plain=search.calibration_ppl(k) if same else None,
                              progress=False)
            row.update(calibration_ppl=comp.calibration_ppl, fit_seconds=sum(r.seconds for r in comp.runs),
                       runs=[{"blocks": r.blocks, "fold": r.fold_block, "residual": [r.residual_before, r.residual_after],
                              "cosine": [r.cosine_before, r.cosine_after]} for r in comp.runs])
        row.update(heldout(removed))
        row.update(accuracy(removed))
        model.load_state_dict(snapshot)
        rows.append(row)
        print(row, flush=True)
        (args.out / "compensate.json").write_text(json.dumps(rows, indent=1))

    for i, k in enumerate(counts):
        source = given[i] if given else plain
        if not args.aware_only:
            add("SLEB", source, k, None)
            add("SLEB + linear", source, k, "linear")
            add("SLEB + linear-cosine", source, k, "linear-cosine")
        if aware is not None and k in aware_counts and len(aware.removed) >= k:
            add("aware + linear", aware, k, "linear")
            add("aware + linear-cosine", aware, k, "linear-cosine")

    print(f"\n{args.model}: compensation fitted on {args.nsamples} x {args.seqlen} calibration tokens of {args.calib} "
          f"(seed 0), searches on {len(search_windows)} x {args.seqlen}; calib ppl on the {args.nsamples} windows; "
          f"held-out: first {args.eval_windows} windows of {args.seqlen} tokens of the test parts of "
          f"{', '.join(specs)}\n")
    cloze = " cloze acc |" if task_folder else ""
    print("| blocks removed | method | removed | calib ppl | " + " | ".join(f"{s} ppl (vs SLEB)" for s in specs)
          + f" |{cloze} fit s |")
    print("|---|---|---|---|" + "---|" * len(specs) + ("---|" if cloze else "") + "---|")
    base: dict = {}
    for row in rows:
        k = row.get("blocks", 0)
        if row["method"] in ("SLEB", "dense"):
            base = row
        cells = []
        for s in specs:
            change = "" if row is base else f" ({100 * (row[s] / base[s] - 1):+.1f}%)"
            cells.append(f"{row[s]:.2f}{change}")
        fit = f"{row['fit_seconds']:.0f}" if "fit_seconds" in row else ""
        acc = f" {100 * row['cloze_acc']:.1f}% |" if "cloze_acc" in row else (" |" if cloze else "")
        print(f"| {k} | {row['method']} | {sorted(row['removed'])} | {row['calibration_ppl']:.2f} | "
              + " | ".join(cells) + f" |{acc} {fit} |")
    print(f"\nrows with per-run residuals in {args.out / 'compensate.json'}")


if __name__ == "__main__":
    main()

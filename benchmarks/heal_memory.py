"""Peak memory of `sleb prune --heal` with and without gradient checkpointing, against docs/healing.md's formula.

    python benchmarks/heal_memory.py --order RUN_DIR [--seqlens 256,512] [--batches 1,4] [--steps 2]

RUN_DIR is an earlier `sleb prune smollm2-135m ... --remove 6` run (its order is applied with
--from-report, as the command line does). Each setting runs `sleb.prune` in its own process (fp32 on the
CPU, LoRA, 6 blocks removed, `--heal-steps` steps, 8 training and 2 held-out windows of gensim-wiki) and
reports, in MiB:

* `at heal`: the process's RSS when the heal starts (python, torch, the pruned model, the teacher's targets);
* `heal peak`: the peak RSS during the heal (VmHWM, reset through /proc/self/clear_refs when it starts);
* `heal adds`: their difference, and `formula`, docs/healing.md's prediction of it (`error`: how far off);
* `process peak`: ru_maxrss of the whole command (loading the GGUF included);
* `a`: the bytes one block keeps for the backward pass per token (counted with saved-tensor hooks on a
  block of the pruned model at that sequence length), the formula's activation term.

Prints a Markdown table. The GGUF -> safetensors conversion is cached beforehand, in a process of its own.
Run it again with MALLOC_MMAP_THRESHOLD_=131072 in the environment to see glibc's share of the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, torch
import sleb, sleb.heal
from sleb.config import PruneConfig
from sleb.settings import Budget, Calibration, Healing
from sleb.arch import find_blocks

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

seen = {}
real_heal = sleb.heal.heal

def measured_heal(model, train, *rest, **kw):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    seen["start_kib"] = kib("VmRSS")
    record = real_heal(model, train, *rest, **kw)
    seen["peak_kib"] = kib("VmHWM")
    seen["trained"] = record.trained_parameters
    seen["first_trained"] = min(kw["near"]) if kw.get("near") else 0
    # What one (untrained) block keeps for the backward pass per token, its input needing a gradient.
    block = find_blocks(model).modules[-1]
    # Unique storages only, and not the weights (a linear layer saves its weight, which is no new memory).
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}
    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    ids = train[:1]
    from sleb.arch import BlockRunner
    runner = BlockRunner(model)
    hidden = runner.embed(ids).detach().requires_grad_(True)
    call = runner._record(ids)[len(runner.blocks.modules) - 1]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(hidden, *call.args, **call.kwargs)
    seen["a_bytes"] = sum(storages.values()) / ids.shape[1]
    seen["blocks"] = len(find_blocks(model).modules)
    cfg = sleb.arch.text_config(model)
    seen.update(hidden=cfg.hidden_size, vocab=cfg.vocab_size)
    return record

sleb.heal.heal = measured_heal
config = PruneConfig(args["model"], args["out"], Budget(remove=6), from_report=args["order"],
                     calibration=Calibration("gensim-wiki", 2, 64), dtype="float32", device="cpu",
                     heal=Healing("lora", steps=args["steps"], windows=8, heldout_windows=2, seqlen=args["seqlen"],
                                  batch_size=args["batch"], eval_every=1000, checkpointing=args["checkpointing"]))
sleb.prune(config, progress=False)
seen["process_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(seen))
"""

WARM = "import sys, sleb; sleb.load(sys.argv[1], dtype='float32', device='cpu')"


# A chunk of the loss holds about 5 chunk-sized float32 tensors at its peak (logits, log-softmax, their
# gradients, the gather's scatter). glibc's heap holds about 1.6x the bytes autograd saves with its default,
# dynamic mmap threshold (the forward's freed temporaries stay as holes between saved tensors); with
# MALLOC_MMAP_THRESHOLD_ fixed, large tensors are mapped and unmapped and the heap holds what is live
# (docs/healing.md).
CHUNK_COPIES = 5


def heap_overhead() -> float:
    return 1.0 if "MALLOC_MMAP_THRESHOLD_" in os.environ else 1.6


def formula_bytes(row: dict, seqlen: int, batch: int, checkpointing: bool, overhead: float, chunk: int = 256) -> float:
    """docs/healing.md's heal memory above the RSS at the heal's start (fp32, CPU)."""
    tokens = batch * seqlen
    path = row["blocks"] - row["first_trained"]  # blocks the gradient passes through
    trained = 20 * row["trained"]  # weights, gradients, AdamW's two moments, the best state's copy
    if checkpointing:
        activations = path * tokens * row["hidden"] * 4 + tokens * row["a_bytes"]
    else:
        activations = path * tokens * row["a_bytes"]
    head = 4 * tokens * row["hidden"] * 4 + CHUNK_COPIES * min(chunk, tokens) * row["vocab"] * 4
    return trained + overhead * activations + head


def print_row(row: dict, overhead: float) -> None:
    adds = (row["peak_kib"] - row["start_kib"]) / 1024
    predicted = formula_bytes(row, row["seqlen"], row["batch"], row["checkpointing"], overhead) / 2**20
    print(f"| {row['seqlen']} | {row['batch']} | {'on' if row['checkpointing'] else 'off'} | "
          f"{row['start_kib'] / 1024:.0f} | {row['peak_kib'] / 1024:.0f} | {adds:.0f} | {predicted:.0f} | "
          f"{(adds - predicted) / predicted:+.0%} | {row['process_kib'] / 1024:.0f} | {row['a_bytes'] / 1024:.1f} |",
          flush=True)


HEADER = ("| seqlen | batch | checkpointing | at heal | heal peak | heal adds | formula | error | process peak | "
          "a (KiB/token/block) |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--order", required=True, help="an earlier run folder (or its sleb_report.json)")
    parser.add_argument("--seqlens", default="256,512")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reprint", metavar="ROWS", help="print the table again from the JSON rows an earlier run "
                        "wrote to stderr (one a line), with this script's formula")
    parser.add_argument("--heap-overhead", type=float, help="--reprint: the formula's heap factor f (default: "
                        "1.0 when MALLOC_MMAP_THRESHOLD_ is set, else 1.6)")
    args = parser.parse_args()
    if args.reprint:
        print(HEADER)
        for line in open(args.reprint):
            if line.startswith("{"):
                print_row(json.loads(line), args.heap_overhead or heap_overhead())
        return
    subprocess.run([sys.executable, "-c", WARM, args.model], check=True, capture_output=True)
    print(f"{args.model} fp32 on CPU, {args.threads} threads, LoRA rank 16, 6 blocks removed (--from-report "
          f"{args.order}), {args.steps} steps; MiB; load average {os.getloadavg()[0]:.2f} at the start\n")
    print(HEADER)
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            for checkpointing in (False, True):
                with tempfile.TemporaryDirectory() as scratch:
                    settings = {"model": args.model, "order": args.order, "out": os.path.join(scratch, "out"),
                                "seqlen": seqlen, "batch": batch, "steps": args.steps, "threads": args.threads,
                                "checkpointing": checkpointing}
                    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True,
                                         text=True)
                if out.returncode != 0:
                    raise SystemExit(f"seqlen {seqlen} batch {batch} failed:\n{out.stderr[-3000:]}")
                row = {"seqlen": seqlen, "batch": batch, "checkpointing": checkpointing,
                       **json.loads(out.stdout.strip().splitlines()[-1])}
                print(json.dumps(row), file=sys.stderr, flush=True)  # --reprint reads these lines
                print_row(row, heap_overhead())
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()

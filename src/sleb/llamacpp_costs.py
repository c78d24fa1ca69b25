"""The measured cost model in llama.cpp: `sleb prune X.gguf -o OUT.gguf --speed-at SPEC`.

A .gguf output runs in llama.cpp, so the seconds a removal saves are llama.cpp's, not transformers'. llama.cpp
runs its graph in C++ with no hook per module, so each unit cannot be timed inside a pass as
`sleb.timing.measure_costs` does. Instead a few **probe files** are cut from the source GGUF by the writers the
output itself goes through (`write_pruned_gguf` for whole blocks, `write_deci_gguf` for attention and MLP
branches) and timed whole, in alternation and in fresh processes, by `sleb bench --runtime llama.cpp`
(`sleb.llamacpp_bench`) at the shape of `--speed-at`:

- ``source``: the file as it is; ``blocks``: without `k` blocks spread evenly over the candidates;
- for branch units also ``deci``: the source written as llama.cpp's deci architecture with nothing removed (the
  graph a branch-unit output runs in), ``attention``: that without the attention of the same `k` layers, and
  ``mlp``: without their MLPs.

The fit: a unit's cost is the time its probe saved over its reference, divided by `k` (``blocks`` against
``source``, the branches against ``deci``), and every layer is taken to cost the same (llama.cpp runs the same
kernels on the same shapes; a file whose layers differ, e.g. sliding-window and global attention, gets their
average, as the probed layers are spread over the stack). A block costs at least its two branches, and all the
blocks at most the whole pass (`fit_costs` says where it clamped); what the blocks do not hold is ``source``
less all the blocks. `prefill:N` times one N-token prompt pass; `generation:N`
a decode step at N tokens of context (`GEN_TOKENS` steps after the prompt, divided by their number). Every
probe's times, the fit and the runtime's settings go into the table's `info` (the run file's `speed` entry).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from .errors import SlebError
from .llamacpp_bench import LlamaCppJob, run_llamacpp_bench
from .settings import SearchOptions, parse_speed_at
from .sizes import MeasuredCost
from .timing import relative_spread

# Decode steps timed after the prompt for `generation:N` (as `sleb bench` and the frontier make).
GEN_TOKENS = 32
# Timed rounds of every probe (in alternation, each a fresh process) and timed runs per process (the fastest).
ROUNDS, SAMPLES = 3, 2


def probe_layers(num_blocks: int, options: SearchOptions, share: float = 1 / 3) -> list[int]:
    """About `share` of the candidate blocks (the barriers respected, layer 0 never: a deci file keeps its
    attention), spread evenly over them."""
    cands = [b for b in options.candidates(range(num_blocks)) if b > 0]
    if not cands:
        raise SlebError(f"no candidate layers to probe: {num_blocks} blocks, barriers first {options.early_barrier}, "
                        f"last {options.latter_barrier}")
    k = max(1, round(len(cands) * share))
    return sorted({cands[min(len(cands) - 1, int((i + 0.5) * len(cands) / k))] for i in range(k)})


def shape_job(files: list[str], spec: str, *, rounds: int = ROUNDS, samples: int = SAMPLES,
              threads: int | None = None, llama_bench: str | None = None) -> LlamaCppJob:
    """The llama.cpp bench of `files` at `spec` (prefill:N or generation:N)."""
    mode, tokens = parse_speed_at(spec)
    if mode == "prefill":
        return LlamaCppJob(files, prefill_len=tokens, gen_tokens=0, rounds=rounds, samples=samples, threads=threads,
                           llama_bench=llama_bench)
    return LlamaCppJob(files, prefill_len=0, gen_prompt=tokens, gen_tokens=GEN_TOKENS, rounds=rounds, samples=samples,
                       threads=threads, llama_bench=llama_bench)


def seconds_per_pass(file_speed, mode: str) -> list[float]:
    """One file's seconds per pass (prefill) or per decode step (generation), one per round."""
    if mode == "prefill":
        return list(file_speed.prefill_s)
    return [s / GEN_TOKENS for s in file_speed.gen_s]


def write_probes(source: str | os.PathLike, folder: Path, layers: list[int], branches: bool) -> dict[str, str]:
    """The probe files (see the module docstring) in `folder`, by name."""
    from .gguf_io.deci import write_deci_gguf
    from .gguf_io.pruned import write_pruned_gguf

    probes = {"source": str(source), "blocks": str(folder / "blocks.gguf")}
    write_pruned_gguf(source, probes["blocks"], layers, progress=False)
    if branches:
        for name, attention, mlp in (("deci", [], []), ("attention", layers, []), ("mlp", [], layers)):
            probes[name] = str(folder / f"{name}.gguf")
            write_deci_gguf(source, probes[name], attention, progress=False, removed_mlp=mlp)
    return probes


def fit_costs(seconds: dict[str, float], num_blocks: int, k: int, branches: bool) -> dict:
    """Per-layer costs from the probes' median seconds (see the module docstring): {block, attention, mlp,
    total, clamped}. A block costs at least its two branches; the blocks cost at most the whole pass (a probe
    may save more than its share: at a long context llama.cpp's time is nearly all blocks, and fewer layers
    run faster than in proportion), each clamp said in `clamped`. SlebError when removing blocks saved
    nothing."""
    total = seconds["source"]
    block = (total - seconds["blocks"]) / k
    if block <= 0:
        raise SlebError(f"the llama.cpp probes contradict each other: removing {k} of {num_blocks} blocks saved "
                        f"nothing ({seconds['blocks']:.3g} s against {total:.3g} s); other work on the machine is "
                        "the usual cause: measure on an idle one")
    fit = {"block_probe": block, "total": total, "clamped": []}
    attention = mlp = 0.0
    if branches:
        attention = max(0.0, (seconds["deci"] - seconds["attention"]) / k)
        mlp = max(0.0, (seconds["deci"] - seconds["mlp"]) / k)
        if attention + mlp > block:  # noise: a block holds both branches
            fit["clamped"].append(f"block {block:.3g} s raised to attention + MLP {attention + mlp:.3g} s")
            block = attention + mlp
    if block * num_blocks > total:
        share = total / num_blocks
        fit["clamped"].append(f"{num_blocks} blocks of {block:.3g} s exceed the pass ({total:.3g} s): each block "
                              f"{share:.3g} s, its branches scaled alike, nothing outside the blocks")
        attention, mlp, block = attention * share / block, mlp * share / block, share
    fit["block"] = block
    if branches:
        fit.update(attention=attention, mlp=mlp, deci_overhead=seconds["deci"] / total - 1)
    return fit


def measure_gguf_costs(source: str | os.PathLike, spec: str, num_blocks: int, *, branches: bool,
                       options: SearchOptions = SearchOptions(), rounds: int = ROUNDS, samples: int = SAMPLES,
                       threads: int | None = None, llama_bench: str | None = None,
                       progress: bool = True) -> MeasuredCost:
    """The measured cost model of `source` (a GGUF file of `num_blocks` blocks) at `spec`, in llama.cpp, from
    probe files (the module docstring); `branches`: also each block's attention and MLP unit."""
    mode, tokens = parse_speed_at(spec)
    layers = probe_layers(num_blocks, options)
    with tempfile.TemporaryDirectory(prefix="sleb-probes-") as folder:
        probes = write_probes(source, Path(folder), layers, branches)
        job = shape_job(list(probes.values()), spec, rounds=rounds, samples=samples, threads=threads,
                        llama_bench=llama_bench)
        result = run_llamacpp_bench(job, show_bar=progress)
    per_round = {name: seconds_per_pass(f, mode) for name, f in zip(probes, result.files)}
    seconds = {name: statistics.median(values) for name, values in per_round.items()}
    fit = fit_costs(seconds, num_blocks, len(layers), branches)
    job = result.job
    info = {"runtime": "llama.cpp", "how": (
                f"whole-file timings of probe files cut from the source ({', '.join(probes)}; {len(layers)} layers "
                f"{layers} probed) in {result.runtime.describe()}, {job.rounds} rounds in alternation, each a fresh "
                f"process, fastest of {job.samples} runs; per unit: the seconds its probe saved / {len(layers)}, "
                "every layer alike"),
            "llama_cpp": result.llama_cpp, "threads": job.threads, "flash_attention": job.flash_attention,
            "rounds": job.rounds, "samples": job.samples, "probe_layers": layers,
            "probes": {name: {"seconds": seconds[name], "spread": relative_spread(values), "rounds": values}
                       for name, values in per_round.items()},
            "fit": fit, "load_average": result.load_average}
    return MeasuredCost(mode, tokens, (fit["block"],) * num_blocks, fit["total"],
                        ((fit["attention"], fit["mlp"]),) * num_blocks if branches else None,
                        spread=relative_spread(per_round["source"]), info=info)


def time_gguf_output(source: str | os.PathLike, output: str | os.PathLike, spec: str, *,
                     rounds: int = ROUNDS, samples: int = SAMPLES, threads: int | None = None,
                     llama_bench: str | None = None, progress: bool = True) -> dict:
    """The written `output` against its `source` in llama.cpp at `spec`, as the probes were timed: {seconds,
    spread, pruned_seconds, pruned_spread, measured_speedup, measured_spread, runtime}."""
    mode, _ = parse_speed_at(spec)
    result = run_llamacpp_bench(shape_job([os.fspath(source), os.fspath(output)], spec, rounds=rounds,
                                          samples=samples, threads=threads, llama_bench=llama_bench),
                                show_bar=progress)
    dense, pruned = (seconds_per_pass(f, mode) for f in result.files)
    out = {"plain_seconds": statistics.median(dense), "plain_spread": relative_spread(dense),
           "pruned_plain_seconds": statistics.median(pruned), "pruned_plain_spread": relative_spread(pruned)}
    out["measured_speedup"] = out["plain_seconds"] / out["pruned_plain_seconds"]
    out["measured_spread"] = out["plain_spread"] + out["pruned_plain_spread"]
    out["measured_in"] = f"llama.cpp ({result.runtime.describe()}, {result.llama_cpp or 'version unknown'})"
    return out

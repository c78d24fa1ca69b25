"""The measured cost model (`--speed-at`): each block, attention unit and MLP unit timed at the user's shape.

`measure_costs(model, "generation:1024", branches)` times the model as it will run in transformers, on its
own device and dtype: `prefill:N` is one forward pass over N tokens (batch 1, no KV cache, logits for every
token: `sleb bench`'s prompt pass), `generation:N` one new token at a context of N tokens with the KV cache
(the cache is filled once, untimed, and cut back to N tokens after every timed step).

How: forward pre- and post-hooks on every block, on each block's attention and MLP modules and the norms
that serve only them (`sleb.arch.Branches`), on the embedding and on the LM head record the wall time
between entering and leaving each module, inside real forward passes of the whole model (so every module
sees its real inputs: masks, rotary tables, the KV cache). On CUDA every hook synchronizes the device
first, so a module's time is its kernels' and not the launch queue's. The whole pass is timed around the
same hooked call: all parts of the table come from the same passes and add up (the hooks' own overhead,
a few microseconds a module, is inside them alike). Each round also times one pass without hooks, recorded
as `plain_seconds` beside the hooked total. After `warmup` untimed rounds, `rounds` rounds run (at least 3;
fewer when `max_seconds` has passed), and more, up to `max_rounds`, while less than `min_seconds` have passed:
a cheap shape (a generation step) gets many rounds, so that a module's median is its undisturbed time even
when other work on the machine stalls some of them. Python's garbage collector is off while rounds run (as
in `timeit`). Every entry is the median over rounds, and `spread` is half the range of the hooked total
relative to its median (`relative_spread`: of the middle 80% of the rounds from 10 on).

A unit's cost is its module's time plus its norms' (they leave the saved model with it); what a block
takes beyond its two units (residual adds, the call itself) is saved only when both go. The table and
how it was measured go into the run file (`speed`) and `sleb report`.
"""

from __future__ import annotations

import copy
import gc
import inspect
import os
import platform
import statistics
import time
from collections import defaultdict

import torch

from .arch import BRANCH_KINDS, find_blocks, input_device, max_context
from .errors import BadInput, SlebError
from .settings import parse_speed_at
from .sizes import MeasuredCost, Sizer


def check_speed_at(spec: str, config, name: str = "the model") -> tuple[str, int]:
    """Refuse (one line) a malformed `--speed-at`, or a context beyond the model's (`config`: its config or the
    model; a generation step at N tokens of context needs N + 1 positions)."""
    mode, tokens = parse_speed_at(spec)
    limit = max_context(config)
    needed = tokens + (1 if mode == "generation" else 0)
    if limit is not None and needed > limit:
        raise BadInput(f"--speed-at {spec} needs {needed} positions; {name}'s context is {limit} tokens")
    return mode, tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # every GPU: a model spread over several (device_map) runs blocks on each
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


class _Clock:
    """Forward hooks that add up the seconds spent inside each named module during a pass."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[str, list[float]] = defaultdict(list)
        self.handles = []
        for key, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._enter(key)))
            self.handles.append(module.register_forward_hook(self._leave(key)))

    def _enter(self, key):
        def hook(module, args):
            _sync(self.device)
            self._started[key].append(time.perf_counter())
        return hook

    def _leave(self, key):
        def hook(module, args, output):
            _sync(self.device)
            self.seconds[key] += time.perf_counter() - self._started[key].pop()
        return hook

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _timed_modules(model, branches) -> dict[str, torch.nn.Module]:
    modules = {}
    for i, block in enumerate(find_blocks(model).modules):
        modules[f"block.{i}"] = block
        if branches is not None:
            for kind in BRANCH_KINDS:
                modules[f"{kind}.{i}"] = getattr(block, branches.name(kind))
                for n, norm in enumerate(branches.norms.get(kind, ())):
                    modules[f"{kind}.norm{n}.{i}"] = getattr(block, norm)
    modules["embedding"] = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None:
        modules["head"] = head
    return modules


def _workload(model, mode: str, tokens: int, seed: int):
    """The pass to time for `prefill:tokens` or `generation:tokens`, as (run, reset): `reset` (untimed) puts
    the KV cache back to `tokens` tokens after a generation step."""
    device = input_device(model)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, (1, tokens + 1), generator=torch.Generator().manual_seed(seed)).to(device)
    if mode == "prefill":
        prompt = ids[:, :tokens]
        return (lambda: model(input_ids=prompt, use_cache=False)), (lambda: None)
    with torch.inference_mode():
        out = model(input_ids=ids[:, :tokens], use_cache=True)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    if cache is None:
        raise SlebError(f"{type(model).__name__} returned no KV cache; --speed-at generation needs one (use prefill)")
    pristine = copy.deepcopy(cache)
    step = ids[:, tokens:]
    state = {"cache": cache}
    # transformers 5 renames the argument `cache` (the old name warns); older releases know only the old one.
    argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run():
        return model(input_ids=step, use_cache=True, **{argument: state["cache"]})

    def reset():
        # Back to N tokens of context for the next round (a copy where the cache cannot be cut).
        try:
            state["cache"].crop(tokens)
            ok = state["cache"].get_seq_length() == tokens
        except (AttributeError, ValueError, NotImplementedError, RuntimeError):
            ok = False
        if not ok:
            state["cache"] = copy.deepcopy(pristine)

    return run, reset


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _more(done: int, rounds: int, max_rounds: int, elapsed: float, min_seconds: float, max_seconds: float) -> bool:
    """Whether another round runs: at least 3, `rounds` unless `max_seconds` passed, then up to `max_rounds`
    while under `min_seconds`."""
    if done < 3:
        return True
    if done < rounds:
        return elapsed <= max_seconds
    return done < max_rounds and elapsed < min_seconds


def _warm_up_without_gc(run, reset, warmup: int) -> None:
    """Collect once, turn Python's garbage collector off (the caller turns it back on when its rounds end, as
    `timeit` does) and run `warmup` untimed rounds."""
    gc.collect()
    gc.disable()
    for _ in range(warmup):
        run()
        reset()


def relative_spread(samples: list[float]) -> float:
    """Half the range of the samples relative to their median; from 10 samples on, of the middle 80% of them
    (a generation step gets up to 50 rounds, and one stalled by other work must not make the whole measurement
    look useless: a min-max over 50 rounds on a shared 2-core machine read +-18-81% here)."""
    median = statistics.median(samples)
    ordered = sorted(samples)
    trim = len(ordered) // 10 if len(ordered) >= 10 else 0
    kept = ordered[trim : len(ordered) - trim]
    return (kept[-1] - kept[0]) / 2 / median if median > 0 else 0.0


def machine(model) -> dict:
    """What a measurement ran on: device, dtype, threads, versions, the machine's load."""
    from importlib import metadata

    device = input_device(model)
    info = {"device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        info["transformers"] = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):  # other work on the machine shows up in every timing
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


@torch.inference_mode()
def measure_costs(model, spec: str, branches=None, *, warmup: int = 2, rounds: int = 7, max_seconds: float = 60.0,
                  min_seconds: float = 10.0, max_rounds: int = 50, seed: int = 0) -> MeasuredCost:
    """Time every block (and with `branches`, every attention and MLP unit) of `model` at `spec` (see the
    module docstring for how). Returns the table as a `MeasuredCost`."""
    mode, tokens = check_speed_at(spec, model)
    device = input_device(model)
    was_training = model.training
    model.eval()
    run, reset = _workload(model, mode, tokens, seed)
    clock = _Clock(_timed_modules(model, branches), device)
    parts: dict[str, list[float]] = defaultdict(list)
    totals, plain = [], []
    started = time.perf_counter()
    try:
        _warm_up_without_gc(run, reset, warmup)
        done = 0
        while _more(done, rounds, max_rounds, time.perf_counter() - started, min_seconds, max_seconds):
            clock.remove()
            plain.append(_timed(run, device))
            reset()
            clock = _Clock(_timed_modules(model, branches), device)
            totals.append(_timed(run, device))
            reset()
            for key, seconds in clock.seconds.items():
                parts[key].append(seconds)
            done += 1
    finally:
        clock.remove()
        model.train(was_training)
        gc.enable()
    median = {key: statistics.median(values) for key, values in parts.items()}
    num_blocks = len(find_blocks(model).modules)
    missing = [i for i in range(num_blocks) if f"block.{i}" not in median]
    if missing:
        raise SlebError(f"blocks {missing} never ran in the timed pass; cannot measure their cost")

    def unit(kind: str, i: int) -> float:
        norms = len(branches.norms.get(kind, ()))
        return median.get(f"{kind}.{i}", 0.0) + sum(median.get(f"{kind}.norm{n}.{i}", 0.0) for n in range(norms))

    branch_seconds = None
    if branches is not None:
        branch_seconds = tuple((unit("attn", i), unit("mlp", i)) for i in range(num_blocks))
    info = {**machine(model), "warmup": warmup, "rounds": done, "seconds": round(time.perf_counter() - started, 3),
            "plain_seconds": statistics.median(plain), "plain_spread": relative_spread(plain),
            "how": "forward hooks on every block, branch, norm, embedding and LM head inside whole-model passes"
                   + ("; CUDA synchronized in every hook" if device.type == "cuda" else "") + "; medians over rounds"}
    return MeasuredCost(mode, tokens, tuple(median[f"block.{i}"] for i in range(num_blocks)),
                        statistics.median(totals), branch_seconds, median.get("embedding", 0.0),
                        median.get("head", 0.0), relative_spread(totals), info)


@torch.inference_mode()
def time_model(model, spec: str, *, warmup: int = 2, rounds: int = 7, max_seconds: float = 30.0,
               min_seconds: float = 10.0, max_rounds: int = 50, seed: int = 0) -> tuple[float, float]:
    """Seconds of one pass of `model` at `spec` without hooks, as (median, spread): a pruned model timed the way
    `measure_costs` timed the dense one (its `plain_seconds`)."""
    mode, tokens = check_speed_at(spec, model)
    device = input_device(model)
    run, reset = _workload(model, mode, tokens, seed)
    try:
        _warm_up_without_gc(run, reset, warmup)
        samples, started = [], time.perf_counter()
        while _more(len(samples), rounds, max_rounds, time.perf_counter() - started, min_seconds, max_seconds):
            samples.append(_timed(run, device))
            reset()
    finally:
        gc.enable()
    return statistics.median(samples), relative_spread(samples)


def cost_model(model, context: int, branches=None, speed_at: str | None = None,
               measured: MeasuredCost | None = None) -> Sizer:
    """The one cost model of a search: the FLOP ideal at `context`, or with `speed_at` the measured one (timed
    now unless `measured` is given)."""
    if measured is None and speed_at is not None:
        measured = measure_costs(model, speed_at, branches)
    return Sizer.of(model, context, branches, measured=measured)

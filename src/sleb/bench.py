"""Speed and memory of models side by side: prompt processing, generation, peak memory, ideal speedup.

`bench` measures every model on the same seeded inputs, the first one as the baseline:

- prompt processing: the latency of one forward pass over `prefill_batch x prefill_len` tokens,
  no KV cache, full logits (as the FLOP model counts the LM head for every token);
- generation: tokens/s of greedy `generate` on `gen_batch` prompts of `gen_prompt` tokens making
  exactly `gen_tokens` new tokens each with the KV cache (EOS is suppressed until then), i.e.
  `gen_batch * gen_tokens / seconds` of the whole call, its prompt pass included, as in the paper;
- decode: the same calls' tokens/s after the first new token, `gen_batch * (gen_tokens - 1)` over
  the time from the first new token to the last (timestamps from `generate`'s streamer, which
  copies every token to the host, so device work is included): one step at a context of
  `gen_prompt` tokens and beyond, what a per-token cost model (`--speed-at generation:N`) predicts
  and what llama.cpp's `tg` measures. With a long prompt and few new tokens the prompt pass
  dominates the generation figure, not this one;
- peak memory: the model's weight bytes plus the most memory the run added on top of what was
  in use when it started (CUDA: `max_memory_allocated`; CPU: process RSS sampled every
  millisecond during the untimed first warm-up run), so models loaded side by side do not count
  each other's weights;
- the speedup over the baseline and, beside it, the ideal speedup: the ratio of forward FLOPs
  per token (`sleb.sizes.ModelCost`) at the context the workload runs at.

Generation runs with the KV cache `cache`: `dynamic` (the default of `generate`, grown token by
token) or `static` (preallocated; on CUDA transformers compiles the decode step with it, which is
what serving stacks do, and removes most of the per-token Python and launch overhead that
otherwise hides a smaller model's gain).

Timing: warm-up runs first -- at least `warmup`, and more while a model's last warm-up was much
slower than the one before (compilation, recompilation for new shapes) -- then `repeats` timed
runs, the models taken in turn within every repeat (round robin) so drift in clocks or
temperature hits all of them alike, and more repeats, up to `max_repeats`, while a model's
spread is above `spread_target` (half the range of its repeats, of their middle 80% from 10 on:
a min-max range only grows with more repeats). The median is reported with the min and max. CUDA work
is timed with events after synchronising.

`run_bench` is the whole `sleb bench` job as one library call: a `BenchJob` names the models and
how to load them, the workload (sizes left out take `default_sizes`) and the --json file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from .arch import find_blocks, input_device, max_context, text_config
from .errors import BadInput, SlebError
from .loading import check_same_tokenizer, runs_on_cuda
from .timing import relative_spread
from .sizes import ModelCost, dtype_bytes, kv_cache_bytes_per_token, quantization_of, weight_bytes

GiB = 1024**3


# The paper's workload: prompt 1 x 2048; generation 64 sequences, 64 prompt + 128 new tokens.
PAPER_SIZES = {"prefill_batch": 1, "prefill_len": 2048, "gen_batch": 64, "gen_prompt": 64, "gen_tokens": 128}
# A CPU default that takes about a minute per 135M-parameter model on 2 cores (the paper's takes ~10).
CPU_SIZES = {"prefill_batch": 1, "prefill_len": 512, "gen_batch": 8, "gen_prompt": 32, "gen_tokens": 32}
CACHES = ("dynamic", "static")


def default_sizes(on_cuda: bool, paper: bool, context: int | None = None) -> dict[str, int]:
    """Workload sizes when none are given: the paper's on CUDA or with `paper`, else CPU_SIZES.

    CPU sizes are shortened to fit `context` (the paper's are not: they are the paper's).
    """
    sizes = dict(PAPER_SIZES if paper or on_cuda else CPU_SIZES)
    if context is not None and not (paper or on_cuda):
        sizes["prefill_len"] = min(sizes["prefill_len"], context)
        total = sizes["gen_prompt"] + sizes["gen_tokens"]
        if total > context:
            sizes["gen_prompt"] = max(1, context // 2)
            sizes["gen_tokens"] = max(1, context - sizes["gen_prompt"])
    return sizes


@dataclass
class BenchConfig:
    """What to run. Defaults: the paper's prompt (1 x 2048) and generation (64, 64, 128) settings."""

    prefill_batch: int = 1
    prefill_len: int = 2048
    gen_batch: int = 64
    gen_prompt: int = 64
    gen_tokens: int = 128
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    prefill: bool = True
    generation: bool = True
    cache: str = "dynamic"  # KV cache of generation: dynamic or static
    max_repeats: int | None = None  # repeats go on up to this while the spread is large (None: 3 x repeats)
    spread_target: float = 0.05
    max_warmup: int | None = None  # extra warm-ups stop here (None: warmup + 4)

    def validate(self) -> None:
        for name in ("prefill_batch", "prefill_len", "gen_batch", "gen_prompt", "gen_tokens", "warmup", "repeats"):
            if getattr(self, name) < 1:
                raise SlebError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.prefill or self.generation):
            raise SlebError("nothing to measure: both prompt processing and generation are off")
        if self.cache not in CACHES:
            raise SlebError(f"unknown cache {self.cache!r}; available: {', '.join(CACHES)}")

    @property
    def repeat_cap(self) -> int:
        return max(self.repeats, self.max_repeats if self.max_repeats is not None else 3 * self.repeats)

    @property
    def warmup_cap(self) -> int:
        return max(self.warmup, self.max_warmup if self.max_warmup is not None else self.warmup + 4)


SIZES = tuple(PAPER_SIZES)


@dataclass(frozen=True)
class BenchJob:
    """Everything `sleb bench` does, as one value (the CLI's flags, one field each); `run_bench` runs it.

    `models` are measured side by side, the first as the baseline. A size left None takes
    `default_sizes`: the paper's on CUDA or with `paper`, else CPU_SIZES cut to the models' context;
    `cache` auto is static on CUDA, dynamic elsewhere. The rest is `BenchConfig`'s (same defaults);
    `threads` sets torch's CPU threads, `json_path` receives every measurement.
    """

    models: list[str]
    prefill_batch: int | None = None
    prefill_len: int | None = None
    gen_batch: int | None = None
    gen_prompt: int | None = None
    gen_tokens: int | None = None
    paper: bool = False
    cache: str = "auto"
    warmup: int = BenchConfig.warmup
    repeats: int = BenchConfig.repeats
    max_repeats: int | None = None
    seed: int = BenchConfig.seed
    prefill: bool = True
    generation: bool = True
    threads: int | None = None
    json_path: str | None = None
    overwrite: bool = False
    dtype: str = "auto"
    device: str | None = "auto"
    trust_remote_code: bool = False

    @property
    def on_cuda(self) -> bool:
        """Whether the models run on CUDA (`device` cuda..., or auto with a GPU)."""
        return runs_on_cuda(self.device)

    def validate(self) -> "BenchJob":
        """The checks that need no model: dtype, device, --threads, and the --json file's place; returns
        the job with `models` as a list of strings (one name may be given alone)."""
        from . import loading
        from .outputs import check_output_file

        models = [self.models] if isinstance(self.models, (str, os.PathLike)) else self.models
        job = replace(self, models=[os.fspath(name) for name in models])
        if not job.models:
            raise BadInput("no models to benchmark")
        if job.threads is not None and job.threads < 1:
            raise BadInput(f"threads must be at least 1, got {job.threads}")
        loading.parse_dtype(job.dtype)
        loading.check_device(job.device)
        if job.json_path:
            check_output_file(job.json_path, inputs=[p for name in job.models for p in loading.local_paths(name)],
                              overwrite=job.overwrite, label="--json")
        return job

    def config(self, context: int | None = None) -> BenchConfig:
        """The measurement settings, sizes and cache resolved for this device and the models' `context`."""
        sizes = default_sizes(self.on_cuda, self.paper, context)
        sizes.update({name: getattr(self, name) for name in SIZES if getattr(self, name) is not None})
        cache = ("static" if self.on_cuda else "dynamic") if self.cache == "auto" else self.cache
        return BenchConfig(**sizes, warmup=self.warmup, repeats=self.repeats, max_repeats=self.max_repeats,
                           seed=self.seed, prefill=self.prefill, generation=self.generation, cache=cache)


@dataclass
class Timing:
    """Seconds of every timed repeat, summarised by the median and the min/max spread."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Half the range relative to the median (0.03 reads as +-3%); of the middle 80% from 10 repeats on."""
        return relative_spread(self.samples)

    def to_dict(self) -> dict:
        return {"samples_s": self.samples, "median_s": self.median, "min_s": min(self.samples),
                "max_s": max(self.samples), "spread": self.spread}


@dataclass
class ModelBench:
    """One model's measurements; speedups are against the first model of the run."""

    name: str
    blocks: int
    params: int
    weight_bytes: int
    dtype: str
    device: str
    quantization: str | None
    prefill: Timing | None = None
    prefill_peak_bytes: int | None = None
    prefill_speedup: float | None = None
    prefill_ideal_speedup: float | None = None
    generation: Timing | None = None
    generation_peak_bytes: int | None = None
    generation_speedup: float | None = None
    generation_ideal_speedup: float | None = None
    decode: Timing | None = None  # from the first new token to the last, inside the generation runs
    decode_speedup: float | None = None
    flops_per_token: dict[str, float] = field(default_factory=dict)
    prefill_tokens: int = 0  # tokens one prompt-processing run takes in
    generation_tokens: int = 0  # new tokens one generation run makes
    decode_tokens: int = 0  # new tokens after the first one in a generation run (what `decode` times)
    attention_layers: int | None = None  # blocks that attend (fewer after --unit attention/sublayer)
    kv_bytes_per_token: int | None = None  # KV cache per token of context, in the model's dtype
    prefill_warmup_s: list[float] = field(default_factory=list)  # untimed warm-up runs (compilation shows here)
    generation_warmup_s: list[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return None if self.prefill is None else self.prefill_tokens / self.prefill.median

    @property
    def generation_tokens_per_s(self) -> float | None:
        return None if self.generation is None else self.generation_tokens / self.generation.median

    @property
    def decode_tokens_per_s(self) -> float | None:
        return None if self.decode is None else self.decode_tokens / self.decode.median

    def to_dict(self) -> dict:
        data = asdict(self)
        data["prefill"] = self.prefill.to_dict() if self.prefill else None
        data["generation"] = self.generation.to_dict() if self.generation else None
        data["decode"] = self.decode.to_dict() if self.decode else None
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        data["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        data["generation_tokens_per_s"] = self.generation_tokens_per_s
        return data


@dataclass
class BenchResult:
    config: BenchConfig
    models: list[ModelBench]
    machine: dict

    def to_dict(self) -> dict:
        return {"format": "sleb-bench/1", "config": asdict(self.config), "machine": self.machine,
                "models": [m.to_dict() for m in self.models]}


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
    elif device.type != "cpu" and hasattr(torch, "accelerator") and torch.accelerator.is_available():
        torch.accelerator.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes, with the device's queued work included (CUDA events on CUDA)."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        _sync(device)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    start_s = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start_s


# ---------------------------------------------------------------------------------------------
# Peak memory


def _rss() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS, so an RSS baseline does not hide a later peak."""
    gc.collect()
    if platform.system() == "Linux":
        libc = ctypes.util.find_library("c")
        if libc:
            try:
                ctypes.CDLL(libc).malloc_trim(0)
            except (OSError, AttributeError):
                pass


class PeakMemory:
    """Peak memory a block of code adds on top of what was in use when it started (bytes)."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval_s = interval_s
        self.extra = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _release_freed_memory()
        self._base = self._peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.extra = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss())
        self.extra = max(0, self._peak - self._base)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on the device (host memory for CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


# ---------------------------------------------------------------------------------------------
# Checks and inputs


def activation_bytes(model, config: BenchConfig) -> dict[str, int]:
    """A rough upper estimate of the memory each workload adds beyond the weights.

    Prompt processing: fp32 logits for every token, the attention score matrix of one layer
    and a few hidden-size activations. Generation: the KV cache for prompt + new tokens and the
    same for the prompt pass (last-token logits only).
    """
    cfg = text_config(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    heads = getattr(cfg, "num_attention_heads", None) or 1
    hidden = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    item = dtype_bytes(model)

    def forward(batch: int, length: int, all_logits: bool) -> int:
        logits = batch * (length if all_logits else 1) * vocab * 4 * 2  # logits and their fp32 copy
        scores = batch * heads * length * length * item * 2
        hidden_acts = batch * length * (6 * hidden + 3 * inter) * item
        return logits + scores + hidden_acts

    kv = config.gen_batch * (config.gen_prompt + config.gen_tokens) * kv_cache_bytes_per_token(model, item)
    return {
        "prefill": forward(config.prefill_batch, config.prefill_len, True),
        "generation": kv + forward(config.gen_batch, config.gen_prompt, False),
    }


def check_inputs(named: Sequence[tuple[str, object, object]], config: BenchConfig) -> None:
    """Raise SlebError (one line) unless the models share a tokenizer and the lengths fit their context.

    `named` holds `(name, tokenizer, config_or_model)` triples, so this runs before any weights
    are loaded (the CLI calls it with configs) as well as on loaded models.
    """
    if not named:
        raise SlebError("no models to benchmark")
    check_same_tokenizer([(name, tok) for name, tok, _ in named], "models are compared on the same token ids")
    needs = []
    if config.prefill:
        needs.append(("prompt length", config.prefill_len))
    if config.generation:
        needs.append(("prompt + new tokens", config.gen_prompt + config.gen_tokens))
    for name, _, model_or_config in named:
        context = max_context(model_or_config)
        for what, length in needs:
            if context is not None and length > context:
                raise SlebError(f"{what} of {length} tokens is beyond {name}'s context of {context} tokens")


def check_models(models: Sequence[tuple[str, object, object]], config: BenchConfig) -> None:
    """`check_inputs`, then: embeddings cover the tokenizer and the activations fit in free memory."""
    check_inputs([(name, tok, model) for name, model, tok in models], config)
    for name, model, tok in models:
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < len(tok):
            raise SlebError(f"{name}'s embedding has {rows} rows but its tokenizer has {len(tok)} tokens")
    workloads = []
    if config.prefill:
        workloads.append(("prefill", "prompt processing", f"{config.prefill_batch} x {config.prefill_len} tokens",
                          "--prefill-batch/--prefill-len"))
    if config.generation:
        workloads.append(("generation", "generation", f"batch {config.gen_batch}, {config.gen_prompt} + "
                          f"{config.gen_tokens} tokens", "--gen-batch/--gen-prompt/--gen-tokens"))
    for name, model, _ in models:
        device = input_device(model)
        free = available_memory(device)
        estimate = activation_bytes(model, config)
        for key, what, size, options in workloads:
            if estimate[key] > free:
                raise SlebError(f"{what} at {size} needs about {estimate[key] / GiB:.1f} GiB beyond {name}'s "
                                f"weights on {device}, only {free / GiB:.1f} GiB free; lower {options}")


def random_ids(tokenizer, batch: int, length: int, seed: int) -> torch.Tensor:
    """Token ids drawn uniformly from the tokenizer's non-special tokens, fixed by `seed`."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (batch, length), generator=generator)]


# ---------------------------------------------------------------------------------------------
# Workloads


def _prefill_fn(model, ids: torch.Tensor) -> Callable[[], object]:
    ids = ids.to(input_device(model))

    def run():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    return run


class TokenClock:
    """A `generate` streamer that only notes when each put arrives: first the prompt, then every new token
    (already on the host, so the device's work for it is done)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def reset(self) -> None:
        self.times.clear()

    def decode_seconds(self) -> float | None:
        """From the first new token to the last (None with fewer than two new tokens)."""
        return self.times[-1] - self.times[1] if len(self.times) >= 3 else None


def _generate_fn(model, ids: torch.Tensor, new_tokens: int, tokenizer, cache: str = "dynamic",
                 clock: TokenClock | None = None) -> Callable[[], object]:
    from transformers import GenerationConfig

    ids = ids.to(input_device(model))
    mask = torch.ones_like(ids)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    gen_config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
        use_cache=True, eos_token_id=eos, pad_token_id=pad,
        cache_implementation="static" if cache == "static" else None,
    )

    def run():
        if clock is not None:
            clock.reset()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config, streamer=clock)
        made = out.shape[1] - ids.shape[1]
        if made != new_tokens:
            raise SlebError(f"generate made {made} new tokens instead of {new_tokens}")
        return out

    return run


def _guard_oom(name: str, what: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        try:
            return fn()
        except torch.OutOfMemoryError as err:
            raise SlebError(f"{name} ran out of memory in {what}; lower the batch or length") from err
        except RuntimeError as err:
            if "out of memory" in str(err).lower() or "not enough memory" in str(err).lower():
                raise SlebError(f"{name} ran out of memory in {what}; lower the batch or length") from err
            raise

    return run


def machine_info(devices: Sequence[torch.device]) -> dict:
    """What the numbers were measured on."""
    from importlib import metadata

    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if hasattr(os, "getloadavg"):  # other work on the machine shows up in every timing
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    for package in ("transformers", "bitsandbytes"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    if cuda:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in cuda]
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench(
    models: Sequence[tuple[str, object, object]],
    config: BenchConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Measure `(name, model, tokenizer)` triples on the same inputs; the first is the baseline.

    Raises SlebError (one line) for tokenizers that differ, sizes beyond a model's context or the
    free memory, and out-of-memory during a run.
    """
    config = config or BenchConfig()
    config.validate()
    check_models(models, config)
    say = progress or (lambda message: None)
    tokenizer = models[0][2]

    results = []
    costs = [ModelCost.of_model(model) for _, model, _ in models]
    for (name, model, _), cost in zip(models, costs):
        results.append(ModelBench(
            name=name, blocks=len(find_blocks(model).modules), attention_layers=cost.attention_layers,
            kv_bytes_per_token=cost.kv_cache_bytes_per_token(dtype_bytes(model)),
            params=cost.params,
            weight_bytes=weight_bytes(model), dtype=str(model.dtype).removeprefix("torch."),
            device=str(input_device(model)), quantization=quantization_of(model),
            prefill_tokens=config.prefill_batch * config.prefill_len,
            generation_tokens=config.gen_batch * config.gen_tokens,
            decode_tokens=config.gen_batch * (config.gen_tokens - 1),
        ))

    workloads = []
    # Per model, the clock of its generation runs (decode timing); none for the prompt pass.
    clocks = [TokenClock() if config.generation and config.gen_tokens >= 2 else None for _ in models]
    if config.prefill:
        ids = random_ids(tokenizer, config.prefill_batch, config.prefill_len, config.seed)
        workloads.append(("prefill", [_prefill_fn(m, ids) for _, m, _ in models]))
    if config.generation:
        ids = random_ids(tokenizer, config.gen_batch, config.gen_prompt, config.seed + 1)
        workloads.append(("generation", [_generate_fn(m, ids, config.gen_tokens, t, config.cache, clock)
                                         for (_, m, t), clock in zip(models, clocks)]))

    for what, fns in workloads:
        fns = [_guard_oom(name, what, fn) for (name, _, _), fn in zip(models, fns)]
        warm: list[list[float]] = [[] for _ in models]
        samples: list[list[float]] = [[] for _ in models]
        decode_samples: list[list[float]] = [[] for _ in models]
        started = time.perf_counter()
        rounds_done = 0

        def still_warming() -> bool:
            """Warm up until a model's last two warm-ups agree within 25%: compilation, and
            recompilation for new shapes, make a run much slower than the next."""
            if len(warm[0]) < config.warmup:
                return True
            if len(warm[0]) >= config.warmup_cap:
                return False
            static = config.cache == "static" and what == "generation"  # compiles on first use
            unsettled = any(len(w) >= 2 and max(w[-2:]) > 1.25 * min(w[-2:]) for w in warm)
            return unsettled or (static and len(warm[0]) < 2)

        def needs_repeats() -> bool:
            if len(samples[0]) < config.repeats:
                return True
            return len(samples[0]) < config.repeat_cap and any(Timing(s).spread > config.spread_target
                                                               for s in samples)

        while still_warming() or needs_repeats():
            timing = not still_warming()
            planned = len(warm[0]) + max(config.repeats, len(samples[0]) + (1 if timing else 0))
            eta = ""
            if rounds_done:
                left = (time.perf_counter() - started) / rounds_done * max(0, planned - rounds_done)
                eta = f", about {left:.0f} s left" if left >= 1 else ""
            k = len(samples[0]) + 1
            label = (f"repeat {k}/{config.repeats}" if k <= config.repeats else
                     f"repeat {k}, up to {config.repeat_cap} (spread above {config.spread_target:.0%})")
            label = label if timing else f"warm-up {len(warm[0]) + 1}"
            say(f"{what}: {label}{eta}")
            for i, ((name, model, _), fn) in enumerate(zip(models, fns)):
                device = input_device(model)
                torch.manual_seed(config.seed)
                if not warm[i] and not timing:  # the first warm-up also measures peak memory (sampling costs)
                    start_s = time.perf_counter()
                    with PeakMemory(device) as peak:
                        fn()
                    _sync(device)
                    warm[i].append(time.perf_counter() - start_s)
                    setattr(results[i], f"{what}_peak_bytes", results[i].weight_bytes + peak.extra)
                elif timing:
                    samples[i].append(timed(fn, device))
                    if what == "generation" and clocks[i] is not None:
                        decode_samples[i].append(clocks[i].decode_seconds())
                else:
                    warm[i].append(timed(fn, device))
            rounds_done += 1
        for result, model_samples, warm_samples, decoded in zip(results, samples, warm, decode_samples):
            setattr(result, what, Timing(model_samples))
            setattr(result, f"{what}_warmup_s", warm_samples)
            if decoded and None not in decoded:
                result.decode = Timing(decoded)

    contexts = {"prefill": config.prefill_len,
                # a new token attends to P + i tokens; the FLOP model takes a context and averages over half of it
                "generation": 2 * config.gen_prompt + config.gen_tokens}
    base_flops = {w: costs[0].flops_per_token(c) for w, c in contexts.items()}
    base = results[0]
    for result, cost in zip(results, costs):
        for what, context in contexts.items():
            flops = cost.flops_per_token(context)
            result.flops_per_token[what] = flops
            if getattr(result, what) is None:
                continue
            setattr(result, f"{what}_ideal_speedup", base_flops[what] / flops)
            setattr(result, f"{what}_speedup", getattr(base, what).median / getattr(result, what).median)
        if result.decode is not None and base.decode is not None:
            result.decode_speedup = base.decode.median / result.decode.median
    return BenchResult(config, results, machine_info([input_device(m) for _, m, _ in models]))


def run_bench(job: BenchJob, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run `job` (see `BenchJob`): check what needs no weights, peek every model's config and tokenizer
    (a mismatch or a size beyond the context is reported before any weights load), load, measure with
    `bench`, and write `job.json_path`."""
    import json

    from transformers.utils import logging as hf_logging

    from . import loading
    from .outputs import atomic_write_text
    from .quantize import quiet_bitsandbytes

    quiet_bitsandbytes()
    job = job.validate()
    if job.threads:
        torch.set_num_threads(job.threads)
    hf_logging.disable_progress_bar()  # the benchmark reports its own progress
    light = []
    for name in job.models:
        model_config, tokenizer = loading.peek(name, job.trust_remote_code)
        light.append((name, tokenizer, model_config))
    contexts = [c for c in (max_context(cfg) for _, _, cfg in light) if c is not None]
    config = job.config(min(contexts) if contexts else None)
    config.validate()
    check_inputs(light, config)
    loaded = []
    for name in job.models:
        lm, tokenizer = loading.load(name, dtype=job.dtype, device=job.device, trust_remote_code=job.trust_remote_code)
        loaded.append((name, lm, tokenizer))
    result = bench(loaded, config, progress=progress)
    if job.json_path:
        atomic_write_text(job.json_path, json.dumps(result.to_dict(), indent=2))
    return result


# ---------------------------------------------------------------------------------------------
# Output


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(result: BenchResult) -> str:
    """A Markdown table: one row per model, speedups against the first."""
    c = result.config
    head = ["model", "blocks", "attention layers", "KV cache/token (KiB)", "params (M)", "weights (MiB)"]
    if c.prefill:
        head += [f"prefill {c.prefill_batch}x{c.prefill_len} (ms)", "speedup", "ideal", "peak (MiB)"]
    if c.generation:
        head += [f"gen {c.gen_batch}x{c.gen_prompt}+{c.gen_tokens} (tok/s, {c.cache} cache)", "speedup", "ideal",
                 "peak (MiB)"]
    decode = c.generation and all(m.decode is not None for m in result.models)
    if decode:
        head += ["decode (tok/s)", "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result.models:
        row = [m.name + (f" ({m.quantization})" if m.quantization else ""), str(m.blocks),
               str(m.attention_layers), f"{m.kv_bytes_per_token / 1024:.1f}", f"{m.params / 1e6:.1f}",
               _mib(m.weight_bytes)]
        if c.prefill:
            row += [f"{m.prefill.median * 1000:.1f} ±{m.prefill.spread:.0%}", _x(m.prefill_speedup),
                    _x(m.prefill_ideal_speedup), _mib(m.prefill_peak_bytes)]
        if c.generation:
            row += [f"{m.generation_tokens_per_s:.1f} ±{m.generation.spread:.0%}", _x(m.generation_speedup),
                    _x(m.generation_ideal_speedup), _mib(m.generation_peak_bytes)]
        if decode:
            row += [f"{m.decode_tokens_per_s:.1f} ±{m.decode.spread:.0%}", _x(m.decode_speedup)]
        lines.append("| " + " | ".join(row) + " |")
    info = result.machine
    lines.append("")
    runs = sorted({len(t.samples) for m in result.models for t in (m.prefill, m.generation) if t is not None})
    warmups = sorted({len(w) for m in result.models for w in (m.prefill_warmup_s, m.generation_warmup_s) if w})
    lines.append(f"median of {'/'.join(map(str, runs))} (±: half the range, of the middle 80% from 10 on), "
                 f"{'/'.join(map(str, warmups)) or c.warmup} warm-up, models in alternation, "
                 f"seed {c.seed}; {info['processor']}, {info['torch_threads']} threads, torch {info['torch']}"
                 + (f", load average {info['load_average_1m']}" if "load_average_1m" in info else "")
                 + (f", {', '.join(info['gpus'])}" if info.get("gpus") else ""))
    if decode:
        lines.append(f"decode: the generation runs' {c.gen_tokens - 1} tokens after the first, timed from the first "
                     "new token to the last (no prompt pass)")
    return "\n".join(lines)

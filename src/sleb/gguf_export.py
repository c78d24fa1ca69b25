"""GGUF out: a pruned model as a `.gguf` file that llama.cpp, Ollama and LM Studio run.

Two routes, both through the `gguf` package's reader and writer:

- from a GGUF source (`write_pruned_gguf`): the kept blocks' tensors are copied byte for byte, in
  their original quantization, renamed `blk.{new}.*` in order; every other tensor and every
  metadata entry is copied unchanged, except `{arch}.block_count` (lowered) and the metadata
  arrays with one entry per block (sliced to the kept blocks). Alignment and byte order follow the
  source.
- from a Hugging Face model (`write_hf_gguf`): see that function for what is supported.

`save_gguf` writes either to a temporary file beside the output, reloads it with transformers
(`gguf_file=`), compares logits with the in-memory pruned model, and only then moves it into place,
with the run report beside it as `OUT.gguf.sleb_report.json`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput, CheckFailed, SlebError, raise_if_disk_full
from .outputs import check_output_file, clean_stale, temp_path

REPORT_SUFFIX = ".sleb_report.json"
GGUF_TYPES = ("f16", "bf16", "q8_0")
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")


def is_gguf_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def report_path(out: str | os.PathLike) -> Path:
    """Where the run report of a GGUF output goes: beside it, `OUT.gguf.sleb_report.json`."""
    out = Path(out)
    return out.with_name(out.name + REPORT_SUFFIX)


def _field_value(reader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


@dataclass
class GgufPruneInfo:
    """What `write_pruned_gguf` did: enough to check it and to put in the run report."""

    architecture: str
    blocks_before: int
    kept: list[int]
    sliced_arrays: list[str] = field(default_factory=list)
    tensor_types: dict[str, int] = field(default_factory=dict)  # quantization type name -> tensors written
    alignment: int = 32
    endianness: str = "LITTLE"

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "blocks_before": self.blocks_before, "kept": self.kept,
                "sliced_per_block_arrays": self.sliced_arrays, "tensor_types": self.tensor_types,
                "alignment": self.alignment, "endianness": self.endianness}


def block_count(reader) -> tuple[str, int]:
    """(architecture, block count) of an open GGUFReader, or SlebError when they are missing."""
    import gguf

    arch = _field_value(reader, gguf.Keys.General.ARCHITECTURE)
    count = _field_value(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)) if arch else None
    if arch is None or count is None:
        raise SlebError("the GGUF file has no general.architecture or {arch}.block_count; is it a model file?")
    return arch, int(count)


def per_block_arrays(reader, arch: str, n: int) -> list[str]:
    """Metadata arrays of the architecture with one entry per block (per-layer head counts, ...)."""
    import gguf

    # rope.dimension_sections has a fixed length (4) that is not a layer count.
    fixed = {gguf.Keys.Rope.DIMENSION_SECTIONS.format(arch=arch)}
    return [f.name for f in reader.fields.values()
            if f.name.startswith(f"{arch}.") and f.name not in fixed
            and f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) == n]


def write_pruned_gguf(source: str | os.PathLike, target: str | os.PathLike, removed: list[int],
                      progress: bool = True) -> GgufPruneInfo:
    """Write `source` without the blocks `removed` (indices into its blocks) to `target`.

    No reload check here: `save_gguf` does that. Raises SlebError for indices out of range or a
    file whose block tensors do not match its block count.
    """
    import gguf
    from tqdm import tqdm

    try:
        reader = gguf.GGUFReader(source, "r")
    except (ValueError, OSError) as err:
        raise SlebError(f"cannot read GGUF file {source}: {err}") from err
    arch, n = block_count(reader)
    removed_set = set(removed)
    if len(removed_set) != len(removed) or not all(isinstance(i, int) and 0 <= i < n for i in removed):
        raise SlebError(f"blocks to remove must be distinct indices in [0, {n}), got {list(removed)}")
    if len(removed_set) >= n:
        raise SlebError(f"cannot remove all {n} blocks")
    nextn = _field_value(reader, f"{arch}.nextn_predict_layers")
    if nextn:  # multi-token-prediction blocks sit after block_count - nextn; renumbering would misplace them
        raise SlebError(f"{source} has {nextn} next-token-prediction blocks ({arch}.nextn_predict_layers); "
                        "pruning such GGUF files is not supported")
    found = {int(m.group(1)) for t in reader.tensors if (m := _BLOCK_TENSOR.match(t.name))}
    if found != set(range(n)):
        raise SlebError(f"{source}: {arch}.block_count is {n} but the file has tensors for blocks {sorted(found)}")
    kept = [i for i in range(n) if i not in removed_set]
    new_index = {old: new for new, old in enumerate(kept)}
    arrays = per_block_arrays(reader, arch, n)

    writer = gguf.GGUFWriter(target, arch, endianess=reader.endianess)
    # The writer pads tensor data to its own alignment; the general.alignment key is copied below.
    writer.data_alignment = int(reader.alignment)
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    for f in reader.fields.values():
        # general.architecture is written by GGUFWriter itself; GGUF.* are the reader's header pseudo-fields.
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        kind = f.types[0]
        sub_type = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if f.name == count_key:
            value = len(kept)
        elif f.name in arrays:
            value = [value[i] for i in kept]
        writer.add_key_value(f.name, value, kind, sub_type=sub_type)

    info = GgufPruneInfo(architecture=arch, blocks_before=n, kept=kept, sliced_arrays=arrays,
                         alignment=int(reader.alignment), endianness=reader.endianess.name)
    tensors = []
    for t in reader.tensors:
        m = _BLOCK_TENSOR.match(t.name)
        if m and int(m.group(1)) in removed_set:
            continue
        name = f"blk.{new_index[int(m.group(1))]}.{m.group(2)}" if m else t.name
        # t.data is the raw bytes (uint8 for quantized types); raw_dtype keeps the source type.
        writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        info.tensor_types[t.tensor_type.name] = info.tensor_types.get(t.tensor_type.name, 0) + 1
        tensors.append(t)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(t.n_bytes for t in tensors), unit="B", unit_scale=True, desc="writing GGUF",
                  disable=not progress) as bar:
            for t in tensors:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
                bar.update(t.n_bytes)
    finally:
        writer.close()
    return info


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
    from .arch import text_config

    cfg = text_config(model)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise SlebError(f"writing GGUF for a model with {rope['rope_type']!r} rope scaling is not supported")
    if any(kind != "full_attention" for kind in getattr(cfg, "layer_types", None) or []):
        raise SlebError("writing GGUF for a model with sliding-window layers is not supported")
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

    from .arch import text_config

    if gguf_type not in GGUF_TYPES:
        raise SlebError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    arch = _hf_arch(model)
    cfg = text_config(model)

    writer = gguf.GGUFWriter(target, arch)
    writer.add_name(str(getattr(cfg, "_name_or_path", "") or arch))
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    values = {"rope_theta": _rope_theta(model), "head_dim": head_dim}
    for key, hf_key in GGUF_CONFIG_MAPPING[arch].items():
        value = values.get(hf_key, getattr(cfg, hf_key, None)) if hf_key else None
        if value is None:
            continue
        kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
        writer.add_key_value(f"{arch}.{key}", value, kind)
    # llama.cpp reads the head size from these where it is not hidden / heads (transformers ignores them).
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
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

    from .export import PROBE_TEXT

    reloaded = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    got, expected = reloaded(PROBE_TEXT)["input_ids"], tokenizer(PROBE_TEXT)["input_ids"]
    if got != expected:
        raise CheckFailed(f"the GGUF file's tokenizer encodes the probe text as {got[:8]}..., the model's as "
                        f"{expected[:8]}...; not saved")


def _expected_logits(model, tokenizer, state: dict):
    """Probe logits of `model` with some weights replaced (tied weights stay tied)."""
    import torch
    from torch.func import functional_call

    from .arch import input_device
    from .export import PROBE_TEXT

    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(input_device(model))
    params = {name: value.to(model.get_parameter(name).device, model.get_parameter(name).dtype)
              for name, value in state.items()}
    with torch.no_grad():
        return functional_call(model, params, (ids,), {"use_cache": False}).logits.float().cpu()


def save_gguf(
    model,
    tokenizer,
    out: str | os.PathLike,
    result=None,
    *,
    source: str | os.PathLike | None = None,
    removed: list[int] | None = None,
    gguf_type: str = "f16",
    overwrite: bool = False,
    report: dict | None = None,
    verify: bool = True,
    progress: bool = True,
) -> Path:
    """Write the pruned `model` as a GGUF file `out` and its run report beside it (`OUT.gguf.sleb_report.json`).

    With `source` (the GGUF file `model` was loaded from, before `remove_blocks`), the file is
    `source` without the removed blocks: kept tensors byte for byte in their own quantization
    (`write_pruned_gguf`). Without it, the in-memory model is written in `gguf_type` (f16, bf16,
    q8_0; `write_hf_gguf` says which families). Either way the file is written beside `out`,
    reloaded with transformers (`gguf_file=`) and its logits compared with the in-memory model's
    (for a lossy `gguf_type`: with its weights rounded the same way; a written tokenizer must also
    encode a probe text as `tokenizer` does); only then is it moved into place, so a failure
    leaves nothing behind.

    Args:
        result: the SearchResult whose removals were applied; its `removed` are the blocks dropped
            from `source` unless `removed` is given.
        report: extra fields for the report (model source, calibration spec and seed, ...).
    """
    from .arch import find_blocks
    from .export import verify_reload
    from .runfile import build_report

    out = Path(out)
    check_gguf_output(out, inputs=[source] if source is not None else (), overwrite=overwrite)
    if source is not None and removed is None:
        if result is None:
            raise BadInput("writing GGUF from a GGUF source needs the removed blocks (result or removed)")
        removed = list(result.removed)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    # A recognisable name beside `out` (same file system for os.replace; a killed run's leftover is
    # cleaned by the next writer), ending in .gguf for the reload.
    tmp = temp_path(out)
    tmp = tmp.with_name(tmp.name + ".gguf")
    tmp_report = tmp.with_name(tmp.name + REPORT_SUFFIX)
    fields = dict(report or {})
    try:
        expected = None
        if source is not None:
            info = write_pruned_gguf(source, tmp, removed, progress=progress)
            blocks = len(find_blocks(model).modules)
            if len(info.kept) != blocks:
                raise SlebError(f"the model has {blocks} blocks but {source} without blocks {removed} has "
                                f"{len(info.kept)}; was the model loaded from it?")
            fields["gguf"] = {"source_file": str(source), **info.to_dict()}
        else:
            written = write_hf_gguf(model, tokenizer, tmp, gguf_type, progress=progress)
            fields["gguf"] = written["info"]
            if verify:
                expected = _expected_logits(model, tokenizer, written["expected_state"])
        if verify:
            fields["reload_max_logit_diff"] = verify_reload(model, tokenizer, tmp.parent, gguf_file=tmp.name,
                                                            expected=expected)
            if source is None:  # a GGUF source's tokenizer metadata is copied unchanged
                check_tokenizer(tokenizer, tmp.parent, tmp.name)
        tmp_report.write_text(json.dumps(build_report(model, result, fields), indent=2))
        os.replace(tmp, out)
        os.replace(tmp_report, report_path(out))
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        tmp_report.unlink(missing_ok=True)
        raise_if_disk_full(err, out)
        raise
    return out


def check_gguf_output(out: str | os.PathLike, *, inputs=(), overwrite: bool = False) -> Path:
    """The output policy for a GGUF file (see `sleb.outputs`): not an input, not a folder, a writable place;
    an existing file is replaced only with `overwrite` and only when `sleb` wrote it (its run file beside it)."""
    out = Path(out)
    if not is_gguf_path(out):
        raise BadInput(f"a GGUF output path must end in .gguf, got {out}")
    check_output_file(out, inputs=inputs)
    check_output_file(report_path(out), inputs=inputs)
    if out.exists():
        if not overwrite:
            raise BadInput(f"{out} already exists; pass --overwrite to replace it")
        if not report_path(out).is_file():
            raise BadInput(f"{out} exists and was not written by sleb (no {report_path(out).name} beside it); "
                           "not replacing it even with --overwrite: choose another file")
    return out


@dataclass
class GgufOutput:
    """How a GGUF output is made: from `source` (a GGUF file, kept blocks copied) or, without one, in `gguf_type`."""

    source: Path | None
    gguf_type: str = "f16"


def gguf_output(model_spec: str, out: str | os.PathLike, fmt: str = "auto",
                gguf_type: str | None = None) -> GgufOutput | None:
    """Decide, before loading anything, whether `out` is a GGUF output and how it is made (None: safetensors).

    `fmt` is auto (GGUF exactly when `out` ends in .gguf), gguf or safetensors. A GGUF source keeps
    its own quantization, so `gguf_type` applies only to Hugging Face sources.
    """
    from .loading import resolve

    if fmt not in ("auto", "gguf", "safetensors"):
        raise SlebError(f"unknown output format {fmt!r}; choose auto, gguf or safetensors")
    if fmt == "safetensors" and is_gguf_path(out):
        raise SlebError(f"--format safetensors writes a folder; {out} ends in .gguf")
    if fmt == "gguf" and not is_gguf_path(out):
        raise SlebError(f"--format gguf needs an output path ending in .gguf, got {out}")
    if not is_gguf_path(out):
        if gguf_type is not None:
            raise SlebError("--gguf-type applies to GGUF output (an output path ending in .gguf)")
        return None
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise SlebError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    folder, gguf_file = resolve(model_spec)
    if gguf_file is None:
        return GgufOutput(source=None, gguf_type=gguf_type or "f16")
    if Path(out).resolve() == (Path(folder) / gguf_file).resolve():
        raise SlebError(f"the output {out} is the source GGUF file; choose another file")
    if gguf_type is not None:
        raise SlebError("the source is a GGUF file: its kept blocks are copied in their own quantization, so "
                        "--gguf-type does not apply")
    return GgufOutput(source=Path(folder) / gguf_file)

"""GGUF out: a pruned model as a `.gguf` file that llama.cpp, Ollama and LM Studio run.

Two routes, both through the `gguf` package's reader and writer:

- from a GGUF source (`write_pruned_gguf`): the kept blocks' tensors are copied byte for byte, in
  their original quantization, renamed `blk.{new}.*` in order; every other tensor and every
  metadata entry is copied unchanged, except `{arch}.block_count` (lowered) and the metadata
  arrays with one entry per block (sliced to the kept blocks). Alignment and byte order follow the
  source.
- from a Hugging Face model (`write_hf_gguf`, in `sleb.gguf_from_hf`): see that function for what
  is supported.

`save_gguf` writes either to a temporary file beside the output, reloads it with transformers
(`gguf_file=`), compares logits with the in-memory pruned model, and only then moves it into place,
with the run report beside it as `OUT.gguf.sleb_report.json`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput, CheckFailed, SlebError
from .gguf_from_hf import GGUF_TYPES, write_hf_gguf
from .outputs import NAME_MAX, atomic_files, check_output_file
from .runfile import REPORT_SUFFIX, RunRecord, report_path  # noqa: F401  (public here too)

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")


def is_gguf_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def field_value(reader, key: str):
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

    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    count = field_value(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)) if arch else None
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
    nextn = field_value(reader, f"{arch}.nextn_predict_layers")
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

    write_copied_tensors(writer, tensors, reader.endianess, progress)
    return info


def write_copied_tensors(writer, tensors, endianess, progress: bool = True) -> None:
    """Finish `writer` (header, metadata, tensor infos already added) with the raw bytes of `tensors`, read
    from a source GGUF file, and close it."""
    from tqdm import tqdm

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(t.n_bytes for t in tensors), unit="B", unit_scale=True, desc="writing GGUF",
                  disable=not progress) as bar:
            for t in tensors:
                writer.write_tensor_data(t.data, tensor_endianess=endianess)
                bar.update(t.n_bytes)
    finally:
        writer.close()


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

    out = Path(out)
    check_gguf_output(out, inputs=[source] if source is not None else (), overwrite=overwrite)
    if source is not None and removed is None:
        if result is None:
            raise BadInput("writing GGUF from a GGUF source needs the removed blocks (result or removed)")
        removed = list(result.removed)
    fields = dict(report or {})
    # Temporaries beside `out` (same file system for the rename), the GGUF one ending in .gguf for the reload.
    with atomic_files(out, report_path(out)) as (tmp, tmp_report):
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
        RunRecord.of(model, result, **fields).write(tmp_report)
    return out


def check_gguf_output(out: str | os.PathLike, *, inputs=(), overwrite: bool = False,
                      need_bytes: int | None = None) -> Path:
    """The output policy (`sleb.outputs`) for a GGUF file and the run file beside it: an existing one is
    replaced only with `overwrite` and only when sleb wrote it."""
    out = Path(out)
    if not is_gguf_path(out):
        raise BadInput(f"a GGUF output path must end in .gguf, got {out}")
    room = NAME_MAX - len(REPORT_SUFFIX)
    if len(os.fsencode(out.name)) > room:  # the run file's name beside it would not fit the filesystem
        raise BadInput(f"output {out.name[:40]}...: a GGUF output's name can have at most {room} bytes (its run "
                       f"file beside it adds {REPORT_SUFFIX} to it, and names have at most {NAME_MAX})")
    check_output_file(out, inputs=inputs, overwrite=overwrite, need_bytes=need_bytes, label="output")
    check_output_file(report_path(out), inputs=inputs, overwrite=overwrite, label="output")
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
    check_layer_pattern(Path(folder) / gguf_file)
    return GgufOutput(source=Path(folder) / gguf_file)


# Architectures whose per-layer attention type llama.cpp derives from the layer's position (its loader's
# `set_swa_pattern(period)`: every period-th layer global, the others sliding-window), when the file
# has a sliding window. From llama.cpp's model loaders (src/llama-model.cpp, src/models/*.cpp).
POSITION_DERIVED_PATTERNS = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "exaone4": 4, "llama4": 4}


def check_layer_pattern(source: str | os.PathLike) -> None:
    """Refuse (BadInput, one line) pruning a GGUF file whose layer pattern llama.cpp derives from positions.

    Removing blocks shifts which layers llama.cpp then treats as global (and which rope base each
    gets), so the pruned file would not compute what the pruned model computes. A file that carries
    the pattern as a per-layer array keeps it (the array is sliced with the blocks) and passes.
    """
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch, n = block_count(reader)
    period = POSITION_DERIVED_PATTERNS.get(arch)
    if period is None:
        return
    window = field_value(reader, f"{arch}.attention.sliding_window")
    # Without the key llama.cpp applies no window, except llama4, whose chunked attention is the default.
    if window == 0 or (window is None and arch != "llama4"):
        return
    if f"{arch}.attention.sliding_window_pattern" in per_block_arrays(reader, arch, n):
        return
    raise BadInput(f"{Path(source).name}: llama.cpp derives each {arch} layer's attention type from its position "
                   f"(one layer in {period} global, the others attending to the last {window or 8192} tokens), so removing blocks "
                   "would shift which layers are global and a pruned .gguf cannot keep the model's pattern; save "
                   "to a folder instead (-o DIR keeps the explicit layer_types)")

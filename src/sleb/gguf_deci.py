"""`--unit attention` GGUF → GGUF: llama.cpp's `deci` architecture, kept tensors copied byte for byte.

llama.cpp runs Nemotron-NAS models as the `deci` architecture, a Llama whose per-layer head counts
and MLP sizes are arrays: `deci.attention.head_count[i] = 0` is a layer without attention (no
attention tensors, no K cache: `cur = inpL`, then its MLP as usual). So a Llama-architecture GGUF
without some attention branches is that file with `llama.*` keys renamed `deci.*`, those three
arrays written, and the removed layers' `attn_norm`, `attn_q`, `attn_k`, `attn_v` and `attn_output`
tensors left out; every other tensor is copied in its own quantization.

MLP-free layers cannot be written: llama.cpp's deci graph skips a layer with
`feed_forward_length = 0` entirely, its attention included (`src/models/deci.cpp`), so only
`--unit attention` results are written this way (checked before the search). The first layer keeps
its attention: the loader reads the head size from it. Without flash attention llama.cpp still pads
the V cache of attention-free layers to the widest layer, so its KV saving is then only on K.
"""

from __future__ import annotations

import os
import re

from .errors import BadInput, SlebError
from .units import unit_kind

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")
ATTENTION_TENSORS = ("attn_norm.", "attn_q.", "attn_k.", "attn_v.", "attn_output.")


def check_deci_source(reader_or_path) -> None:
    """Only Llama-architecture GGUF files become `deci` ones (the same graph with per-layer arrays)."""
    import gguf

    from .gguf_export import block_count

    reader = gguf.GGUFReader(reader_or_path, "r") if isinstance(reader_or_path, (str, os.PathLike)) else reader_or_path
    arch, _ = block_count(reader)
    if arch != "llama":
        raise BadInput(f"--unit attention writes GGUF files as llama.cpp's deci architecture, a Llama with per-layer "
                       f"head counts; this file's architecture is {arch}: save to a folder (-o DIR) instead")


def write_deci_gguf(source: str | os.PathLike, target: str | os.PathLike, removed_attention: list[int],
                    progress: bool = True) -> dict:
    """Write `source` (a llama GGUF) without the attention of the blocks in `removed_attention`, as `deci`.

    Returns what was written, for the run file."""
    import gguf

    from .gguf_export import block_count, field_value, write_copied_tensors

    reader = gguf.GGUFReader(source, "r")
    check_deci_source(reader)
    arch, n = block_count(reader)
    gone = set(removed_attention)
    if not all(isinstance(b, int) and 0 <= b < n for b in gone):
        raise SlebError(f"attention layers to remove must be block indices in [0, {n}), got {sorted(gone)}")
    if 0 in gone:
        raise BadInput("the first layer keeps its attention in a deci GGUF (llama.cpp reads the head size from it)")

    heads = field_value(reader, f"{arch}.attention.head_count")
    kv_heads = field_value(reader, f"{arch}.attention.head_count_kv") or heads
    ffn = field_value(reader, f"{arch}.feed_forward_length")
    if not all(isinstance(v, int) for v in (heads, kv_heads, ffn)):
        raise SlebError(f"{source}: expected scalar head counts and feed-forward length in a llama GGUF")
    arrays = {"deci.attention.head_count": [0 if b in gone else heads for b in range(n)],
              "deci.attention.head_count_kv": [0 if b in gone else kv_heads for b in range(n)],
              "deci.feed_forward_length": [ffn] * n}

    writer = gguf.GGUFWriter(target, "deci", endianess=reader.endianess)
    writer.data_alignment = int(reader.alignment)
    for f in reader.fields.values():
        # Per-block arrays keep their length: an attention-only cut removes no layer.
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        name = "deci." + f.name[len(arch) + 1:] if f.name.startswith(f"{arch}.") else f.name
        if name in arrays:
            continue
        kind = f.types[0]
        writer.add_key_value(name, f.contents(), kind,
                             sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for name, values in arrays.items():
        writer.add_key_value(name, values, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)

    tensors, dropped = [], 0
    for t in reader.tensors:
        m = _BLOCK_TENSOR.match(t.name)
        if m and int(m.group(1)) in gone and m.group(2).startswith(ATTENTION_TENSORS):
            dropped += 1
            continue
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        tensors.append(t)
    write_copied_tensors(writer, tensors, reader.endianess, progress)
    return {"architecture": "deci", "source_architecture": arch, "blocks": n,
            "attention_layers": n - len(gone), "tensors_dropped": dropped, "tensors_copied": len(tensors)}


def check_deci_copy(source: str | os.PathLike, target: str | os.PathLike, removed_attention: list[int]) -> None:
    """Read the written file back: `deci`, the arrays as meant, every tensor byte-identical to the source's."""
    import gguf
    import numpy as np

    from .errors import CheckFailed

    src, out = gguf.GGUFReader(source, "r"), gguf.GGUFReader(target, "r")
    if out.get_field("general.architecture").contents() != "deci":
        raise CheckFailed(f"{target} does not say it is a deci model; not saved")
    heads = out.get_field("deci.attention.head_count").contents()
    if [b for b, h in enumerate(heads) if h == 0] != sorted(removed_attention):
        raise CheckFailed("the written head counts do not mark the removed attention layers; not saved")
    by_name = {t.name: t for t in src.tensors}
    for t in out.tensors:
        s = by_name.get(t.name)
        if s is None or s.tensor_type != t.tensor_type or not np.array_equal(np.asarray(s.data), np.asarray(t.data)):
            raise CheckFailed(f"tensor {t.name} of the written file differs from the source's; not saved")


def save_deci_gguf(model, out: str | os.PathLike, result, source: str | os.PathLike, *, overwrite: bool = False,
                   report: dict | None = None, progress: bool = True):
    """Write an attention-unit result as a deci GGUF file `out` (from `source`, the GGUF file `model` was
    loaded from) with its run file beside it; read back and compared with the source before the move.

    transformers cannot load a deci GGUF, so the check is structural (`check_deci_copy`): the tests run the
    file in llama.cpp itself."""
    from pathlib import Path

    from .gguf_export import check_gguf_output
    from .outputs import atomic_files
    from .runfile import RunRecord, report_path

    kind = unit_kind(result.unit)
    if kind.gguf_layout != "deci":
        raise BadInput(f"llama.cpp's deci GGUF holds --unit attention results; this one is --unit {result.unit}")
    removed = sorted(kind.space(result.num_blocks).block_of(u) for u in result.removed)
    out = Path(out)
    check_gguf_output(out, inputs=[source], overwrite=overwrite)
    fields = dict(report or {})
    with atomic_files(out, report_path(out)) as (tmp, tmp_report):
        info = write_deci_gguf(source, tmp, removed, progress=progress)
        check_deci_copy(source, tmp, removed)
        fields["gguf"] = {"source_file": str(source), **info}
        RunRecord.of(model, result, **fields).write(tmp_report)
    return out

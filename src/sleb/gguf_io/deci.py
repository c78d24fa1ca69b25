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
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import BadInput, CheckFailed, SlebError
from ..units import model_branches, unit_kind
from ..writer import SaveJob, save_with
from .reader import BLOCK_TENSOR, GgufFile, block_count, field_value, write_copied_tensors

ATTENTION_TENSORS = ("attn_norm.", "attn_q.", "attn_k.", "attn_v.", "attn_output.")


def check_deci_source(reader_or_path) -> None:
    """Only Llama-architecture GGUF files become `deci` ones (the same graph with per-layer arrays)."""
    import gguf

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
        m = BLOCK_TENSOR.match(t.name)
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


@dataclass
class DeciGguf(GgufFile):
    """An attention-unit result as a deci GGUF file: `source` (the llama GGUF file the model was loaded from)
    without the removed attention layers (`write_deci_gguf`), read back and compared with the source.

    transformers cannot load a deci GGUF, so the check is structural (`check_deci_copy`): the tests run the
    file in llama.cpp itself."""

    name: ClassVar[str] = "deci-gguf"
    copies_tensors: ClassVar[bool] = True

    source: Path
    _removed: list[int] = field(default_factory=list, init=False, repr=False)  # blocks whose attention goes

    def check_model(self, model, tokenizer) -> None:
        model_branches(model)  # the branches, proven skippable, before the search
        check_deci_source(self.source)

    def size(self, model) -> int:
        return Path(self.source).stat().st_size

    def prepare(self, job: SaveJob) -> None:
        kind = unit_kind(job.result.unit)
        if kind.gguf_layout != "deci":
            raise BadInput(f"llama.cpp's deci GGUF holds --unit attention results; this one is --unit {job.result.unit}")
        self._removed = sorted(kind.space(job.result.num_blocks).block_of(u) for u in job.result.removed)

    def write(self, job: SaveJob, tmp: Path) -> dict:
        info = write_deci_gguf(self.source, tmp, self._removed, progress=job.progress)
        return {"gguf": {"source_file": str(self.source), **info}}

    def reload(self, job: SaveJob, tmp: Path) -> dict:
        check_deci_copy(self.source, tmp, self._removed)
        return {}


def save_deci_gguf(model, out: str | os.PathLike, result, source: str | os.PathLike, *, overwrite: bool = False,
                   report: dict | None = None, progress: bool = True) -> Path:
    """Write an attention-unit result as a deci GGUF file `out` (from `source`, the GGUF file `model` was
    loaded from) with its run file beside it (`DeciGguf`, saved by `sleb.writer.save_with`)."""
    save_with(DeciGguf(source=Path(source)), model, None, out, result, report=report, overwrite=overwrite,
              inputs=[source], progress=progress)
    return Path(out)

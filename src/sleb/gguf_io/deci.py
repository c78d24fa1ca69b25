"""Branch-unit GGUF → GGUF: llama.cpp's `deci` architecture, kept tensors copied byte for byte.

llama.cpp runs Nemotron-NAS models as the `deci` architecture, a Llama whose per-layer head counts
and MLP sizes are arrays: `deci.attention.head_count[i] = 0` is a layer without attention (no
attention tensors, no K cache: `cur = inpL`, then its MLP as usual). So a Llama-architecture GGUF
without some attention branches is that file with `llama.*` keys renamed `deci.*`, those three
arrays written, and the removed layers' `attn_norm`, `attn_q`, `attn_k`, `attn_v` and `attn_output`
tensors left out; every other tensor is copied in its own quantization.

A layer without MLP cannot be stated as `feed_forward_length = 0`: llama.cpp's deci graph then skips
the rest of the layer, its attention output included (`if (n_ff == 0) continue;` in
`src/models/deci.cpp`). It is written as an MLP of width 1 whose four tensors are F32 zeros
(`ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down`): the norm's output is exactly 0, so is
silu(gate) * up and its projection, and the layer adds exactly 0 (16 bytes per hidden unit per
layer; F32 because a quantized row of width 1 is not a whole block). A block that lost both
branches is left out, as the DeciLM folder leaves it out. The first layer keeps its attention: the
loader reads the head size (and `deci.attention.key_length`) only when layer 0 has heads.
`deci.attention.key_length` and `value_length` are written: node-llama-cpp divides the width by
`head_count`, an array here, and without them turns flash attention off. Without flash attention
llama.cpp still pads the V cache of attention-free layers to the widest layer, so its KV saving is
then only on K.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

from ..arch import BRANCH_KINDS, find_blocks
from ..errors import BadInput, CheckFailed, SlebError
from ..units import model_branches, unit_kind
from ..writer import SaveJob, save_with
from .reader import (BLOCK_TENSOR, GgufFile, block_count, field_value, per_block_arrays, write_copied_tensors)

ATTENTION_TENSORS = ("attn_norm.", "attn_q.", "attn_k.", "attn_v.", "attn_output.")
MLP_TENSORS = ("ffn_",)  # ffn_norm, ffn_gate, ffn_up, ffn_down (and biases, where a file has them)
# The stand-in for a removed MLP: width 1 (the graph skips the attention output of a width-0 layer), all zeros.
MLP_PLACEHOLDER_WIDTH = 1


def check_deci_source(reader_or_path) -> None:
    """Only Llama-architecture GGUF files become `deci` ones (the same graph with per-layer arrays)."""
    import gguf

    reader = gguf.GGUFReader(reader_or_path, "r") if isinstance(reader_or_path, (str, os.PathLike)) else reader_or_path
    arch, _ = block_count(reader)
    if arch != "llama":
        raise BadInput(f"a GGUF output of attention or MLP removals is llama.cpp's deci architecture, a Llama with "
                       f"per-layer head counts and MLP sizes; this file's architecture is {arch}: save to a folder "
                       "(-o DIR) instead")


def mlp_placeholder(index: int, width: int) -> list:
    """The zero MLP of layer `index` (hidden size `width`) as tensors to write: .name, .data (numpy, F32), .n_bytes."""
    import numpy as np

    shapes = {"ffn_norm": (width,), "ffn_gate": (MLP_PLACEHOLDER_WIDTH, width),
              "ffn_up": (MLP_PLACEHOLDER_WIDTH, width), "ffn_down": (width, MLP_PLACEHOLDER_WIDTH)}
    out = []
    for name, shape in shapes.items():
        data = np.zeros(shape, dtype=np.float32)
        out.append(SimpleNamespace(name=f"blk.{index}.{name}.weight", data=data, n_bytes=data.nbytes))
    return out


def _plan(n: int, removed_attention, removed_mlp) -> tuple[list[int], set[int], set[int]]:
    """(kept blocks, blocks without attention, blocks without MLP) of `n`, checked; a block without
    either is not kept."""
    no_attn, no_mlp = set(removed_attention), set(removed_mlp)
    if not all(isinstance(b, int) and 0 <= b < n for b in no_attn | no_mlp):
        raise SlebError(f"layers to cut must be block indices in [0, {n}), got {sorted(no_attn)} and {sorted(no_mlp)}")
    kept = [b for b in range(n) if not (b in no_attn and b in no_mlp)]
    if not kept:
        raise SlebError(f"cannot remove all {n} blocks")
    if kept[0] in no_attn:
        raise BadInput("the first layer keeps its attention in a deci GGUF (llama.cpp reads the head size from it)")
    return kept, no_attn - no_mlp, no_mlp - no_attn


def write_deci_gguf(source: str | os.PathLike, target: str | os.PathLike, removed_attention: list[int],
                    progress: bool = True, removed_mlp: list[int] = ()) -> dict:
    """Write `source` (a llama GGUF) without the attention of the blocks in `removed_attention` and the MLP
    of those in `removed_mlp` (a zero stand-in, see the module docstring), as `deci`; blocks in both
    are left out.

    Returns what was written, for the run file."""
    import gguf

    reader = gguf.GGUFReader(source, "r")
    check_deci_source(reader)
    arch, n = block_count(reader)
    kept, no_attn, no_mlp = _plan(n, removed_attention, removed_mlp)
    new_index = {old: new for new, old in enumerate(kept)}

    heads = field_value(reader, f"{arch}.attention.head_count")
    kv_heads = field_value(reader, f"{arch}.attention.head_count_kv") or heads
    ffn = field_value(reader, f"{arch}.feed_forward_length")
    width = field_value(reader, f"{arch}.embedding_length")
    if not all(isinstance(v, int) for v in (heads, kv_heads, ffn, width)):
        raise SlebError(f"{source}: expected scalar head counts, feed-forward length and width in a llama GGUF")
    arrays = {"deci.attention.head_count": [0 if b in no_attn else heads for b in kept],
              "deci.attention.head_count_kv": [0 if b in no_attn else kv_heads for b in kept],
              "deci.feed_forward_length": [MLP_PLACEHOLDER_WIDTH if b in no_mlp else ffn for b in kept]}
    # What llama.cpp computes for the llama file (width / heads) unless the file says otherwise.
    lengths = {"deci.attention.key_length": width // heads, "deci.attention.value_length": width // heads}
    sliced = set(per_block_arrays(reader, arch, n))

    writer = gguf.GGUFWriter(target, "deci", endianess=reader.endianess)
    writer.data_alignment = int(reader.alignment)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        name = "deci." + f.name[len(arch) + 1:] if f.name.startswith(f"{arch}.") else f.name
        if name in arrays:
            continue
        lengths.pop(name, None)
        kind = f.types[0]
        value = f.contents()
        if name == "deci.block_count":
            value = len(kept)
        elif f.name in sliced:
            value = [value[b] for b in kept]
        writer.add_key_value(name, value, kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for name, values in arrays.items():
        writer.add_key_value(name, values, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    for name, value in lengths.items():
        writer.add_key_value(name, value, gguf.GGUFValueType.UINT32)

    tensors, dropped, placed = [], 0, set()
    for t in reader.tensors:
        m = BLOCK_TENSOR.match(t.name)
        block, part = (int(m.group(1)), m.group(2)) if m else (None, None)
        if block is not None and (block not in new_index or (block in no_attn and part.startswith(ATTENTION_TENSORS))
                                  or (block in no_mlp and part.startswith(MLP_TENSORS))):
            dropped += 1
            if block in no_mlp and block not in placed:  # the stand-in where the MLP was
                placed.add(block)
                for p in mlp_placeholder(new_index[block], width):
                    writer.add_tensor_info(p.name, p.data.shape, p.data.dtype, p.n_bytes)
                    tensors.append(p)
            continue
        name = f"blk.{new_index[block]}.{part}" if m else t.name
        writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        tensors.append(t)
    if placed != no_mlp:
        raise SlebError(f"{source} has no MLP tensors for blocks {sorted(no_mlp - placed)}")
    write_copied_tensors(writer, tensors, reader.endianess, progress)
    placeholder_bytes = len(no_mlp) * sum(p.n_bytes for p in mlp_placeholder(0, width))
    return {"architecture": "deci", "source_architecture": arch, "blocks_before": n, "blocks": len(kept),
            "kept": kept, "attention_layers": len(kept) - len(no_attn), "mlp_layers": len(kept) - len(no_mlp),
            "mlp_placeholder_bytes": placeholder_bytes, "tensors_dropped": dropped,
            "tensors_copied": len(tensors) - 4 * len(no_mlp)}


def check_deci_copy(source: str | os.PathLike, target: str | os.PathLike, removed_attention: list[int],
                    removed_mlp: list[int] = ()) -> None:
    """Read the written file back: `deci`, the arrays as meant, every tensor byte-identical to the source's
    (renumbered past left-out blocks), the MLP stand-ins F32 zeros of width 1."""
    import gguf
    import numpy as np

    src, out = gguf.GGUFReader(source, "r"), gguf.GGUFReader(target, "r")
    if out.get_field("general.architecture").contents() != "deci":
        raise CheckFailed(f"{target} does not say it is a deci model; not saved")
    _, n = block_count(src)
    kept, no_attn, no_mlp = _plan(n, removed_attention, removed_mlp)
    heads = out.get_field("deci.attention.head_count").contents()
    ffn = out.get_field("deci.feed_forward_length").contents()
    if [b for b, h in enumerate(heads) if h == 0] != [i for i, b in enumerate(kept) if b in no_attn]:
        raise CheckFailed("the written head counts do not mark the removed attention layers; not saved")
    if [i for i, f in enumerate(ffn) if f == MLP_PLACEHOLDER_WIDTH] != [i for i, b in enumerate(kept) if b in no_mlp]:
        raise CheckFailed("the written feed-forward lengths do not mark the removed MLPs; not saved")
    by_name = {t.name: t for t in src.tensors}
    for t in out.tensors:
        m = BLOCK_TENSOR.match(t.name)
        old = kept[int(m.group(1))] if m else None
        if old in no_mlp and m.group(2).startswith(MLP_TENSORS):
            if t.tensor_type != gguf.GGMLQuantizationType.F32 or np.any(np.asarray(t.data)):
                raise CheckFailed(f"tensor {t.name} of the written file is not an F32 zero stand-in; not saved")
            continue
        s = by_name.get(f"blk.{old}.{m.group(2)}" if m else t.name)
        if s is None or s.tensor_type != t.tensor_type or not np.array_equal(np.asarray(s.data), np.asarray(t.data)):
            raise CheckFailed(f"tensor {t.name} of the written file differs from the source's; not saved")


@dataclass
class DeciGguf(GgufFile):
    """A branch-unit result as a deci GGUF file: `source` (the llama GGUF file the model was loaded from)
    without the removed attention and MLP branches (`write_deci_gguf`), read back and compared with the source.

    transformers cannot load a deci GGUF, so the check is structural (`check_deci_copy`): the tests run the
    file in llama.cpp itself and compare its logits with the DeciLM folder's."""

    name: ClassVar[str] = "deci-gguf"
    copies_tensors: ClassVar[bool] = True

    source: Path
    _removed: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)  # branch -> its blocks

    def check_model(self, model, tokenizer) -> None:
        model_branches(model)  # the branches, proven skippable, before the search
        check_deci_source(self.source)

    def size(self, model) -> int:
        return Path(self.source).stat().st_size

    def prepare(self, job: SaveJob) -> None:
        kind = unit_kind(job.result.unit)
        if kind.gguf_layout != "deci":
            raise BadInput(f"llama.cpp's deci GGUF holds branch-unit results; this one is --unit {job.result.unit}")
        space = kind.space(job.result.num_blocks)
        self._removed = {branch: sorted(space.block_of(u) for u in job.result.removed if space.branch_of(u) == branch)
                         for branch in BRANCH_KINDS}

    def write(self, job: SaveJob, tmp: Path) -> dict:
        info = write_deci_gguf(self.source, tmp, self._removed["attn"], progress=job.progress,
                               removed_mlp=self._removed["mlp"])
        blocks = len(find_blocks(job.model).modules)
        if info["blocks"] != blocks:
            raise SlebError(f"the model has {blocks} blocks but the deci file of {self.source} has {info['blocks']}; "
                            "was the model loaded from it?")
        return {"gguf": {"source_file": str(self.source), **info}}

    def reload(self, job: SaveJob, tmp: Path) -> dict:
        check_deci_copy(self.source, tmp, self._removed["attn"], self._removed["mlp"])
        return {}


def save_deci_gguf(model, out: str | os.PathLike, result, source: str | os.PathLike, *, overwrite: bool = False,
                   report: dict | None = None, progress: bool = True) -> Path:
    """Write a branch-unit result as a deci GGUF file `out` (from `source`, the GGUF file `model` was
    loaded from) with its run file beside it (`DeciGguf`, saved by `sleb.writer.save_with`)."""
    save_with(DeciGguf(source=Path(source)), model, None, out, result, report=report, overwrite=overwrite,
              inputs=[source], progress=progress)
    return Path(out)

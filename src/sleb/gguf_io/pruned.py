"""GGUF from GGUF: a GGUF source without some blocks (`write_pruned_gguf`), saved as `GgufFromGguf`.

The kept blocks' tensors are copied byte for byte, in their original quantization, renamed
`blk.{new}.*` in order; every other tensor and every metadata entry is copied unchanged, except
`{arch}.block_count` (lowered), the metadata arrays with one entry per block (sliced to the kept
blocks) and, where llama.cpp reads one, `{arch}.attention.sliding_window_pattern`: the kept layers'
entries of the pattern llama.cpp uses for the source (its array, or the pattern it derives from
positions), so each kept layer keeps its attention type and rope base. Alignment and byte order follow the source. The saved file is reloaded with transformers
(`gguf_file=`) and its logits compared with the in-memory pruned model's before it is moved into
place, with the run file beside it as `OUT.gguf.sleb_report.json` (`sleb.writer.save_with`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .. import export
from ..arch import find_blocks
from ..errors import BadInput, CheckFailed, SlebError, SlebWarning
from ..writer import SaveJob
from .reader import (BLOCK_TENSOR, GgufFile, block_count, field_value, per_block_arrays, positional_swa_pattern,
                     swa_pattern, swa_pattern_key, write_copied_tensors)


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
    sliding_window_pattern: list[bool] | None = None  # written for the kept layers, where llama.cpp reads one

    def to_dict(self) -> dict:
        out = {"architecture": self.architecture, "blocks_before": self.blocks_before, "kept": self.kept,
               "sliced_per_block_arrays": self.sliced_arrays, "tensor_types": self.tensor_types,
               "alignment": self.alignment, "endianness": self.endianness}
        if self.sliding_window_pattern is not None:
            out["sliding_window_pattern"] = [int(v) for v in self.sliding_window_pattern]
        return out


def write_pruned_gguf(source: str | os.PathLike, target: str | os.PathLike, removed: list[int],
                      progress: bool = True) -> GgufPruneInfo:
    """Write `source` without the blocks `removed` (indices into its blocks) to `target`.

    No reload check here: `GgufFromGguf` does that. Raises SlebError for indices out of range or a
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
    found = {int(m.group(1)) for t in reader.tensors if (m := BLOCK_TENSOR.match(t.name))}
    if found != set(range(n)):
        raise SlebError(f"{source}: {arch}.block_count is {n} but the file has tensors for blocks {sorted(found)}")
    kept = [i for i in range(n) if i not in removed_set]
    new_index = {old: new for new, old in enumerate(kept)}
    arrays = per_block_arrays(reader, arch, n)
    # Stated per kept layer even where the source left it to positions, which the removal shifts.
    pattern = swa_pattern(reader, arch, n)
    pattern_key = swa_pattern_key(arch)

    writer = gguf.GGUFWriter(target, arch, endianess=reader.endianess)
    # The writer pads tensor data to its own alignment; the general.alignment key is copied below.
    writer.data_alignment = int(reader.alignment)
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    for f in reader.fields.values():
        # general.architecture is written by GGUFWriter itself; GGUF.* are the reader's header pseudo-fields.
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or (
                pattern is not None and f.name == pattern_key):
            continue
        kind = f.types[0]
        sub_type = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if f.name == count_key:
            value = len(kept)
        elif f.name in arrays:
            value = [value[i] for i in kept]
        writer.add_key_value(f.name, value, kind, sub_type=sub_type)
    kept_pattern = None if pattern is None else [pattern[i] for i in kept]
    if kept_pattern is not None:
        # bool, as gguf-py's add_sliding_window_pattern writes it; llama.cpp reads bool, uint32 or int32.
        writer.add_key_value(pattern_key, kept_pattern, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)

    info = GgufPruneInfo(architecture=arch, blocks_before=n, kept=kept, sliced_arrays=arrays,
                         alignment=int(reader.alignment), endianness=reader.endianess.name,
                         sliding_window_pattern=kept_pattern)
    tensors = []
    for t in reader.tensors:
        m = BLOCK_TENSOR.match(t.name)
        if m and int(m.group(1)) in removed_set:
            continue
        name = f"blk.{new_index[int(m.group(1))]}.{m.group(2)}" if m else t.name
        # t.data is the raw bytes (uint8 for quantized types); raw_dtype keeps the source type.
        writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        info.tensor_types[t.tensor_type.name] = info.tensor_types.get(t.tensor_type.name, 0) + 1
        tensors.append(t)

    write_copied_tensors(writer, tensors, reader.endianess, progress)
    return info



@dataclass
class GgufFromGguf(GgufFile):
    """The GGUF file the model was loaded from, without the removed blocks (`write_pruned_gguf`), reloaded
    with transformers and compared with the in-memory pruned model."""

    name: ClassVar[str] = "gguf-from-gguf"
    copies_tensors: ClassVar[bool] = True

    source: Path
    removed: list[int] | None = None  # the blocks dropped from `source`; default: the result's
    _pattern: list[bool] | None = field(default=None, init=False, repr=False)  # what `write` stated, for `reload`

    def size(self, model) -> int:
        return Path(self.source).stat().st_size

    def prepare(self, job: SaveJob) -> None:
        if self.removed is None:
            if job.result is None:
                raise BadInput("writing GGUF from a GGUF source needs the removed blocks (result or removed)")
            self.removed = list(job.result.removed)

    def write(self, job: SaveJob, tmp: Path) -> dict:
        info = write_pruned_gguf(self.source, tmp, self.removed, progress=job.progress)
        blocks = len(find_blocks(job.model).modules)
        if len(info.kept) != blocks:
            raise SlebError(f"the model has {blocks} blocks but {self.source} without blocks {self.removed} has "
                            f"{len(info.kept)}; was the model loaded from it?")
        self._pattern = info.sliding_window_pattern
        if self._pattern is not None and self._pattern != positional_swa_pattern(info.architecture, len(info.kept)):
            global_layers = [i for i, sliding in enumerate(self._pattern) if not sliding]
            warnings.warn(f"the pruned file states its layer pattern (global layers {global_layers}) in "
                          f"{info.architecture}.attention.sliding_window_pattern; llama.cpp builds older than the "
                          "one that reads it (docs/gguf.md) ignore it and would run some layers with the wrong "
                          "attention type and rope base", SlebWarning, stacklevel=2)
        return {"gguf": {"source_file": str(self.source), **info.to_dict()}}

    def reload(self, job: SaveJob, tmp: Path) -> dict:
        # The source's tokenizer metadata is copied unchanged, so only the logits are compared.
        config = None if self._pattern is None else _config_with_pattern(job.model, tmp, self._pattern)
        return {"reload_max_logit_diff": export.verify_reload(job.model, job.tokenizer, tmp.parent,
                                                              gguf_file=tmp.name, config=config)}


def _config_with_pattern(model, path: Path, pattern: list[bool]):
    """The configuration transformers reads from the GGUF file at `path`, with each layer's attention type
    taken from the file's sliding-window pattern (what llama.cpp runs).

    transformers' GGUF loader ignores `sliding_window_pattern` and sets layer types by position, so a
    plain reload would not test the written pattern. CheckFailed when the pattern is not the pruned
    model's own layer types.
    """
    from transformers import AutoConfig

    from ..arch import text_config

    types = ["sliding_attention" if sliding else "full_attention" for sliding in pattern]
    own = list(getattr(text_config(model), "layer_types", None) or ["full_attention"] * len(types))
    if own != types:
        raise CheckFailed(f"the pruned file's sliding-window pattern {[int(s) for s in pattern]} (what llama.cpp "
                          f"reads) is not the model's layer types {own}; not saved")
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.layer_types = types
    return config

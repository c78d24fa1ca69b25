"""What the GGUF writers share: reading a file's metadata (architecture, block count, per-block arrays), the
refusal of a layer pattern llama.cpp derives from positions, the byte copy of a source file's tensors into a
new file (`sleb.gguf_io.pruned`, `sleb.gguf_io.deci`), and `GgufFile`, the base of the GGUF output formats."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import BadInput, SlebError
from ..writer import Writer

# A block's tensor in a GGUF file: blk.{index}.{name}
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")


def is_gguf_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(GgufFile.suffix)


@dataclass
class GgufFile(Writer):
    """A GGUF output: one file ending in .gguf, its run file beside it (`OUT.gguf.sleb_report.json`)."""

    folder: ClassVar[bool] = False
    label: ClassVar[str] = "GGUF"
    suffix: ClassVar[str] = ".gguf"


def field_value(reader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


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


def write_copied_tensors(writer, tensors, endianess, progress: bool = True) -> None:
    """Finish `writer` (header, metadata, tensor infos already added) with the raw bytes of `tensors`, read
    from a source GGUF file, and close it."""
    from ..progress import progress_bar

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar(total=sum(t.n_bytes for t in tensors), unit="B", unit_scale=True, desc="writing GGUF",
                  disable=not progress) as bar:
            for t in tensors:
                writer.write_tensor_data(t.data, tensor_endianess=endianess)
                bar.update(t.n_bytes)
    finally:
        writer.close()


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

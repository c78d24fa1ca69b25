"""What the GGUF writers share: reading a file's metadata (architecture, block count, per-block arrays), each
layer's sliding-window flag as llama.cpp reads it (and the refusal of patterns a pruned file cannot state),
the byte copy of a source file's tensors into a new file (`sleb.gguf_io.pruned`, `sleb.gguf_io.deci`), and
`GgufFile`, the base of the GGUF output formats."""

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


# Loaders in llama.cpp that call `load_swa_pattern(ml, period, dense_first)` (src/models/*.cpp; checked in
# the llama.cpp that node-llama-cpp 3.22.1 bundles): a per-layer `{arch}.attention.sliding_window_pattern`
# array in the file wins (bool, uint32 or int32; 1 = sliding window; its length is not checked), else a
# scalar under that key is the period, else the period here. By period, layer il is global where
# il % period == period - 1 (dense_first: where il % period == 0). Each layer's rope base follows the same
# flags (`freq_base_swa` for sliding layers), so the array states everything a removal shifts.
SWA_PATTERN_LOADERS = {"gemma2": (2, False), "gemma3": (6, False), "gemma-embedding": (6, False),
                       "cohere2": (4, False), "cohere2moe": (4, True), "exaone4": (4, False),
                       "exaone-moe": (4, False), "olmo2": (4, False), "gpt-oss": (2, False), "mellum": (4, False),
                       "muse-glimmer": (4, False), "plamo3": (8, False)}

# Architectures whose loader also reads the array, but places more by layer position than a pruned file
# can state: gemma3n shares KV caches from layer 20 on (hard-coded) and stores per-layer inputs in one
# global tensor; llama4 puts no-rope layers and MoE layers every n-th layer. With a sliding window their
# pattern (period here) shifts with any removal.
POSITION_ONLY_PATTERNS = {"gemma3n": 5, "llama4": 4}


def swa_pattern_key(arch: str) -> str:
    return f"{arch}.attention.sliding_window_pattern"


def swa_pattern(reader, arch: str, n: int) -> list[bool] | None:
    """Each layer's sliding-window flag as llama.cpp reads this file, or None where its loader reads none.

    The file's own per-layer array if it has one, else the positional pattern llama.cpp computes (from
    a scalar period under the key, or the architecture's default). SlebError for an array that is not
    one entry per layer (llama.cpp does not check; sleb could not slice it).
    """
    import gguf

    if arch not in SWA_PATTERN_LOADERS:
        return None
    field = reader.get_field(swa_pattern_key(arch))
    if field is not None and field.types[0] == gguf.GGUFValueType.ARRAY:
        values = field.contents()
        if len(values) != n:
            raise SlebError(f"{swa_pattern_key(arch)} has {len(values)} entries for {n} layers")
        return [bool(v) for v in values]
    return positional_swa_pattern(arch, n, None if field is None else int(field.contents()))


def positional_swa_pattern(arch: str, n: int, period: int | None = None) -> list[bool]:
    """The sliding-window flags llama.cpp derives from positions for `n` layers of a SWA_PATTERN_LOADERS
    family (its `set_swa_pattern`), with the family's period unless `period` is given."""
    default, dense_first = SWA_PATTERN_LOADERS[arch]
    period = default if period is None else period
    return [period == 0 or (i % period != 0 if dense_first else i % period < period - 1) for i in range(n)]


def check_layer_pattern(source: str | os.PathLike) -> None:
    """Refuse (BadInput, one line) pruning a GGUF file whose layer pattern a pruned file cannot state.

    Where llama.cpp reads a per-layer `sliding_window_pattern` (SWA_PATTERN_LOADERS), the pruned file
    gets the kept layers' entries (`sleb.gguf_io.pruned`); for the POSITION_ONLY_PATTERNS families,
    removing blocks would shift which layers llama.cpp treats as global (and more), so the pruned file
    would not compute what the pruned model computes.
    """
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch, n = block_count(reader)
    try:
        swa_pattern(reader, arch, n)
    except SlebError as err:
        raise BadInput(f"{Path(source).name}: {err}; cannot keep its layer pattern") from err
    period = POSITION_ONLY_PATTERNS.get(arch)
    if period is None:
        return
    window = field_value(reader, f"{arch}.attention.sliding_window")
    # Without the key llama.cpp applies no window, except llama4, whose chunked attention is the default.
    if window == 0 or (window is None and arch != "llama4"):
        return
    raise BadInput(f"{Path(source).name}: llama.cpp places {arch} layers' attention types (one layer in {period} "
                   f"global, the others attending to the last {window or 8192} tokens) and more by layer position, so "
                   "a pruned .gguf cannot keep the model's pattern; save to a folder instead (-o DIR keeps the "
                   "explicit layer_types)")

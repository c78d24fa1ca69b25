"""Every output format, registered; which one a prune writes (`writer_for`); `save_gguf`.

Each format is a `sleb.writer.Writer` that lives beside its format and is saved by the one routine,
`sleb.writer.save_with`:

- `folder` (`sleb.export.Folder`): a vanilla checkpoint folder;
- `decilm-folder` (`sleb.decilm.DeciLMFolder`): a branch-unit result in the DeciLM layout;
- `gguf-from-gguf` (`sleb.gguf_io.pruned.GgufFromGguf`): a GGUF source without some blocks;
- `gguf-from-hf` (`sleb.gguf_io.from_hf.GgufFromHf`): a Hugging Face model as GGUF (f16, bf16, q8_0);
- `deci-gguf` (`sleb.gguf_io.deci.DeciGguf`): a llama GGUF without some attention layers;
- `quantized-folder` (`sleb.quantize.QuantizedFolder`): what `sleb quantize` writes.

A new format is one writer module (a `Writer` subclass and its tests), one line in `WRITERS` and,
if a prune can write it, its case in `writer_for` (docs/method.md, "Output formats").
"""

from __future__ import annotations

import os
from pathlib import Path

from .decilm import DeciLMFolder
from .errors import SlebError
from .export import Folder
from .gguf_io.deci import DeciGguf, check_deci_source
from .gguf_io.from_hf import GGUF_TYPES, GgufFromHf
from .gguf_io.pruned import GgufFromGguf
from .gguf_io.reader import check_layer_pattern, is_gguf_path
from .loading import resolve
from .quantize import QuantizedFolder
from .settings import OUTPUT_FORMATS
from .units import unit_kind
from .writer import Writer, save_with

WRITERS: dict[str, type[Writer]] = {}


def register(writer: type[Writer]) -> type[Writer]:
    if writer.name in WRITERS:
        raise ValueError(f"an output format named {writer.name!r} is already registered")
    WRITERS[writer.name] = writer
    return writer


for _writer in (Folder, DeciLMFolder, GgufFromGguf, GgufFromHf, DeciGguf, QuantizedFolder):
    register(_writer)

# The writer of each layout a unit kind's result is saved in (`sleb.units.UnitKind`): folders, and GGUF
# files cut from a GGUF source.
FOLDER_LAYOUTS = {"vanilla": lambda unit: Folder(), "decilm": lambda unit: DeciLMFolder(unit=unit)}
GGUF_LAYOUTS = {"any": GgufFromGguf, "deci": DeciGguf}


def writer_for(source: str | os.PathLike, output: str | os.PathLike, out_format: str = "auto", unit: str = "block",
               gguf_type: str | None = None) -> Writer:
    """The writer of a prune's output, decided before loading anything (SlebError, one line, for a
    combination no format writes).

    `out_format` is auto (GGUF exactly when `output` ends in .gguf), gguf or safetensors. A GGUF
    `source` keeps its own quantization (its kept tensors are copied), so `gguf_type` applies only to
    Hugging Face sources. A branch-unit result (`unit` other than block) goes to a DeciLM folder, or,
    from a llama GGUF source, to a deci GGUF file.
    """
    if out_format not in OUTPUT_FORMATS:
        raise SlebError(f"unknown output format {out_format!r}; choose auto, gguf or safetensors")
    if out_format == "safetensors" and is_gguf_path(output):
        raise SlebError(f"--format safetensors writes a folder; {output} ends in .gguf")
    if out_format == "gguf" and not is_gguf_path(output):
        raise SlebError(f"--format gguf needs an output path ending in .gguf, got {output}")
    kind = unit_kind(unit)  # which layouts can hold its result (`UnitKind.folder_layout`, `gguf_layout`)
    if not is_gguf_path(output):
        if gguf_type is not None:
            raise SlebError("--gguf-type applies to GGUF output (an output path ending in .gguf)")
        return FOLDER_LAYOUTS[kind.folder_layout](unit=unit)
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise SlebError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    folder, gguf_file = resolve(source)
    kind.check_gguf(from_gguf=gguf_file is not None)
    if gguf_file is None:
        return GgufFromHf(gguf_type=gguf_type or "f16")
    gguf_source = Path(folder) / gguf_file
    if Path(output).resolve() == gguf_source.resolve():
        raise SlebError(f"the output {output} is the source GGUF file; choose another file")
    if gguf_type is not None:
        raise SlebError("the source is a GGUF file: its kept blocks are copied in their own quantization, so "
                        "--gguf-type does not apply")
    check_layer_pattern(gguf_source)
    if kind.gguf_layout == "deci":
        check_deci_source(gguf_source)  # before the model loads
    return GGUF_LAYOUTS[kind.gguf_layout](source=gguf_source)


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
    (`GgufFromGguf`). Without it, the in-memory model is written in `gguf_type` (f16, bf16, q8_0;
    `GgufFromHf`, whose `write_hf_gguf` says which families). Either way the file is written beside
    `out`, reloaded with transformers (`gguf_file=`) and its logits compared with the in-memory model's
    (for a lossy `gguf_type`: with its weights rounded the same way; a written tokenizer must also
    encode a probe text as `tokenizer` does); only then is it moved into place, so a failure leaves
    nothing behind.

    Args:
        result: the SearchResult whose removals were applied; its `removed` are the blocks dropped
            from `source` unless `removed` is given.
        report: extra fields for the report (model source, calibration spec and seed, ...).
    """
    writer = GgufFromHf(gguf_type=gguf_type) if source is None else GgufFromGguf(source=Path(source), removed=removed)
    save_with(writer, model, tokenizer, out, result, report=report, overwrite=overwrite,
              inputs=[source] if source is not None else (), verify=verify, progress=progress)
    return Path(out)

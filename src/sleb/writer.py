"""An output format as a `Writer`, and `save_with`: the one routine that saves a model through any of them.

Every model output of sleb (a vanilla folder, a DeciLM folder, GGUF from GGUF, GGUF from a Hugging
Face model, a deci GGUF, a quantized folder) is saved by `save_with`, in the same steps:

1. `Writer.prepare`: refuse what the format cannot hold; build the model it holds (a DeciLM model);
2. the output policy (`sleb.outputs`): a folder, or one file and its run file beside it;
3. a temporary place beside the output (`atomic_folder` / `atomic_files`, locked);
4. `Writer.write`: the format's files, written there; it returns entries for the run file;
5. `Writer.reload`: what was written, read back and compared with the in-memory model (unless
   `verify=False`); a mismatch raises CheckFailed and nothing is saved;
6. the run file (`Writer.record`, a `RunRecord`): inside a folder, listing its files with their
   SHA-256 (`write_run_record`); beside a file as `OUT.sleb_report.json`;
7. the move into place and the record of the written files (`sleb.ledger`).

A writer also says, before the search, whether the model fits the format (`check_model`) and about
how many bytes it will write (`size`, for the free-space check). The writers live beside their
formats (`sleb.export`, `sleb.decilm`, `sleb.gguf_io`, `sleb.quantize`); `sleb.saver` registers them
and picks the one a prune writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from .errors import BadInput
from .outputs import NAME_MAX, atomic_files, atomic_folder, check_output_file, check_output_folder, write_run_record
from .runfile import REPORT_SUFFIX, RunRecord, report_path


@dataclass
class SaveJob:
    """One save: the in-memory model (as it is now, pruned), where it goes and what the run file records."""

    model: Any
    tokenizer: Any
    out: Path
    result: Any = None  # the SearchResult whose removals were applied
    progress: bool = True
    saved: Any = None  # the model as the format holds it (`Writer.prepare`); the model itself by default


@dataclass
class Writer:
    """An output format. Subclasses set `name` and `folder` and implement `write`; the rest is optional.

    A writer object is made for one save (its fields are that save's settings: a source file, a
    tensor type) and may keep what `write` found for `reload`.
    """

    name: ClassVar[str]
    folder: ClassVar[bool] = True  # a folder holding its run file; else one file, its run file beside it
    label: ClassVar[str] = "output"  # how messages name a file output ("GGUF")
    suffix: ClassVar[str | None] = None  # the ending a file output's path must have
    copies_tensors: ClassVar[bool] = False  # copies a source file's tensors as they are (weights edited in memory are lost)

    def check_model(self, model, tokenizer) -> None:
        """Before the search: refuse (BadInput, one line) a model this format cannot hold."""

    def size(self, model) -> int | None:
        """About how many bytes the output takes (the free-space check before the search); None: unknown."""
        return None

    def prepare(self, job: SaveJob) -> None:
        """Before the output is touched: refuse what cannot be saved; set `job.saved` if the format holds
        another model than `job.model`."""

    def write(self, job: SaveJob, tmp: Path) -> dict:
        """Write the output into `tmp` (a folder, or the file's temporary path); return run-file entries."""
        raise NotImplementedError

    def reload(self, job: SaveJob, tmp: Path) -> dict:
        """Read back what `write` wrote and compare it with `job.model` (CheckFailed on a mismatch); return
        run-file entries (`reload_max_logit_diff`)."""
        return {}

    def record(self, job: SaveJob, entries: dict) -> RunRecord:
        """The run file of the saved model."""
        return RunRecord.of(job.saved, job.result, **entries)

    def check_output(self, out: str | os.PathLike, *, inputs=(), overwrite: bool = False,
                     need_bytes: int | None = None) -> Path:
        """The output policy (`sleb.outputs`) for this format's output; a file output's run file beside it
        goes through it too (an existing one is replaced only with `overwrite` and only when sleb wrote it)."""
        if self.folder:
            return check_output_folder(out, inputs=inputs, overwrite=overwrite, need_bytes=need_bytes)
        out = Path(out)
        if self.suffix and not str(out).lower().endswith(self.suffix):
            raise BadInput(f"a {self.label} output path must end in {self.suffix}, got {out}")
        room = NAME_MAX - len(REPORT_SUFFIX)
        if len(os.fsencode(out.name)) > room:  # the run file's name beside it would not fit the filesystem
            raise BadInput(f"output {out.name[:40]}...: a {self.label} output's name can have at most {room} bytes "
                           f"(its run file beside it adds {REPORT_SUFFIX} to it, and names have at most {NAME_MAX})")
        check_output_file(out, inputs=inputs, overwrite=overwrite, need_bytes=need_bytes, label="output")
        check_output_file(report_path(out), inputs=inputs, overwrite=overwrite, label="output")
        return out


def save_with(writer: Writer, model, tokenizer, out: str | os.PathLike, result=None, *, report: dict | None = None,
              overwrite: bool = False, inputs=(), verify: bool = True, progress: bool = True,
              after_write: Callable[[Path], None] | None = None) -> RunRecord:
    """Save `model` to `out` through `writer` (the steps in the module docstring); returns the run record written.

    Args:
        result: the SearchResult whose removals were applied (recorded in the run file).
        report: extra run-file entries (model source, calibration spec and seed, the run's settings).
        overwrite: replace an earlier sleb output at `out` (only files sleb wrote, unchanged since).
        inputs: local paths the run read: the output may not be, contain or lie in them.
        verify: run the writer's reload check.
        after_write: called with the written (temporary) output after the reload check, before the run file is
            made: what it records in `result` goes into the run file (the .gguf output timed in llama.cpp).
    """
    job = SaveJob(model, tokenizer, Path(out), result, progress, saved=model)
    writer.prepare(job)
    writer.check_output(job.out, inputs=inputs, overwrite=overwrite)
    entries = dict(report or {})
    if writer.folder:
        with atomic_folder(job.out, replace=overwrite) as tmp:
            record = _write(writer, job, tmp, entries, verify, after_write)
            write_run_record(tmp, record)
    else:
        # Temporaries beside `out` (the same file system for the rename), with the same endings.
        with atomic_files(job.out, report_path(job.out)) as (tmp, tmp_report):
            record = _write(writer, job, tmp, entries, verify, after_write)
            record.write(tmp_report)
    return record


def _write(writer: Writer, job: SaveJob, tmp: Path, entries: dict, verify: bool,
           after_write: Callable[[Path], None] | None = None) -> RunRecord:
    entries.update(writer.write(job, tmp))
    if verify:
        entries.update(writer.reload(job, tmp))
    if after_write is not None:
        after_write(tmp)
    return writer.record(job, entries)

"""The one saver: every output format a registered `Writer` (`sleb.saver`), saved by `sleb.writer.save_with`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from sleb.decilm import DeciLMFolder
from sleb.errors import BadInput, CheckFailed, SlebError
from sleb.export import Folder
from sleb.gguf_io.deci import DeciGguf
from sleb.gguf_io.from_hf import GgufFromHf
from sleb.gguf_io.pruned import GgufFromGguf
from sleb.ledger import sha256
from sleb.saver import WRITERS, save_gguf, writer_for
from sleb.writer import SaveJob, Writer, save_with

from tiny_models import family_model, save_tiny


def test_every_output_format_is_registered_once():
    assert set(WRITERS) == {"folder", "decilm-folder", "gguf-from-gguf", "gguf-from-hf", "deci-gguf",
                            "quantized-folder"}
    for name, writer in WRITERS.items():
        assert writer.name == name and issubclass(writer, Writer)
        assert writer.folder or writer.suffix  # a file output says how its path ends


def test_writer_for_picks_the_format_of_each_source_output_and_unit(tiny_tokenizer, tmp_path):
    folder = save_tiny(tmp_path / "m")
    source = save_gguf(family_model("llama", layers=3), tiny_tokenizer, tmp_path / "m.gguf", progress=False)
    out_dir, out_gguf = tmp_path / "o", tmp_path / "o.gguf"
    assert writer_for(folder, out_dir) == Folder()
    assert writer_for(folder, out_dir, unit="sublayer") == DeciLMFolder(unit="sublayer")
    assert writer_for(source, out_dir, unit="attention") == DeciLMFolder(unit="attention")
    assert writer_for(folder, out_gguf, gguf_type="q8_0") == GgufFromHf(gguf_type="q8_0")
    assert writer_for(source, out_gguf) == GgufFromGguf(source=source)
    assert writer_for(source, out_gguf, unit="attention") == DeciGguf(source=source)
    assert writer_for(source, out_gguf, unit="sublayer") == DeciGguf(source=source)
    assert writer_for(source, out_gguf).copies_tensors and not writer_for(folder, out_gguf).copies_tensors
    for args, words in [((folder, out_gguf, "auto", "attention"), "writes GGUF from a GGUF source"),
                        ((folder, out_gguf, "auto", "sublayer"), "writes GGUF from a GGUF source"),
                        ((folder, out_gguf, "safetensors"), "writes a folder"),
                        ((folder, out_dir, "gguf"), "needs an output path ending in .gguf"),
                        ((source, source), "is the source GGUF file")]:
        with pytest.raises(SlebError, match=words):
            writer_for(*args)
    with pytest.raises(SlebError, match="applies to GGUF output"):
        writer_for(folder, out_dir, gguf_type="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.gguf", "m.gguf.sleb_report.json"]


@dataclass
class Notes(Writer):
    """A toy format: one text file in a folder, its reload check reading it back."""

    name: ClassVar[str] = "notes"
    text: str = "kept"
    written: str | None = None  # what lands on disk, when not `text` (a broken writer)

    def write(self, job: SaveJob, tmp: Path) -> dict:
        (tmp / "notes.txt" if self.folder else tmp).write_text(self.written or self.text)
        return {"gguf": {"writer": self.name}}  # any run-file entry the record knows

    def reload(self, job: SaveJob, tmp: Path) -> dict:
        got = (tmp / "notes.txt" if self.folder else tmp).read_text()
        if got != self.text:
            raise CheckFailed(f"the saved notes read {got!r}; not saved")
        return {"reload_max_logit_diff": 0.0}


@dataclass
class Note(Notes):
    name: ClassVar[str] = "note"
    folder: ClassVar[bool] = False
    label: ClassVar[str] = "note"
    suffix: ClassVar[str] = ".txt"


def test_save_with_runs_every_step_for_any_writer(tmp_path):
    model = family_model("llama", layers=2)
    with pytest.raises(CheckFailed, match="read 'lost'"):
        save_with(Notes(written="lost"), model, None, tmp_path / "out")
    with pytest.raises(CheckFailed):
        save_with(Note(written="lost"), model, None, tmp_path / "n.txt")
    assert list(tmp_path.iterdir()) == []  # a failed reload check leaves nothing behind

    record = save_with(Notes(), model, None, tmp_path / "out", report={"source": "toy"})
    run = json.loads((tmp_path / "out" / "sleb_report.json").read_text())
    assert run["source"] == "toy" and run["gguf"] == {"writer": "notes"} and run["reload_max_logit_diff"] == 0.0
    assert run["files"] == ["notes.txt", "sleb_report.json"]
    assert run["file_sha256"] == {"notes.txt": sha256(tmp_path / "out" / "notes.txt")} == record.file_sha256
    with pytest.raises(BadInput, match="already exists"):
        save_with(Notes(), model, None, tmp_path / "out")
    save_with(Notes(text="new"), model, None, tmp_path / "out", overwrite=True)  # sleb's own output: replaced
    assert (tmp_path / "out" / "notes.txt").read_text() == "new"

    save_with(Note(), model, None, tmp_path / "n.txt", verify=False)
    beside = json.loads((tmp_path / "n.txt.sleb_report.json").read_text())
    assert (tmp_path / "n.txt").read_text() == "kept" and "reload_max_logit_diff" not in beside
    with pytest.raises(BadInput, match="a note output path must end in .txt"):
        save_with(Note(), model, None, tmp_path / "n.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.txt", "n.txt.sleb_report.json", "out"]

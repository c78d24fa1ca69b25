"""`sleb report`: Markdown, the three plots, eval tables and dense/pruned generations of a prune run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import sleb
from sleb import eval_table
from sleb.cli import main
from sleb.plots import plot_names, step_perplexities

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import offline_tokenizer, save_model, tiny_llama, write_text  # noqa: E402

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished `sleb prune` run on a tiny random 5-block Llama, plus an eval JSON beside it."""
    root = tmp_path_factory.mktemp("run")
    tokenizer = offline_tokenizer()
    dense = save_model(tiny_llama(tokenizer, layers=5), tokenizer, root / "dense")
    text = write_text(root / "calib.txt")
    run = root / "pruned"
    result = CliRunner().invoke(main, ["prune", str(dense), "-o", str(run), "--calib", str(text), "--nsamples", "2",
                                       "--seqlen", "32", "--remove", "2"])
    assert result.exit_code == 0, result.output
    model, tok = sleb.load(str(run))
    row = eval_table.ModelEval(str(run), 3, sum(p.numel() for p in model.parameters()))
    row.perplexity[str(text)] = sleb.perplexity(model, tok, str(text), seqlen=32, max_windows=2, progress=False)
    eval_table.write([row], json_path=run / "eval.json")
    return run


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_report_writes_markdown_and_three_pngs(run_dir, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(run_dir), "-o", str(out), "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "sleb_report.json").read_text())
    md = (out / "report.md").read_text()
    assert {"scores_heatmap.png", "first_step_scores.png", "calibration_ppl.png"} <= set(plot_names(report))
    for name in plot_names(report):
        width, height = _png_size(out / name)
        assert width > 300 and height > 200
        assert f"]({name})" in md
    assert f"Removed {len(report['removed'])} of 5 blocks" in md
    assert str(report["removed"]) in md
    # One row per search step, naming the block removed at that step.
    for step, block in enumerate(report["removed"], 1):
        assert f"| {step} | {block} |" in md
    assert "From `eval.json`" in md and "ppl " in md
    # Generations: both columns filled (the dense source folder is loadable), one row per prompt.
    gen_rows = [ln for ln in md.split("## Sample generations")[1].splitlines() if ln.startswith("| ")][1:]
    assert len(gen_rows) == len(sleb.report.PROMPTS)
    assert all("(not available)" not in ln for ln in gen_rows)


def test_report_given_the_run_file_of_a_folder_output(run_dir, tmp_path):
    """The run file's path is a spelling of its folder: the pruned model loads from the folder."""
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(run_dir / "sleb_report.json"), "-o", str(out),
                                       "--max-new-tokens", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "From `eval.json`" in md and "## Sample generations" in md


def test_report_without_a_loadable_dense_model(run_dir, tmp_path):
    moved = tmp_path / "run"
    moved.mkdir()
    for f in run_dir.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    report = json.loads((moved / "sleb_report.json").read_text())
    report["source"] = str(tmp_path / "gone")
    (moved / "sleb_report.json").write_text(json.dumps(report))
    path = sleb.write_report(moved, max_new_tokens=3)
    md = path.read_text()
    assert "Dense column missing" in md and "(not available)" in md
    assert sorted(p.name for p in moved.glob("*.png")) == sorted(plot_names(report))


def test_step_perplexities_convert_summed_losses(run_dir):
    report = json.loads((run_dir / "sleb_report.json").read_text())
    steps = step_perplexities(report)
    n = report["calibration"]["nsamples"]
    for k, removed in enumerate(report["removed"], 1):
        # The winner of each step gives the calibration perplexity recorded after k removals.
        assert steps[k - 1][removed] == pytest.approx(report["calibration_ppl_by_removed"][k], rel=1e-9)
        assert min(steps[k - 1].values()) == steps[k - 1][removed]
    assert n == 2


def test_report_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    for target in (tmp_path / "missing", tmp_path):
        result = runner.invoke(main, ["report", str(target), "--no-generate"])
        assert result.exit_code == 1
        assert [ln for ln in result.output.splitlines() if ln.strip()] == [
            ln for ln in result.output.splitlines() if ln.startswith("Error:")
        ]


def test_report_of_an_applied_order(run_dir, tmp_path):
    """An order applied with --from-report records no steps: the report says so and draws what it has."""
    moved = tmp_path / "applied"
    moved.mkdir()
    for f in run_dir.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    report = json.loads((moved / "sleb_report.json").read_text())
    report.update(steps=[], from_report={"source": "elsewhere", "applied": len(report["removed"]),
                                         "recorded": len(report["removed"]), "metric": "sleb"})
    (moved / "sleb_report.json").write_text(json.dumps(report))
    md = sleb.write_report(moved, generate=False).read_text()
    assert "No search ran" in md and "no search (an applied order)" in md
    assert sorted(p.name for p in moved.glob("*.png")) == ["calibration_ppl.png"]


def test_report_of_a_gguf_output_under_each_spelling(tiny_tokenizer, tmp_path, monkeypatch):
    """A .gguf output's run file lies beside it (OUT.gguf.sleb_report.json): `sleb report` finds it from the
    .gguf file or the run file, and writes into OUT.gguf.report/ (reports of several files in one folder
    would replace each other's report.md)."""
    monkeypatch.setenv("SLEB_CACHE", str(tmp_path / "cache"))  # the .gguf is converted for the generations
    from tiny_models import save_tiny

    dense = save_tiny(tmp_path / "dense", layers=5, tokenizer=tiny_tokenizer)  # byte-level BPE: GGUF can hold it
    text = write_text(tmp_path / "calib.txt")
    out = tmp_path / "pruned.gguf"
    result = CliRunner().invoke(main, ["prune", str(dense), "-o", str(out), "--calib", str(text), "--nsamples", "2",
                                       "--seqlen", "32", "--remove", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pruned.gguf.sleb_report.json").is_file()
    removed = json.loads((tmp_path / "pruned.gguf.sleb_report.json").read_text())["removed"]
    folder = tmp_path / "pruned.gguf.report"
    first = CliRunner().invoke(main, ["report", str(out), "--max-new-tokens", "3", "--device", "cpu"])
    assert first.exit_code == 0, first.output
    md = (folder / "report.md").read_text()
    assert str(removed) in md and "## Sample generations" in md
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(plot_names(json.loads(
        (tmp_path / "pruned.gguf.sleb_report.json").read_text())))
    again = CliRunner().invoke(main, ["report", str(tmp_path / "pruned.gguf.sleb_report.json"), "--no-generate",
                                      "--overwrite"])
    assert again.exit_code == 0, again.output
    assert str(removed) in (folder / "report.md").read_text()
    elsewhere = CliRunner().invoke(main, ["report", str(out), "--no-generate", "-o", str(tmp_path / "r")])
    assert elsewhere.exit_code == 0 and (tmp_path / "r" / "report.md").is_file(), elsewhere.output
    # A .gguf file without a run file beside it: said as such, in one line.
    (tmp_path / "other.gguf").write_bytes(out.read_bytes())
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "other.gguf"), "--no-generate"])
    assert missing.exit_code == 1 and "no run file other.gguf.sleb_report.json" in missing.output, missing.output

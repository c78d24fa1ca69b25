"""The command line: one clear line and a non-zero exit for bad input; a real prune end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sleb.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_ratio_rounds_up_as_in_the_paper():
    from sleb import Budget

    assert Budget(ratio=0.2).count(32) == 7
    assert Budget(ratio=0.1).count(30) == 3
    assert Budget(ratio=0.25).count(32) == 8
    assert Budget(remove=4).count(32) == 4 and Budget(target_params=0.8).count(32) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "m", "-o", "x", "--ratio", "1.5"], "must be in (0, 1)"),
        (["prune", "m", "-o", "x"], "give a budget"),
        (["prune", "m", "-o", "x", "--remove", "2", "--ratio", "0.2"], "at most one of"),
        (["prune", "m", "-o", "x", "--remove", "2", "--calib", "nope"], "unknown text spec"),
        (["prune", "m", "-o", "x", "--remove", "2", "--dtype", "int3"], "int3"),
        (["prune", "m", "-o", "x", "--remove", "0"], "at least 1"),
    ],
)
def test_bad_arguments_fail_before_loading(args, message):
    result = run(*args)
    assert result.exit_code != 0
    assert message in result.output


def test_existing_output_and_impossible_counts(tiny_folder, tmp_path):
    folder, text = tiny_folder
    existing = tmp_path / "exists"
    existing.mkdir()
    result = run("prune", str(folder), "-o", str(existing), "--remove", "1", "--calib", str(text))
    assert result.exit_code == 1 and "already exists" in result.output
    result = run("prune", str(folder), "-o", str(tmp_path / "o"), "--remove", "5", "--calib", str(text),
                 "--nsamples", "2", "--seqlen", "16")
    assert result.exit_code == 1 and "every candidate" in result.output
    result = run("prune", str(folder), "-o", str(tmp_path / "o"), "--remove", "4", "--calib", str(text),
                 "--nsamples", "2", "--seqlen", "16")
    assert result.exit_code == 1 and "every candidate" in result.output
    result = run("prune", str(folder), "-o", str(tmp_path / "o"), "--remove", "1", "--calib", str(text),
                 "--seqlen", "4096")
    assert result.exit_code == 1 and "context" in result.output
    assert not (tmp_path / "o").exists()


def test_missing_model_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sleb.cli", "prune", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "o"),
         "--remove", "1", "--calib", "gensim-lee"],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("Error: model folder not found")


def test_prune_end_to_end(tiny_folder, tmp_path):
    folder, text = tiny_folder
    out = tmp_path / "pruned"
    result = run("prune", str(folder), "-o", str(out), "--ratio", "0.3", "--calib", str(text),
                 "--nsamples", "3", "--seqlen", "16", "--batch-size", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "removed 2 of 6 blocks" in result.output and "calibration perplexity" in result.output
    report = json.loads((out / "sleb_report.json").read_text())
    assert report["calibration"] == {**report["calibration"], "spec": str(text), "nsamples": 3, "seqlen": 16, "seed": 0}
    assert len(report["steps"]) == 2 and report["source"] == str(folder)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


@pytest.mark.slow
def test_prune_offline_model(tmp_path):
    """The README's default job, at a size a test can afford."""
    out = tmp_path / "smol"
    result = run("prune", "smollm2-135m", "-o", str(out), "--remove", "1", "--calib", "gensim-wiki",
                 "--nsamples", "1", "--seqlen", "32", "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sleb_report.json").read_text())
    assert report["blocks_before"] == 30 and report["blocks_after"] == 29
    assert report["removed"][0] not in (0, 29)


def test_prune_with_disk_offload(tiny_folder, tmp_path):
    """--offload-dir: same removals as in memory, a plain checkpoint out, and the scratch folder gone after."""
    folder, text = tiny_folder
    common = ["--remove", "2", "--calib", str(text), "--nsamples", "3", "--seqlen", "16", "--device", "cpu"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "mine.txt").write_text("a user's file")
    streamed = run("prune", str(folder), "-o", str(tmp_path / "streamed"), "--offload-dir", str(scratch), *common)
    assert streamed.exit_code == 0, streamed.output
    assert run("prune", str(folder), "-o", str(tmp_path / "in_memory"), *common).exit_code == 0
    removed = [json.loads((tmp_path / name / "sleb_report.json").read_text())["removed"]
               for name in ("streamed", "in_memory")]
    assert removed[0] == removed[1]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").config.num_hidden_layers == 4
    # Written a block per shard (transformers brings offloaded weights in a shard at a time), with the
    # same tensors as the in-memory run's single file.
    shards = sorted((tmp_path / "streamed").glob("*.safetensors"))
    assert len(shards) >= 4 and len(list((tmp_path / "in_memory").glob("*.safetensors"))) == 1
    streamed_weights = {k: v for shard in shards for k, v in load_file(shard).items()}
    in_memory_weights = load_file(tmp_path / "in_memory" / "model.safetensors")
    assert streamed_weights.keys() == in_memory_weights.keys()
    assert all(torch.equal(streamed_weights[k], in_memory_weights[k]) for k in in_memory_weights)
    assert [p.name for p in scratch.iterdir()] == ["mine.txt"]
    inside = run("prune", str(folder), "-o", str(tmp_path / "x"), "--offload-dir", str(folder / "off"), *common)
    assert inside.exit_code != 0 and "offload-dir" in inside.output and not (folder / "off").exists()


def test_prune_racing(tiny_folder, tmp_path):
    folder, text = tiny_folder
    args = ["prune", str(folder), "--remove", "2", "--calib", str(text), "--nsamples", "6", "--seqlen", "16",
            "--racing", "--confidence", "0.9", "--tolerance", "0.002"]
    result = run(*args, "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "racing (confidence 0.9, tolerance 0.002)" in result.output
    report = json.loads((tmp_path / "out" / "sleb_report.json").read_text())
    assert report["racing"] == {"confidence": 0.9, "min_windows": 4, "tolerance": 0.002, "guesses": 2}
    assert set(report["steps"][0]["kinds"]) == set(report["steps"][0]["scores"])
    result = run(*args, "-o", str(tmp_path / "x"), "--metric", "cosine")
    assert result.exit_code != 0 and "--racing" in result.output


def test_an_input_name_too_long_for_the_filesystem_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sleb.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["eval", "x" * 300, "--ppl", "gensim-wiki"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "longer than the filesystem allows" in lines[0], result.output

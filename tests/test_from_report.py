"""`sleb prune --from-report` and the CLI's one-line errors, on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tokenizers import ByteLevelBPETokenizer
from tiny_models import save_tiny as save_tiny_llama
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from sleb.cli import main

TEXT = " ".join(f"the {w} block number {i} is redundant or not, said the model." for i, w in
                enumerate(["first", "second", "third", "fourth", "fifth"] * 40))


def save_tiny(folder, seed: int, layers: int = 6):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    return save_tiny_llama(folder, layers=layers, seed=seed, tokenizer=tok, vocab_size=len(tok),
                           initializer_range=0.2, context=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text = root / "calib.txt"
    text.write_text(TEXT)
    return root, save_tiny(root / "a", 0), save_tiny(root / "b", 1), save_tiny(root / "c", 0, layers=7), str(text)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(output: str) -> str:
    """The single error line (loading progress on stderr is mixed into the runner's output)."""
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    return errors[0]


def common(text):
    return ["--calib", text, "--nsamples", 3, "--seqlen", 16, "--dtype", "float32", "--device", "cpu"]


def test_from_report_equals_a_fresh_search(setup):
    root, a, _, _, text = setup
    full = run("prune", a, "-o", root / "full", "--remove", 3, *common(text))
    assert full.exit_code == 0, full.output
    report = json.loads((root / "full" / "sleb_report.json").read_text())
    assert report["model_fingerprint"]["blocks"] == 6 and report["budget"]["stopped_by"] == "remove"

    applied = run("prune", a, "-o", root / "applied", "--from-report", root / "full" / "sleb_report.json",
                  "--remove", 2, "--dtype", "float32", "--device", "cpu")
    assert applied.exit_code == 0, applied.output
    fresh = run("prune", a, "-o", root / "fresh", "--remove", 2, *common(text))
    assert fresh.exit_code == 0, fresh.output
    got = json.loads((root / "applied" / "sleb_report.json").read_text())
    want = json.loads((root / "fresh" / "sleb_report.json").read_text())
    assert got["removed"] == want["removed"] == report["removed"][:2]
    assert got["blocks_after"] == want["blocks_after"] == 4
    ids = torch.arange(1, 12)[None]
    m1 = AutoModelForCausalLM.from_pretrained(root / "applied")
    m2 = AutoModelForCausalLM.from_pretrained(root / "fresh")
    assert torch.equal(m1(ids).logits, m2(ids).logits)

    # A report from another model: same block count but other weights, or another block count.
    for other, words in ((setup[2], "another model"), (setup[3], "6 blocks")):
        bad = run("prune", other, "-o", root / "bad", "--from-report", root / "full", "--remove", 2,
                  "--dtype", "float32", "--device", "cpu")
        assert bad.exit_code == 1 and words in error_line(bad.output), bad.output
    too_many = run("prune", a, "-o", root / "bad", "--from-report", root / "full", "--remove", 4)
    assert too_many.exit_code == 1 and "records 3 removals" in too_many.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--remove", 2, "--metric", "nope"], "unknown metric 'nope'"),
        (["--target-params", 0.01], "cannot be met"),
        (["--remove", 4], "removes every candidate"),
        (["--max-ppl-increase", 0.9], "above 1"),
    ],
)
def test_cli_bad_input_is_one_line(setup, args, message):
    root, a, _, _, text = setup
    result = run("prune", a, "-o", root / "never", *args, *common(text))
    assert result.exit_code == 1, result.output
    assert message in error_line(result.output), result.output
    assert not (root / "never").exists()


def test_cli_metric_refine_and_compare(setup):
    root, a, _, _, text = setup
    out = run("prune", a, "-o", root / "cos", "--metric", "block-influence", "--ratio", 0.3, "--refine", "swap",
              *common(text))
    assert out.exit_code == 0, out.output
    report = json.loads((root / "cos" / "sleb_report.json").read_text())
    assert report["metric"] == "cosine" and report["refine"]["loss"] <= report["refine"]["greedy_loss"]
    assert "refined" in out.output


def test_a_run_file_of_sleb_0_1_still_applies_and_round_trips(tmp_path, monkeypatch):
    """tests/data/sleb_report_0.1.json was written by sleb 0.1 (before RunRecord) for tiny_models.save_tiny(layers=5):
    it still reads, re-applies with --from-report, and `RunRecord` writes back every entry it read."""
    from pathlib import Path

    from tiny_models import save_tiny as tiny

    from sleb.runfile import RunRecord

    old = Path(__file__).parent / "data" / "sleb_report_0.1.json"
    record = RunRecord.read(old)
    assert record.to_dict() == json.loads(old.read_text())  # nothing lost or reshaped
    assert record.result().removed == [3, 1]
    tiny(tmp_path / "tiny", layers=5)
    monkeypatch.chdir(tmp_path)
    done = run("prune", "tiny", "-o", "out", "--from-report", old, "--remove", "1", "--device", "cpu")
    assert done.exit_code == 0, done.output
    applied = json.loads((tmp_path / "out" / "sleb_report.json").read_text())
    assert applied["removed"] == [3] and applied["from_report"]["recorded"] == 2

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
                  "--remove", 2, *common(text))
    assert applied.exit_code == 0, applied.output
    fresh = run("prune", a, "-o", root / "fresh", "--remove", 2, *common(text))
    assert fresh.exit_code == 0, fresh.output
    got = json.loads((root / "applied" / "sleb_report.json").read_text())
    want = json.loads((root / "fresh" / "sleb_report.json").read_text())
    assert got["removed"] == want["removed"] == report["removed"][:2]
    # Measured on the same windows as the fresh search, not copied: the same calibration perplexities.
    assert got["calibration_ppl_by_removed"] == pytest.approx(want["calibration_ppl_by_removed"], rel=1e-9)
    assert got["steps"] == [] and got["from_report"]["applied"] == 2 and "search took" not in applied.output
    assert got["blocks_after"] == want["blocks_after"] == 4
    ids = torch.arange(1, 12)[None]
    m1 = AutoModelForCausalLM.from_pretrained(root / "applied")
    m2 = AutoModelForCausalLM.from_pretrained(root / "fresh")
    assert torch.equal(m1(ids).logits, m2(ids).logits)

    # A report from another model: same block count but other weights, or another block count.
    for other, words in ((setup[2], "another model"), (setup[3], "6 blocks")):
        bad = run("prune", other, "-o", root / "bad", "--from-report", root / "full", "--remove", 2, *common(text))
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
    (tmp_path / "calib.txt").write_text(TEXT)
    done = run("prune", "tiny", "-o", "out", "--from-report", old, "--remove", "1", "--device", "cpu",
               "--calib", "calib.txt", "--nsamples", 2, "--seqlen", 16)
    assert done.exit_code == 0, done.output
    applied = json.loads((tmp_path / "out" / "sleb_report.json").read_text())
    assert applied["removed"] == [3] and applied["from_report"]["recorded"] == 2



def test_the_unit_of_a_run_file_is_read_in_one_place():
    """A run file that names no unit (a block search, or one written before units) removed blocks: `RunRecord.unit`
    says so, and the modules that read run files read them through `RunRecord` instead of defaulting its fields."""
    from pathlib import Path

    import sleb.runfile
    from sleb.runfile import RunRecord

    old = Path(__file__).parent / "data" / "sleb_report_0.1.json"
    record = RunRecord.read(old)
    assert "unit" not in json.loads(old.read_text()) and record.unit == record.result().unit == "block"
    assert RunRecord(search={"unit": "sublayer"}).unit == "sublayer"
    src = Path(sleb.runfile.__file__).parent
    for name in ("report", "plots", "compare", "pipeline"):
        text = (src / f"{name}.py").read_text(encoding="utf-8")
        assert '.get("unit"' not in text and "load_run" not in text, f"{name}.py reads a run file by itself"

def test_from_report_measures_what_it_prints_and_honours_eval(setup):
    """#29: a hand-edited calibration_ppl_by_removed is never printed, --eval runs, and the held-out
    perplexity equals the original run's for the same removal."""
    root, a, _, _, text = setup
    held = root / "held.txt"
    held.write_text(TEXT.replace("redundant", "needed"))
    first = run("prune", a, "-o", root / "orig", "--remove", 2, "--eval", held, "--eval-windows", 2, *common(text))
    assert first.exit_code == 0, first.output
    orig = json.loads((root / "orig" / "sleb_report.json").read_text())
    edited = dict(orig, calibration_ppl_by_removed=[1.0, 2.0, 3.0], calibration_ppl_before=1.0,
                  calibration_ppl_after=3.0)
    (root / "edited.json").write_text(json.dumps(edited))
    again = run("prune", a, "-o", root / "again", "--from-report", root / "edited.json", "--remove", 2,
                "--eval", held, "--eval-windows", 2, *common(text))
    assert again.exit_code == 0, again.output
    assert "1.00 dense -> 3.00 pruned" not in again.output
    got = json.loads((root / "again" / "sleb_report.json").read_text())
    assert got["calibration_ppl_by_removed"] == pytest.approx(orig["calibration_ppl_by_removed"], rel=1e-9)
    assert got["heldout_ppl"]["pruned"] == pytest.approx(orig["heldout_ppl"]["pruned"], rel=1e-9)
    assert f"pruned {orig['heldout_ppl']['pruned']:.3f}" in again.output
    assert got["config"]["metric"] == got["metric"] == orig["metric"]


@pytest.mark.parametrize("edit, words", [
    ({"removed": [0, 4]}, "inside the barriers"),
    ({"removed": [4, 1]}, "steps[0] removed"),
    ({"kept": [0, 1, 2]}, "contradicts removed"),
    ({"model_fingerprint": "x"}, "model_fingerprint must be"),
    ({"format": "sleb-report/9"}, "this sleb reads"),
])
def test_from_report_refuses_contradicting_run_files(setup, edit, words):
    root, a, _, _, text = setup
    if not (root / "orig2").exists():
        assert run("prune", a, "-o", root / "orig2", "--remove", 2, *common(text)).exit_code == 0
    orig = json.loads((root / "orig2" / "sleb_report.json").read_text())
    if "removed" in edit:  # keep kept consistent, so the contradiction tested is the one named
        edit = dict(edit, kept=[b for b in range(6) if b not in edit["removed"]])
    (root / "bad.json").write_text(json.dumps({**orig, **edit}))
    bad = run("prune", a, "-o", root / "never", "--from-report", root / "bad.json", "--remove", 2, *common(text))
    assert bad.exit_code == 1 and words in error_line(bad.output), bad.output
    assert not (root / "never").exists()


@pytest.mark.parametrize("flag", [["--metric", "cosine"], ["--early-barrier", 2], ["--checkpoint", "ck.json"],
                                  ["--racing"], ["--confidence", 0.8], ["--tolerance", 0.01],
                                  ["--racing-guesses", 3], ["--refine-seconds", 5], ["--beam", 2],
                                  ["--max-ppl-increase", 2.0]])
def test_from_report_refuses_search_options(setup, flag):
    """#29: options that belong to a search are refused with --from-report, in one line, before loading."""
    root, a, _, _, text = setup
    if not (root / "orig3").exists():
        assert run("prune", a, "-o", root / "orig3", "--remove", 2, *common(text)).exit_code == 0
    bad = run("prune", a, "-o", root / "never", "--from-report", root / "orig3", "--remove", 2, *flag, *common(text))
    assert bad.exit_code in (1, 2) and not (root / "never").exists(), bad.output
    assert flag[0] in bad.output and "Loading" not in bad.output, bad.output


@pytest.mark.parametrize("flag, parent", [(["--heal-minutes", 1], "--heal"), (["--heal-steps", 3], "--heal"),
                                          (["--confidence", 0.8], "--racing"), (["--tolerance", 0.01], "--racing"),
                                          (["--compensate-ridge", 0.1], "--compensate"),
                                          (["--compensate-top-k", 3], "--compensate-aware"),
                                          (["--eval-windows", 2], "--eval"), (["--refine-seconds", 3], "--refine")])
def test_an_option_without_its_parent_is_refused(setup, flag, parent):
    """#29: an option is honoured or refused, never accepted and ignored (even at its default value)."""
    root, a, _, _, text = setup
    bad = run("prune", a, "-o", root / "never", "--remove", 2, *flag, *common(text))
    assert bad.exit_code == 1, bad.output
    line = error_line(bad.output)
    assert flag[0] in line and parent in line, line
    assert not (root / "never").exists()


def test_an_option_without_its_parent_is_refused_in_the_api(setup):
    from sleb.config import Budget, Compensation, Healing, PruneConfig
    from sleb.errors import BadInput

    root, a, _, _, text = setup
    for part in ({"heal": Healing(minutes=1.0)}, {"compensation": Compensation(ridge=0.5)}):
        with pytest.raises(BadInput, match="applies only with"):
            PruneConfig(str(a), str(root / "never"), Budget(remove=1), **part).validate()


def test_a_checkpoint_of_another_search_is_refused_before_loading(setup, monkeypatch):
    """#29: the checkpoint records every setting that changes the picks and is refused on any
    difference before the model loads (here: racing settings and the window count)."""
    from sleb import loading

    root, a, _, _, text = setup
    ck = root / "search.ck.json"
    done = run("prune", a, "-o", root / "ck-out", "--remove", 2, "--racing", "--checkpoint", ck, *common(text))
    assert done.exit_code == 0, done.output

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", never)
    for change, words in ((["--racing", "--confidence", 0.8], "racing"), ([], "racing"),
                          (["--racing", "--nsamples", 2], "nsamples"), (["--racing", "--seed", 3], "seed")):
        args = [*common(text), *change]
        bad = run("prune", a, "-o", root / "never", "--remove", 2, "--checkpoint", ck, *args)
        assert bad.exit_code == 1 and words in error_line(bad.output), bad.output


def test_from_report_finds_the_run_file_of_a_gguf_output(tmp_path):
    """`--from-report OUT.gguf` reads the run file beside it (OUT.gguf.sleb_report.json)."""
    from sleb.runfile import load_run

    (tmp_path / "out.gguf").write_bytes(b"GGUF")
    with pytest.raises(Exception, match="no run file out.gguf.sleb_report.json"):
        load_run(tmp_path / "out.gguf")
    old = json.loads((__import__("pathlib").Path(__file__).parent / "data" / "sleb_report_0.1.json").read_text())
    (tmp_path / "out.gguf.sleb_report.json").write_text(json.dumps(old))
    assert load_run(tmp_path / "out.gguf")["removed"] == old["removed"]

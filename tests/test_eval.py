"""`sleb.perplexity`, zero-shot through lm-eval, and the `sleb eval` command."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import sleb
from sleb import eval_table
from sleb.cli import main
from sleb.data import eval_windows

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import TASK_NAME, offline_tokenizer, save_model, tiny_llama, write_task, write_text  # noqa: E402

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install 'sleb[eval]')")


@pytest.fixture(scope="module")
def tokenizer():
    return offline_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "sample.txt")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer, tiny):
    """A 'dense' 4-block model and a 'pruned' copy with blocks 1 and 2 removed, saved as folders."""
    root = tmp_path_factory.mktemp("models")
    dense = save_model(tiny, tokenizer, root / "dense")
    pruned_model = tiny_llama(tokenizer)
    sleb.remove_blocks(pruned_model, [1, 2])
    pruned = save_model(pruned_model, tokenizer, root / "pruned")
    return dense, pruned


@torch.no_grad()
def reference_perplexity(model, tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> float:
    """The protocol written out independently: one stream, non-overlapping windows, tail dropped,
    BOS first when the tokenizer adds one, exp(sum of token NLLs / number of predicted tokens)."""
    with_special = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    use_bos = bos is not None and len(with_special) > len(tokenizer("a", add_special_tokens=False)["input_ids"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = seqlen - 1 if use_bos else seqlen
    count = len(ids) // body if max_windows is None else min(max_windows, len(ids) // body)
    nll, tokens = 0.0, 0
    for i in range(count):
        window = ([bos] if use_bos else []) + ids[i * body : (i + 1) * body]
        x = torch.tensor([window])
        logits = model(input_ids=x).logits[0, :-1].double()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        tokens += len(window) - 1
    return math.exp(nll / tokens)


def test_perplexity_matches_independent_protocol(tiny, tokenizer, text_file):
    result = sleb.perplexity(tiny, tokenizer, str(text_file), seqlen=48, batch_size=4, progress=False)
    expected = reference_perplexity(tiny, tokenizer, text_file.read_text(), 48)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.windows == len(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]) // 48
    assert result.tokens == result.windows * 47
    assert "non-overlapping windows of 48 tokens" in result.protocol


def test_perplexity_does_not_depend_on_batch_size(tiny, tokenizer, text_file):
    results = [sleb.perplexity(tiny, tokenizer, str(text_file), seqlen=40, batch_size=b, progress=False)
               for b in (1, 3, 32)]
    assert results[0].windows > 3  # several batches, the last one ragged for batch size 3
    for other in results[1:]:
        assert other.ppl == pytest.approx(results[0].ppl, rel=1e-6)
        assert other.windows_sha256 == results[0].windows_sha256


def test_max_windows_and_c4_default(tiny, tokenizer, text_file, monkeypatch):
    capped = sleb.perplexity(tiny, tokenizer, str(text_file), seqlen=40, max_windows=2, progress=False)
    assert capped.windows == 2
    assert capped.ppl == pytest.approx(reference_perplexity(tiny, tokenizer, text_file.read_text(), 40, 2), rel=1e-5)
    assert "cut to the first 2 windows" in capped.protocol
    # c4 is cut to 256 windows by default, as in the paper (documents stubbed: the hub is offline).
    from sleb import data

    stub = dataclasses.replace(data.SOURCES["c4"], load=lambda split: ["word " * 50] * 1100)
    monkeypatch.setitem(data.SOURCES, "c4", stub)
    assert len(eval_windows(tokenizer, "c4", seqlen=8)) == 256
    assert len(eval_windows(tokenizer, "c4", seqlen=8, max_windows=300)) == 300


def test_bos_is_added_when_the_tokenizer_adds_it(tiny, tokenizer, text_file, monkeypatch):
    monkeypatch.setattr(sleb.evaluate, "adds_bos", lambda tok: True)
    monkeypatch.setattr(sleb.data, "adds_bos", lambda tok: True)
    windows = eval_windows(tokenizer, str(text_file), seqlen=16)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert windows[1, 1:].tolist() == ids[15:30]
    assert "starts with BOS" in sleb.perplexity(tiny, tokenizer, str(text_file), 16, max_windows=1,
                                                 progress=False).protocol


@needs_lm_eval
def test_zero_shot_on_a_local_task(tiny, tokenizer, tmp_path):
    tasks = write_task(tmp_path / "tasks")
    seen = []
    results = sleb.zero_shot(tiny, tokenizer, [TASK_NAME], include_path=tasks, batch_size=2, on_result=seen.append)
    r = results[TASK_NAME]
    assert seen == [r]
    assert r.samples == 5
    assert 0.0 <= r.acc <= 1.0 and r.acc_norm is not None and 0.0 <= r.acc_norm <= 1.0
    assert r.metric == "acc_norm" and r.accuracy == r.acc_norm
    assert sleb.mean_accuracy(results) == r.acc_norm
    # The harness's figure is the argmax over choices of the summed log-likelihood: recompute it.
    import json as _json

    rows = [_json.loads(line) for line in (tasks / f"{TASK_NAME}.jsonl").read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for row in rows:
            ctx = tokenizer(row["question"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in row["choices"]:
                cont = tokenizer(row["question"] + " " + choice, add_special_tokens=False)["input_ids"][len(ctx):]
                x = torch.tensor([ctx + cont])
                logp = torch.log_softmax(tiny(input_ids=x).logits[0].double(), -1)
                scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    assert r.acc == pytest.approx(correct / len(rows))


def test_mean_uses_acc_where_acc_norm_is_missing():
    from sleb.evaluate import parse_task_result

    a = parse_task_result("a", {"acc,none": 0.5, "acc_norm,none": 0.7}, 10, 0)
    b = parse_task_result("b", {"acc,none": 0.6}, 10, 0)
    assert (a.metric, b.metric) == ("acc_norm", "acc")
    assert sleb.mean_accuracy([a, b]) == pytest.approx(0.65)
    with pytest.raises(sleb.SlebError, match="no acc metric"):
        parse_task_result("c", {"exact_match,none": 1.0}, 10, 0)


@needs_lm_eval
def test_cli_eval_side_by_side(model_dirs, text_file, tmp_path, tiny, tokenizer):
    dense, pruned = model_dirs
    tasks = write_task(tmp_path / "tasks")
    out_json, out_md = tmp_path / "eval.json", tmp_path / "eval.md"
    result = CliRunner().invoke(main, [
        "eval", str(dense), str(pruned), "--ppl", str(text_file), "--seqlen", "40", "--batch-size", "3",
        "--tasks", TASK_NAME, "--include-path", str(tasks), "--json", str(out_json), "--markdown", str(out_md),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    assert data["format"] == "sleb-eval/1"
    rows = eval_table.read(out_json)
    assert [r.blocks for r in rows] == [4, 2]
    assert rows[1].parameters < rows[0].parameters
    dense_ppl = rows[0].perplexity[str(text_file)].ppl
    assert dense_ppl == pytest.approx(reference_perplexity(tiny, tokenizer, text_file.read_text(), 40), rel=1e-5)
    for row in rows:
        assert set(row.tasks) == {TASK_NAME} and row.mean_accuracy == row.tasks[TASK_NAME].acc_norm
    md = out_md.read_text()
    assert f"{TASK_NAME} acc_norm" in md and "mean acc" in md and "(-2)" in md
    assert "acc_norm where the task defines it" in result.output
    table_rows = [line for line in result.output.splitlines() if line.startswith(str(pruned) + " ")]
    assert len(table_rows) == 1 and "(-2)" in table_rows[0]


def test_cli_eval_bad_input_is_one_line(model_dirs, text_file, tmp_path):
    dense, _ = model_dirs
    runner = CliRunner()
    cases = [
        ["eval", str(dense), "--ppl", "no-such-spec"],
        ["eval", str(tmp_path / "missing-model"), "--ppl", str(text_file)],
        ["eval", str(dense), "--ppl", str(tmp_path / "missing.txt")],
    ]
    if HAS_LM_EVAL:
        cases.append(["eval", str(dense), "--tasks", "no_such_task_xyz", "--include-path", str(tmp_path)])
    for args in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.output
    assert runner.invoke(main, ["eval", str(dense)]).exit_code == 2  # neither --ppl nor --tasks


def test_cli_eval_keeps_what_finished_before_a_failure(model_dirs, text_file, tmp_path):
    dense, _ = model_dirs
    out_json = tmp_path / "partial.json"
    # A config and tokenizer but no weights: it passes the checks before loading and fails at its load.
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((dense / name).read_bytes())
    result = CliRunner().invoke(main, ["eval", str(dense), str(no_weights), "--ppl", str(text_file),
                                       "--seqlen", "40", "--json", str(out_json)])
    assert result.exit_code == 1 and "cannot load model" in result.output
    rows = eval_table.read(out_json)
    assert [r.model for r in rows] == [str(dense)] and str(text_file) in rows[0].perplexity


def test_cli_eval_refuses_before_loading_any_model(model_dirs, text_file, tmp_path, monkeypatch):
    """A later model's problems that need no weights (another tokenizer, a missing folder, a short context) stop
    the run before the first model is loaded: perplexities over different tokenizations are not comparable
    (the table once printed -95.6% for them, #29)."""
    from tiny_models import save_tiny

    dense, _ = model_dirs  # SmolLM2's tokenizer
    loads = []
    monkeypatch.setattr(sleb.loading, "load", lambda name, **kwargs: loads.append(name))
    other = save_tiny(tmp_path / "other", layers=2, context=32)  # a word-level tokenizer
    for models, words in [([dense, other], "different tokenizer from"), ([dense, tmp_path / "missing"], "not found"),
                          ([other], "longer than")]:
        result = CliRunner().invoke(main, ["eval", *map(str, models), "--ppl", str(text_file), "--seqlen", "40"])
        assert result.exit_code == 1 and words in result.output, result.output
        assert [line for line in result.output.splitlines() if line.strip()] == [result.output.strip()]
    assert "perplexities over different tokenizations are not comparable" in CliRunner().invoke(
        main, ["eval", str(dense), other, "--ppl", str(text_file)]).output
    assert loads == []
    with pytest.raises(sleb.BadInput, match="different tokenizer"):
        sleb.run_eval(sleb.EvalConfig([other, str(dense)], [str(text_file)], seqlen=16))


def test_run_eval_is_sleb_eval_without_the_command_line(tmp_path):
    """`sleb.run_eval` with an EvalConfig, no CLI: the same rows, files and table as `sleb eval`."""
    from tiny_models import save_tiny

    dense, pruned = save_tiny(tmp_path / "dense", layers=4), save_tiny(tmp_path / "pruned", layers=3)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250}" for i in range(400)))
    lib, cli = tmp_path / "lib", tmp_path / "cli"
    logged = []
    config = sleb.EvalConfig([dense, pruned], [str(text)], seqlen=16, batch_size=2, max_windows=3,
                             json_path=str(lib.with_suffix(".json")), markdown_path=str(lib.with_suffix(".md")),
                             device="cpu")
    rows = sleb.run_eval(config, log=logged.append)
    result = CliRunner().invoke(main, [
        "eval", dense, pruned, "--ppl", str(text), "--seqlen", "16", "--batch-size", "2", "--max-windows", "3",
        "--json", str(cli.with_suffix(".json")), "--markdown", str(cli.with_suffix(".md")), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [r.blocks for r in rows] == [4, 3]
    assert [r.to_dict() for r in rows] == [r.to_dict() for r in eval_table.read(cli.with_suffix(".json"))]
    assert json.loads(lib.with_suffix(".json").read_text()) == json.loads(cli.with_suffix(".json").read_text())
    assert lib.with_suffix(".md").read_text() == cli.with_suffix(".md").read_text()
    assert eval_table.render_text(rows) in result.stdout
    assert logged == [line for line in result.stderr.splitlines() if ": ppl " in line]
    with pytest.raises(sleb.BadInput, match="give --ppl"):  # the CLI's usage error (exit 2), as a library error
        sleb.run_eval(sleb.EvalConfig([dense]))


def test_tasks_without_lm_eval_say_how_to_install(model_dirs, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    result = CliRunner().invoke(main, ["eval", str(model_dirs[0]), "--tasks", "piqa"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: " + sleb.evaluate.LM_EVAL_HINT


@pytest.mark.slow
def test_offline_model_dense_matches_reference_and_pruning_hurts():
    """The real offline model on gensim-lee's test part, rebuilt here from the corpus file."""
    pytest.importorskip("gensim")
    model, tokenizer = sleb.load("smollm2-135m")
    from sleb.data import _gensim_data_dir

    lines = [ln.strip() for ln in (_gensim_data_dir() / "lee_background.cor").read_text().splitlines() if ln.strip()]
    text = " ".join(d for i, d in enumerate(lines) if i % 4 == 3)
    dense = sleb.perplexity(model, tokenizer, "gensim-lee", seqlen=256, max_windows=2, batch_size=2, progress=False)
    assert dense.ppl == pytest.approx(reference_perplexity(model, tokenizer, text, 256, 2), rel=1e-4)
    assert 5 < dense.ppl < 100
    sleb.remove_blocks(model, [1, 20])
    pruned = sleb.perplexity(model, tokenizer, "gensim-lee", seqlen=256, max_windows=2, batch_size=2, progress=False)
    assert pruned.ppl > dense.ppl * 1.5

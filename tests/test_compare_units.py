"""`sleb compare --unit sublayer|attention`: ratios of the blocks' parameters, read from one search per criterion."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import sleb
from sleb.arch import find_blocks
from sleb.cli import main
from sleb.compare import compare_model, markdown
from sleb.config import SearchOptions
from sleb.errors import SlebError
from sleb.evaluate import heldout_perplexity
from sleb.units import BranchRunner


RATIOS = [0.1, 0.25]


@pytest.fixture
def texts(tiny_folder, tmp_path):
    """The tiny 6-block Llama of `test_cli` (attention branch 3,072 parameters, MLP 6,144, each norm 32), its
    calibration text, and a held-out text."""
    folder, text = tiny_folder
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(text.read_text()[::-1])
    return folder, text, heldout


def _unit_sizes(model) -> dict[int, int]:
    """Parameters of every branch unit, counted from the modules (2i: block i's attention and the norm before
    it, 2i + 1: its MLP and its norm; a saved model loses both with the unit)."""
    branches = BranchRunner(model).prepare(torch.arange(8)[None])
    blocks = find_blocks(model).modules
    norm = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}
    return {2 * b + k: sum(p.numel() for m in (branches.name(kind), norm[kind]) for p in getattr(blocks[b], m).parameters())
            for b in range(len(blocks)) for k, kind in enumerate(("attn", "mlp"))}


def test_unit_rows_reach_each_ratio_with_the_fewest_units_of_each_order(texts, monkeypatch):
    import sleb.compare

    folder, text, heldout = texts
    model, tokenizer = sleb.load(str(folder), dtype="float32", device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    searched = []
    monkeypatch.setattr(sleb.compare, "search", lambda *a, **k: searched.append(sleb.search(*a, **k)) or searched[-1])
    table = compare_model(model, tokenizer, metrics=["sleb", "ppl-oneshot"], ratios=RATIOS, calib_spec=str(text),
                          eval_specs=[str(heldout)], nsamples=2, seqlen=12, max_eval_windows=2,
                          options=SearchOptions(unit="sublayer"), progress=False, log=lambda s: None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert table["unit"] == "sublayer" and table["unit_score"] == "loss"
    blocks_params = sum(p.numel() for b in find_blocks(model).modules for p in b.parameters())
    assert table["blocks_params"] == blocks_params
    sizes = _unit_sizes(model)
    windows = sleb.calibration(tokenizer, str(text), nsamples=2, seqlen=12, seed=0)
    orders = {metric: sleb.search(model, windows, 8, metric=metric, unit="sublayer", progress=False)
              for metric in ("sleb", "ppl-oneshot")}
    assert [(r["metric"], r["ratio"]) for r in table["rows"]] == [(m, r) for m in orders for r in RATIOS]
    for row in table["rows"]:
        goal, order, k = row["ratio"] * blocks_params, orders[row["metric"]], row["removed_units"]
        assert row["unit"] == "sublayer" and row["removed"] == sorted(order.removed[:k])  # the order's prefix
        params = sum(sizes[u] for u in row["removed"])
        assert row["params_removed"] == params >= goal > params - sizes[order.removed[k - 1]]  # the fewest
        assert row["params_fraction"] == pytest.approx(params / blocks_params)
        assert row["labels"] == [f"{u // 2}.{('attn', 'mlp')[u % 2]}" for u in row["removed"]]
        assert row["calibration_ppl"] == pytest.approx(order.calibration_ppl(k), rel=1e-6)
        assert row["eval_ppl"] == heldout_perplexity(model, tokenizer, [str(heldout)], row["removed"], 12,
                                                     max_windows=2, unit="sublayer")
    # One search per criterion; SLEB's stopped as soon as the largest ratio was reached.
    assert [r.metric for r in searched] == ["sleb", "ppl-oneshot"]
    assert len(searched[0].removed) == max(r["removed_units"] for r in table["rows"] if r["metric"] == "sleb")
    text_md = markdown(table)
    assert "| 10% of block params" in text_md and "25% of block params" in text_md and "blocks (" not in text_md
    assert ".attn" in text_md or ".mlp" in text_md


def test_attention_units_compensated_rows_and_unreachable_ratios(texts):
    folder, text, heldout = texts
    model, tokenizer = sleb.load(str(folder), dtype="float32", device="cpu")
    common = dict(calib_spec=str(text), eval_specs=[str(heldout)], nsamples=2, seqlen=12, max_eval_windows=2,
                  options=SearchOptions(unit="attention"), progress=False, log=lambda s: None)
    table = compare_model(model, tokenizer, metrics=["cosine"], ratios=[0.1], compensation="linear", **common)
    plain, fitted = table["rows"]
    assert fitted["metric"] == "cosine+linear" and fitted["removed"] == plain["removed"]
    assert all(u % 2 == 0 for u in plain["removed"]) and fitted["eval_ppl"] != plain["eval_ppl"]
    # Four candidate attention units hold 12,416 of the blocks' 55,680 parameters: 30% cannot be met.
    with pytest.raises(SlebError, match="--ratio 0.3 of the blocks' .* cannot be met"):
        compare_model(model, tokenizer, metrics=["sleb"], ratios=[0.1, 0.3], **common)


def test_cli_compare_with_units_writes_the_table_plot_and_json(texts, tmp_path):
    folder, text, heldout = texts
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, ["compare", str(folder), "-o", str(out), "--unit", "sublayer", "--unit-score",
                                       "per-parameter", "--metrics", "sleb", "--ratio", "0.2", "--calib", str(text),
                                       "--eval", str(heldout), "--nsamples", "2", "--seqlen", "12", "--eval-windows",
                                       "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "compare.json").read_text())
    assert saved["unit"] == "sublayer" and saved["unit_score"] == "per-parameter"
    (row,) = saved["rows"]
    assert row["ratio"] == 0.2 and row["params_fraction"] >= 0.2 and row["labels"]
    md = (out / "compare.md").read_text()
    assert "20% of block params" in md and ", ".join(row["labels"]) in md
    assert (out / "compare.png").stat().st_size > 0


def test_default_metrics_are_those_that_rank_the_unit():
    from sleb.compare import DEFAULT_METRICS, default_metrics

    assert default_metrics(SearchOptions()) == list(DEFAULT_METRICS)
    for unit in ("sublayer", "attention"):
        assert default_metrics(SearchOptions(unit=unit)) == ["sleb", "cosine", "ppl-oneshot", "last"]
        assert default_metrics(SearchOptions(unit=unit, unit_score="per-parameter")) == ["sleb"]


def test_cli_compare_with_a_unit_and_no_metrics_runs_the_criteria_that_rank_units(texts, tmp_path):
    folder, text, heldout = texts
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, ["compare", str(folder), "-o", str(out), "--unit", "sublayer", "--ratio", "0.2",
                                       "--calib", str(text), "--eval", str(heldout), "--nsamples", "2", "--seqlen",
                                       "12", "--eval-windows", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "compare.json").read_text())
    assert [row["metric"] for row in saved["rows"]] == ["sleb", "cosine", "ppl-oneshot", "last"]


@pytest.mark.parametrize("extra, words", [
    (["--unit", "sublayer", "--metrics", "sleb,angular"], "--metrics angular ranks contiguous windows"),
    (["--unit", "sublayer", "--unit-score", "per-parameter", "--metrics", "cosine"], "per-parameter"),
    (["--unit-score", "per-parameter", "--metrics", "sleb"], "blocks are all alike"),
])
def test_cli_refuses_unit_combinations_before_loading(texts, tmp_path, monkeypatch, extra, words):
    import sleb.loading

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(sleb.loading, "load", load)
    folder, text, heldout = texts
    result = CliRunner().invoke(main, ["compare", str(folder), "-o", str(tmp_path / "cmp"), *extra, "--calib",
                                       str(text), "--eval", str(heldout), "--nsamples", "2", "--seqlen", "12",
                                       "--device", "cpu"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], result.output
    assert not (tmp_path / "cmp").exists()


def test_run_compare_is_sleb_compare_without_the_command_line(texts, tmp_path, monkeypatch):
    """`sleb.run_compare` with a CompareJob, no CLI: the same table, files and printed table as `sleb compare`
    (only the timings differ); a refusal is a library error, before the model loads."""
    folder, text, heldout = texts
    lib, cli = tmp_path / "lib", tmp_path / "cli"
    logged = []
    job = sleb.CompareJob(folder, lib, metrics=["sleb", "Cosine"], ratios=[0.2, 0.4],
                          calibration=sleb.Calibration(str(text), nsamples=2, seqlen=12), eval_specs=[str(heldout)],
                          eval_windows=2, compensation="linear", device="cpu")
    table = sleb.run_compare(job, log=logged.append, progress=False)
    result = CliRunner().invoke(main, ["compare", str(folder), "-o", str(cli), "--metrics", "sleb,Cosine", "--ratio",
                                       "0.2,0.4", "--calib", str(text), "--eval", str(heldout), "--nsamples", "2",
                                       "--seqlen", "12", "--eval-windows", "2", "--compensate", "linear", "--device",
                                       "cpu"])
    assert result.exit_code == 0, result.output

    def untimed(saved: dict) -> dict:
        rows = [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in saved["rows"]]
        return {**{k: v for k, v in saved.items() if k != "seconds"}, "rows": rows}

    ours, theirs = json.loads((lib / "compare.json").read_text()), json.loads((cli / "compare.json").read_text())
    assert ours == {"format": "sleb-compare/1", **json.loads(json.dumps(table))}
    assert untimed(ours) == untimed(theirs)
    assert [row["metric"] for row in table["rows"]] == ["sleb", "sleb+linear"] * 2 + ["cosine", "cosine+linear"] * 2
    assert (lib / "compare.md").read_text() == (cli / "compare.md").read_text() == markdown(table)
    assert result.stdout == markdown(table) + f"\nwrote {cli}/compare.md, compare.json, compare.png\n"
    assert logged and all(line in result.stderr for line in logged)

    from sleb import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    with pytest.raises(sleb.BadInput, match="ranks contiguous windows"):
        sleb.run_compare(sleb.CompareJob(folder, tmp_path / "x", metrics="angular", search=SearchOptions(unit="sublayer"),
                                         calibration=sleb.Calibration(str(text)), eval_specs=str(heldout)))
    assert not (tmp_path / "x").exists()


def test_cli_compare_evaluates_at_eval_seqlen(texts, tmp_path):
    """`--eval-seqlen` reaches a comparison at ratios too: the table's evaluation uses it, the calibration keeps
    --seqlen, and the numbers are those of `heldout_perplexity` at that length."""
    folder, text, heldout = texts
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compare", str(folder), "-o", str(out), "--calib", str(text), "--eval",
                                       str(heldout), "--nsamples", "2", "--seqlen", "12", "--eval-seqlen", "20",
                                       "--eval-windows", "2", "--metrics", "sleb", "--ratio", "0.2", "--device",
                                       "cpu"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "compare.json").read_text())
    assert table["evaluation"]["seqlen"] == 20 and table["calibration"]["seqlen"] == 12
    model, tokenizer = sleb.load(str(folder), dtype="float32", device="cpu")
    dense = heldout_perplexity(model, tokenizer, [str(heldout)], [], 20, max_windows=2)
    assert table["dense_eval_ppl"] == pytest.approx(dense)

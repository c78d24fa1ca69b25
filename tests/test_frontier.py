"""`sleb compare --speed-at SPEC --target-speedup S1,S2 --unit block,attention,sublayer`: the frontier (sleb.frontier).

The cost table is a fixed one (`FIXED`, patched over `sleb.frontier.measure_costs`), so every search is
deterministic; the bench is a fake where a test checks the table's plumbing, and real in one test.
"""

from __future__ import annotations

import json

import pytest
import torch

import sleb
import sleb.frontier
from sleb.compare import CompareJob, run_compare
from sleb.errors import BadInput
from sleb.frontier import frontier_model, markdown, unit_options
from sleb.settings import Budget, Calibration, Healing, SearchOptions
from sleb.sizes import MeasuredCost, Sizer
from sleb.units import UNIT_KINDS

from helpers import invoke

UNITS = ["block", "attention", "sublayer"]
TARGETS = [1.1, 1.3]


def _fixed(spec: str = "generation:16") -> MeasuredCost:
    """6 blocks, each attention 4 s, MLP 1 s, the rest of the block 1 s; 4 s outside the blocks (40 s in all)."""
    mode, tokens = spec.split(":")
    return MeasuredCost(mode, int(tokens), (6.0,) * 6, 40.0, ((4.0, 1.0),) * 6, info={"device": "cpu", "rounds": 3})


@pytest.fixture
def texts(tiny_folder, tmp_path):
    folder, text = tiny_folder
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(text.read_text()[::-1])
    return folder, text, heldout


@pytest.fixture
def fixed_costs(monkeypatch):
    """The fixed table in place of the timing; the list of specs timed (the dense model is timed once)."""
    timed = []

    def measure(model, spec, branches=None, **kwargs):
        timed.append(spec)
        return _fixed(spec)

    monkeypatch.setattr(sleb.frontier, "measure_costs", measure)
    return timed


@pytest.fixture
def fake_bench(monkeypatch):
    """`sleb bench` replaced: each pruned model 'measures' 0.9 x its parameter ratio; the calls are recorded."""
    calls = []

    def bench(models, config, progress=None):
        calls.append((models, config))
        (_, dense, _), (_, pruned, _) = models
        ratio = sum(p.numel() for p in dense.parameters()) / sum(p.numel() for p in pruned.parameters())
        return _FakeResult(0.9 * ratio, config)

    monkeypatch.setattr(sleb.frontier, "bench", bench)
    return calls


class _FakeResult:
    def __init__(self, speedup, config):
        what = "prefill" if config.prefill else "decode"  # generation:N compares decode steps
        timing = type("T", (), {"spread": 0.01})()
        self.machine = {"fake": True}
        self.models = [type("M", (), {what: timing, f"{what}_speedup": 1.0, "prefill_ideal_speedup": 1.0,
                                      "generation_ideal_speedup": 1.0, f"{what}_tokens_per_s": 100.0})(),
                       type("M", (), {what: timing, f"{what}_speedup": speedup, "prefill_ideal_speedup": 1.5,
                                      "generation_ideal_speedup": 1.5, f"{what}_tokens_per_s": 100.0 * speedup})()]


def test_one_row_per_unit_and_target_each_meeting_its_target(texts, fixed_costs, fake_bench, tmp_path, monkeypatch):
    folder, text, heldout = texts
    out = tmp_path / "frontier"
    resumed = []
    searched = sleb.frontier.budgeted_search

    def budgeted(*args, checkpoint=None, **kwargs):
        resumed.append(checkpoint.exists())
        return searched(*args, checkpoint=checkpoint, **kwargs)

    monkeypatch.setattr(sleb.frontier, "budgeted_search", budgeted)
    job = CompareJob(str(folder), str(out), calibration=Calibration(str(text), nsamples=2, seqlen=12),
                     eval_specs=[str(heldout)], eval_windows=2, target_speedups=TARGETS, units=UNITS,
                     search=SearchOptions(speed_at="generation:16"), compensation="linear", device="cpu",
                     dtype="float32")
    table = run_compare(job, progress=False)
    assert fixed_costs == ["generation:16"]  # one cost table for every row
    plain = [r for r in table["rows"] if r["metric"] == "sleb"]
    assert [(r["unit"], r["target_speedup"]) for r in plain] == [(u, t) for u in UNITS for t in TARGETS]
    # Each unit kind's second target went on from the first one's greedy steps, and found what a fresh
    # search finds.
    assert resumed == [False, True] * len(UNITS)
    model, tokenizer = sleb.load(str(folder), dtype="float32", device="cpu")
    windows = sleb.calibration(tokenizer, str(text), nsamples=2, seqlen=12, seed=0)
    for row in plain:
        fresh = searched(model, windows, Budget(target_speedup=row["target_speedup"], speedup_context=12),
                         options=unit_options(SearchOptions(speed_at="generation:16"), row["unit"]),
                         measured=_fixed(), progress=False)
        assert sorted(fresh.removed) == row["removed"]
        kind = UNIT_KINDS[row["unit"]]
        sizer = Sizer.of(model, 12, kind.branches(model), measured=_fixed())
        assert row["predicted_speedup"] == pytest.approx(sizer.speedup(row["removed"]))
        assert row["predicted_speedup"] >= row["target_speedup"]
        assert row["unit_score"] == ("loss" if row["unit"] == "block" else "per-second")
        if row["unit"] == "attention":
            assert all(u % 2 == 0 for u in row["removed"])
        # The measured columns are the bench's, the dense model against this row's pruned one.
        assert row["ideal_speedup"] == 1.5 and row["measured_spread"] == pytest.approx(0.02)
        assert row["measured_speedup"] > 0.9
        assert ("(below target)" in markdown({**table, "rows": [row]})) == (
            row["measured_speedup"] * 1.02 < row["target_speedup"])
    # Eight bench calls (three units x two targets), each at the shape of --speed-at, batch 1.
    assert len(fake_bench) == len(plain)
    config = fake_bench[0][1]
    assert (config.gen_prompt, config.gen_tokens, config.gen_batch, config.prefill) == (16, 32, 1, False)
    # A compensated row after each plain one: the same removal, the same speed, its own perplexity.
    for row, fitted in zip(plain, [r for r in table["rows"] if r["metric"] == "sleb+linear"]):
        assert fitted["removed"] == row["removed"] and fitted["measured_speedup"] == row["measured_speedup"]
    written = json.loads((out / "frontier.json").read_text())
    assert written["format"] == "sleb-frontier/1" and written["cost_table"]["speed_at"] == "generation:16"
    assert (out / "frontier.png").stat().st_size > 1000
    text_md = (out / "frontier.md").read_text()
    assert text_md == markdown(table) and "| dense |" in text_md and "| attention | 1.3x | sleb+linear |" in text_md
    assert not (out / "compare.json").exists()


def test_a_real_bench_times_the_pruned_model(texts, fixed_costs, tmp_path):
    """No fake: `sleb bench` generates after a 16-token prompt with the dense and the pruned tiny model."""
    folder, text, heldout = texts
    model, tokenizer = sleb.load(str(folder), dtype="float32", device="cpu")
    table = frontier_model(model, tokenizer, units=["sublayer"], targets=[1.2], calib_spec=str(text),
                           eval_specs=[str(heldout)], nsamples=2, seqlen=12, max_eval_windows=2,
                           options=SearchOptions(speed_at="generation:16"), progress=False, log=lambda s: None)
    (row,) = table["rows"]
    assert row["predicted_speedup"] >= 1.2
    assert row["measured_speedup"] > 0 and row["tokens_per_s"] > 0 and row["dense_tokens_per_s"] > 0
    assert row["ideal_speedup"] > 1 and row["measured_spread"] >= 0 and row["bench_machine"]["torch"]


def test_a_target_no_removal_reaches_is_refused_before_the_search(texts, fixed_costs, monkeypatch):
    folder, text, heldout = texts
    model, tokenizer = sleb.load(str(folder), dtype="float32", device="cpu")
    monkeypatch.setattr(sleb.frontier, "budgeted_search", lambda *a, **k: pytest.fail("searched"))
    # Three of the 4 candidate blocks' attention units save 12 of 40 s: 1.43x at most.
    with pytest.raises(BadInput, match=r"--target-speedup 1.5 cannot be met with --unit attention: .* 1\.429x"):
        frontier_model(model, tokenizer, units=["block", "attention"], targets=[1.1, 1.5], calib_spec=str(text),
                       eval_specs=[str(heldout)], nsamples=2, seqlen=12, options=SearchOptions(speed_at="prefill:8"),
                       progress=False, log=lambda s: None)


@pytest.mark.parametrize("args, words", [
    (["--target-speedup", "1.1,x", "--speed-at", "prefill:8"], "--target-speedup must be comma-separated numbers"),
    (["--target-speedup", "1.1,1.0", "--speed-at", "prefill:8"], "--target-speedup 1 must be a finite number above"),
    (["--target-speedup", "inf", "--speed-at", "prefill:8"], "--target-speedup inf must be a finite number above"),
    (["--target-speedup", "1.2,1.2", "--speed-at", "prefill:8"], "--target-speedup lists 1.2 more than once"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--ratio", "0.1"], "two kinds of budget"),
    (["--target-speedup", "1.2"], "give --speed-at"),
    (["--target-speedup", "1.2", "--speed-at", "gen:8"], "prefill:N or generation:N"),
    (["--target-speedup", "1.2", "--speed-at", "generation:64"], "needs 65 positions"),
    (["--target-speedup", "1.2", "--speed-at", "generation:40"], "prompt + new tokens of 72 tokens"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--unit", "block,bogus"], "unknown unit 'bogus'"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--unit", "block,block"], "--unit lists block more"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--metrics", "cosine"], "--metrics applies to --ratio"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--unit", "sublayer", "--unit-score", "per-parameter"],
     "not --unit-score per-parameter"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--unit", "sublayer", "--unit-score", "loss"],
     "not --unit-score loss"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--unit-score", "per-second"], "--unit block has none"),
    (["--speed-at", "prefill:8"], "--speed-at applies with --target-speedup"),
    (["--refine-seconds", "5"], "--refine-seconds applies with --target-speedup"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--refine-seconds", "0"], "--refine-seconds must be a"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--eval-seqlen", "0"], "--eval-seqlen"),
    (["--heal-minutes", "1"], "--heal-minutes applies only with --heal"),
    (["--heal", "lora", "--heal-steps", "2"], "--heal adds healed rows to the frontier"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--heal", "lora"], "--heal needs a budget"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--heal", "maps", "--heal-steps", "2"],
     "--heal maps trains the maps --compensate folds"),
    (["--target-speedup", "1.2", "--speed-at", "prefill:8", "--heal", "lora", "--heal-steps", "2",
      "--heal-heldout-windows", "100000"], "healing needs 100000 held out"),
    (["--unit", "block,sublayer"], "several make the frontier"),
    (["--unit", ","], "--unit lists nothing"),
    (["--unit", ",", "--target-speedup", "1.2", "--speed-at", "prefill:8"], "--unit lists nothing"),
])
def test_bad_frontiers_are_refused_in_one_line_before_loading(texts, tmp_path, monkeypatch, args, words):
    folder, text, heldout = texts
    monkeypatch.setattr(sleb.loading, "load", lambda *a, **k: pytest.fail("loaded"))
    result = invoke("compare", folder, "-o", tmp_path / "out", "--calib", text, "--eval", heldout, "--nsamples", 2,
                    "--seqlen", 12, "--device", "cpu", *args)
    assert result.exit_code not in (0, None), result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error:") and words in last, result.output
    assert not (tmp_path / "out").exists()


def test_the_cli_writes_the_frontier(texts, fixed_costs, fake_bench, tmp_path):
    folder, text, heldout = texts
    out = tmp_path / "out"
    result = invoke("compare", folder, "-o", out, "--calib", text, "--eval", heldout, "--nsamples", 2, "--seqlen", 12,
                    "--eval-windows", 2, "--device", "cpu", "--unit", "block,sublayer", "--target-speedup", "1.2",
                    "--speed-at", "prefill:8", "--unit-score", "per-second")
    assert result.exit_code == 0, result.output
    assert "| sublayer | 1.2x | sleb |" in result.output and "frontier.md" in result.output
    assert fake_bench[0][1].prefill_len == 8 and not fake_bench[0][1].generation
    assert {p.name for p in out.iterdir()} == {"frontier.json", "frontier.md", "frontier.png"}


def test_the_frontier_evaluates_at_eval_seqlen_and_passes_its_refinement_budget(texts, fixed_costs, fake_bench, tmp_path,
                                                                                monkeypatch):
    folder, text, heldout = texts
    seen, budgets = [], []
    evaluate, search = sleb.frontier.heldout_perplexity, sleb.frontier.budgeted_search

    def heldout_perplexity(model, tokenizer, specs, removed, seqlen, **kwargs):
        seen.append(seqlen)
        return evaluate(model, tokenizer, specs, removed, seqlen, **kwargs)

    def budgeted(*args, refine=None, **kwargs):
        budgets.append(refine.seconds)
        return search(*args, refine=refine, **kwargs)

    monkeypatch.setattr(sleb.frontier, "heldout_perplexity", heldout_perplexity)
    monkeypatch.setattr(sleb.frontier, "budgeted_search", budgeted)
    out = tmp_path / "out"
    result = invoke("compare", folder, "-o", out, "--calib", text, "--eval", heldout, "--nsamples", 2, "--seqlen", 12,
                    "--eval-seqlen", 20, "--eval-windows", 2, "--device", "cpu", "--unit", "sublayer",
                    "--target-speedup", "1.2", "--speed-at", "prefill:8", "--refine-seconds", "7.5")
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {20} and budgets == [7.5]
    table = json.loads((out / "frontier.json").read_text())
    assert table["evaluation"]["seqlen"] == 20 and table["refine_seconds"] == 7.5
    assert table["calibration"]["seqlen"] == 12


def test_healed_rows_heal_a_copy_of_each_point_from_its_compensated_removal(texts, fixed_costs, fake_bench, tmp_path,
                                                                            monkeypatch):
    folder, text, heldout = texts
    model, tokenizer = sleb.load(str(folder), dtype="float32", device="cpu")
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    heals = []
    heal_removal = sleb.frontier.heal_removal

    def spy(copy, removed, unit, teacher, settings, **kwargs):
        heals.append((copy is model, removed, unit, kwargs["compensation"]))
        return heal_removal(copy, removed, unit, teacher, settings, **kwargs)

    monkeypatch.setattr(sleb.frontier, "heal_removal", spy)
    healing = Healing("lora", steps=2, windows=4, heldout_windows=2, eval_every=1)
    table = frontier_model(model, tokenizer, units=["sublayer"], targets=[1.2], calib_spec=str(text),
                           eval_specs=[str(heldout)], nsamples=2, seqlen=12,
                           options=SearchOptions(speed_at="prefill:8"), compensation="linear", healing=healing,
                           out_dir=tmp_path, progress=False, log=lambda s: None)
    plain, fitted, healed = table["rows"]
    assert [r["metric"] for r in table["rows"]] == ["sleb", "sleb+linear", "sleb+linear+lora"]
    # The heal started from the compensated removal, on a copy: the loaded model is the dense one still.
    assert heals == [(False, plain["removed"], "sublayer", heals[0][3])] and heals[0][3]["runs"]
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert healed["removed"] == plain["removed"] and healed["measured_speedup"] == plain["measured_speedup"]
    assert healed["heal"]["steps"] == 2 and healed["eval_ppl"] != fitted["eval_ppl"]
    assert table["healing"]["params"] == "lora" and table["healing"]["steps"] == 2
    assert "Healed rows (+lora)" in (tmp_path / "frontier.md").read_text()
    assert "sleb+linear+lora" in json.loads((tmp_path / "frontier.json").read_text())["rows"][2]["metric"]

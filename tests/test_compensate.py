"""Linear compensation: the fold is exact algebra, the fit is the stated least squares, refusals are one line."""

from __future__ import annotations

import copy

import pytest
import torch

import sleb
from sleb.arch import BlockRunner, find_blocks, residual_writer
from sleb.compensate import compensate, removed_runs
from sleb.compensated_search import aware_search

from tiny_models import family_model, random_windows

# Families the fold supports, and the layer the probe must find (names checked here, never in the code).
SUPPORTED = {
    "llama": "mlp.down_proj",
    "qwen2": "mlp.down_proj",
    "phi3": "mlp.down_proj",
    "gpt2": "mlp.c_proj",  # Conv1D: weight stored [in, out]
    "opt": "fc2",
    "gpt_neox": "mlp.dense_4h_to_h",  # parallel residual (the config default)
    "phi": "mlp.fc2",  # parallel residual, one shared input norm
}
POST_NORM = ["gemma2", "gemma3_text", "olmo2"]


def _writer(model, index, windows):
    runner = BlockRunner(model)
    ids = windows[:1]
    h = runner.embed(ids)
    for b in range(index):
        h = runner.block(b, h, ids)
    return residual_writer(runner, index, h, ids)


def _near_identity(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)


@pytest.mark.spec
@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_fold_equals_an_explicit_linear_layer_after_the_mlp_output(family):
    extra = {"partial_rotary_factor": 0.5} if family == "phi" else {}
    model = family_model(family, layers=4, **extra)
    windows = random_windows(n=2, seqlen=12)
    writer = _writer(model, 1, windows)
    assert writer.path == SUPPORTED[family]
    t = _near_identity(model.config.hidden_size)

    untouched = copy.deepcopy(model)
    explicit = copy.deepcopy(model)
    module = find_blocks(explicit).modules[1].get_submodule(writer.path)
    module.register_forward_hook(lambda mod, args, out: (out.double() @ t).to(out.dtype))
    writer.fold(t)
    with torch.no_grad():
        folded_logits, explicit_logits = model(windows).logits, explicit(windows).logits
        plain_logits = untouched(windows).logits
    torch.testing.assert_close(folded_logits, explicit_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(folded_logits, plain_logits, rtol=1e-3, atol=1e-3)  # the map did change the model


@pytest.mark.spec
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_map_reproduces_plain_removal(family):
    model = family_model(family, layers=5)
    windows = random_windows(n=3, seqlen=12)
    plain = copy.deepcopy(model)
    # A huge ridge pulls T to the identity: compensation must then change nothing.
    comp = compensate(model, windows, [2, 3], ridge=1e12, progress=False)
    assert comp.runs[0].fold_block == 1
    assert comp.runs[0].residual_after == pytest.approx(comp.runs[0].residual_before, rel=1e-6)
    assert comp.calibration_ppl == pytest.approx(comp.calibration_ppl_plain, rel=1e-5)
    sleb.remove_blocks(model, [2, 3])
    sleb.remove_blocks(plain, [2, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, plain(windows).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.spec
def test_fit_is_the_ridge_least_squares_of_the_captured_activations():
    """Recompute M, Y, L with plain transformers hooks and hidden states, solve directly, compare the fold."""
    model = family_model("llama", layers=5)
    windows = random_windows(n=3, seqlen=12)
    ridge = 1e-3
    down = find_blocks(model).modules[1].mlp.down_proj
    original = down.weight.detach().double().clone()
    captured = []
    handle = down.register_forward_hook(lambda mod, args, out: captured.append(out.detach()))
    with torch.no_grad():
        out = model(windows, output_hidden_states=True)
    handle.remove()
    m = captured[0].reshape(-1, 32).double()
    y = out.hidden_states[2].reshape(-1, 32).double() - m  # hidden_states[i] leaves block i - 1
    target = out.hidden_states[4].reshape(-1, 32).double()  # leaves block 3, the run's last
    a = m.T @ m
    mu = ridge * a.trace() / 32
    t = torch.linalg.solve(a + mu * torch.eye(32, dtype=torch.float64), m.T @ (target - y) + mu * torch.eye(32, dtype=torch.float64))

    comp = compensate(model, windows, [2, 3], ridge=ridge, batch_size=2, measure=False, progress=False)
    assert comp.runs[0].ridge == ridge
    torch.testing.assert_close(down.weight.detach().double(), (t.T @ original).float().double(), rtol=1e-4, atol=1e-5)
    fit = comp.runs[0]
    assert fit.tokens == windows.numel()
    assert fit.residual_before == pytest.approx(((m + y - target).norm() / target.norm()).item(), rel=1e-6)
    assert fit.residual_after == pytest.approx(((m @ t + y - target).norm() / target.norm()).item(), rel=1e-5)
    assert fit.residual_after < fit.residual_before


def test_runs_are_fitted_in_order_and_block_zero_is_skipped():
    model = family_model("llama", layers=8)
    windows = random_windows(n=2, seqlen=12)
    assert removed_runs([6, 0, 3, 4]) == [[0], [3, 4], [6]]
    comp = compensate(model, windows, [6, 0, 3, 4], progress=False)
    assert [r.blocks for r in comp.runs] == [[0], [3, 4], [6]]
    assert comp.runs[0].skipped and comp.runs[0].fold_block is None
    assert [r.fold_block for r in comp.runs[1:]] == [2, 5]
    assert all(r.residual_after < r.residual_before for r in comp.runs[1:])


@pytest.mark.parametrize("family", POST_NORM)
def test_post_norm_families_are_refused_in_one_line(family):
    model = family_model(family, layers=4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(sleb.SlebError) as err:
        compensate(model, random_windows(n=2, seqlen=12), [2], progress=False)
    message = str(err.value)
    assert "\n" not in message and family in message and "norm" in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_same_seed_gives_the_same_weights():
    windows = random_windows(n=3, seqlen=12)
    weights = []
    for _ in range(2):
        model = family_model("llama", layers=5)
        comp = compensate(model, windows, [2, 3], objective="linear-cosine", cosine_steps=20, cosine_lr=1e-2,
                          cosine_tokens=20, seed=3, progress=False)
        weights.append(find_blocks(model).modules[1].mlp.down_proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    fit = comp.runs[0]
    assert fit.sample_tokens == 20 and fit.cosine_after < fit.cosine_before


def test_aware_search_leaves_the_model_and_rescores_with_compensation():
    model = family_model("llama", layers=6)
    windows = random_windows(n=2, seqlen=12)
    before = [p.detach().clone() for p in model.parameters()]
    plain = sleb.search(model, windows, 2, progress=False)
    aware = aware_search(model, windows, 2, compensation=sleb.Compensation("linear", aware=True, top_k=2), plain=plain,
                         progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert aware.steps[0].scores == plain.steps[0].scores
    log = aware.compensation_aware["steps"]
    assert [s["picked"] for s in log] == aware.removed
    # The recorded compensated loss is what compensate() gives for that set.
    comp = compensate(model, windows, aware.removed, progress=False)
    assert comp.calibration_ppl == pytest.approx(aware.calibration_ppl(), rel=1e-6)
    assert aware.calibration_ppl(0) == pytest.approx(plain.calibration_ppl(0))


def test_cli_compensates_saves_a_plain_checkpoint_and_reports_each_run(tiny_folder, tmp_path):
    import json

    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from sleb.cli import main

    folder, text = tiny_folder
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["prune", str(folder), "-o", str(out), "--remove", "2", "--calib", str(text),
                                       "--nsamples", "2", "--seqlen", "12", "--compensate", "linear"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sleb_report.json").read_text())
    entry = report["compensation"]
    assert entry["objective"] == "linear" and entry["removed"] == report["removed"]
    assert all(r["residual_after"] < r["residual_before"] for r in entry["runs"] if not r["skipped"])
    assert report["reload_max_logit_diff"] is not None  # the reload check saw the folded weights
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    shown = CliRunner().invoke(main, ["report", str(out), "--no-generate"])
    assert shown.exit_code == 0, shown.output
    assert "## Compensation" in (out / "report.md").read_text()

    bad = CliRunner().invoke(main, ["prune", str(folder), "-o", str(tmp_path / "x"), "--target-params", "0.8",
                                    "--compensate", "linear", "--compensate-aware"])
    assert bad.exit_code == 1 and "--compensate-aware needs" in bad.output


def test_auto_ridge_is_chosen_by_cross_validation_over_window_batches():
    from sleb.compensate import RIDGE_GRID

    model = family_model("llama", layers=5)
    windows = random_windows(n=4, seqlen=12)
    comp = compensate(model, windows, [2, 3], ridge="auto", measure=False, progress=False)
    fit = comp.runs[0]
    assert fit.ridge in RIDGE_GRID and set(fit.ridge_cv_residuals) == {str(r) for r in RIDGE_GRID}
    assert fit.ridge_cv_residuals[str(fit.ridge)] == min(fit.ridge_cv_residuals.values())
    # Folds are windows, not batches: batching does not change the choice.
    batched = compensate(family_model("llama", layers=5), windows, [2, 3], ridge="auto", batch_size=4, measure=False,
                         progress=False)
    assert batched.runs[0].ridge == fit.ridge
    assert batched.runs[0].ridge_cv_residuals == pytest.approx(fit.ridge_cv_residuals, rel=1e-6)


def test_compare_adds_compensated_rows_and_restores_the_weights(tiny_folder, tmp_path):
    """`sleb compare --compensate linear`: a `criterion+linear` row per row, ReplaceMe's contiguous choice among
    the criteria, and the model's weights untouched afterwards."""
    from sleb.compare import compare_model

    folder, text = tiny_folder
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(text.read_text()[::-1])
    model, tokenizer = sleb.load(str(folder), dtype="float32", device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = compare_model(model, tokenizer, metrics=["sleb", "replaceme"], ratios=[0.2, 0.4], calib_spec=str(text),
                          eval_specs=[str(heldout)], nsamples=2, seqlen=12, max_eval_windows=3, compensation="linear",
                          progress=False, log=lambda s: None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = [r["metric"] for r in table["rows"]]
    assert names == ["sleb", "sleb+linear"] * 2 + ["contiguous-cosine", "contiguous-cosine+linear"] * 2
    plain, fitted = table["rows"][-2], table["rows"][-1]
    assert fitted["removed"] == plain["removed"] == list(range(plain["removed"][0], plain["removed"][0] + 3))
    assert fitted["eval_ppl"] != plain["eval_ppl"] and fitted["fit_seconds"] > 0
    # The compensated row is what compensate() gives for those blocks on the calibration windows.
    windows = sleb.calibration(tokenizer, str(text), nsamples=2, seqlen=12, seed=0)
    comp = compensate(model, windows, plain["removed"], progress=False)
    assert fitted["calibration_ppl"] == pytest.approx(comp.calibration_ppl, rel=1e-6)


# -- branch units (sleb.units): runs of consecutive branches, folded into the branch before ---------------
@pytest.mark.spec
def test_branch_run_fit_is_the_least_squares_of_the_attention_output_before_it():
    """Units [1.mlp, 2.attn] form one run; it folds into 1.attn's output projection. M, Y, L from plain hooks."""
    model = family_model("llama", layers=5)
    windows = random_windows(n=3, seqlen=12)
    ridge = 1e-3
    blocks = find_blocks(model).modules
    outputs = {}
    handles = [blocks[b].self_attn.o_proj.register_forward_hook(
        lambda mod, args, out, b=b: outputs.__setitem__(b, out.detach())) for b in (1, 2)]
    with torch.no_grad():
        out = model(windows, output_hidden_states=True)
    for h in handles:
        h.remove()
    d = model.config.hidden_size
    m = outputs[1].reshape(-1, d).double()
    y = out.hidden_states[1].reshape(-1, d).double()  # block 1's input: the residual 1.attn is added to
    target = (out.hidden_states[2] + outputs[2]).reshape(-1, d).double()  # after 2.attn in the dense model
    eye = torch.eye(d, dtype=torch.float64)
    a = m.T @ m
    mu = ridge * a.trace() / d
    t = torch.linalg.solve(a + mu * eye, m.T @ (target - y) + mu * eye)
    original = blocks[1].self_attn.o_proj.weight.detach().double().clone()

    comp = compensate(model, windows, [4, 3], ridge=ridge, measure=False, progress=False, unit="sublayer")
    fit = comp.runs[0]
    assert comp.unit == "sublayer" and fit.blocks == [3, 4] and fit.fold_block == 2
    assert fit.projection == "self_attn.o_proj"
    torch.testing.assert_close(blocks[1].self_attn.o_proj.weight.detach().double(), (t.T @ original).float().double(),
                               rtol=1e-4, atol=1e-5)
    assert fit.residual_after == pytest.approx(((m @ t + y - target).norm() / target.norm()).item(), rel=1e-5)


@pytest.mark.spec
@pytest.mark.parametrize("unit, removed, fold, path", [("attention", [6], 5, "mlp.down_proj"),
                                                       ("sublayer", [5, 6, 7], 4, "self_attn.o_proj")])
def test_identity_branch_map_reproduces_plain_unit_removal(unit, removed, fold, path):
    from sleb.units import remove_units

    model = family_model("llama", layers=5)
    windows = random_windows(n=3, seqlen=12)
    plain = copy.deepcopy(model)
    comp = compensate(model, windows, removed, ridge=1e12, progress=False, unit=unit)
    assert [r.fold_block for r in comp.runs] == [fold] and comp.runs[0].projection == path
    assert comp.calibration_ppl == pytest.approx(comp.calibration_ppl_plain, rel=1e-5)
    fitted = compensate(copy.deepcopy(plain), windows, removed, progress=False, unit=unit)
    assert fitted.runs[0].residual_after < fitted.runs[0].residual_before
    remove_units(model, removed, unit)
    remove_units(plain, removed, unit)
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, plain(windows).logits, rtol=1e-5, atol=1e-5)


def test_compensated_context_restores_branch_folds():
    from sleb.compensate import compensated

    model = family_model("llama", layers=5)
    windows = random_windows(n=2, seqlen=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with compensated(model, windows, [3, 4, 8], progress=False, unit="sublayer") as comp:
        assert [r.fold_block for r in comp.runs] == [2, 7]
        assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

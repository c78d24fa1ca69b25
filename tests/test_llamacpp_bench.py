"""`sleb bench --runtime llama.cpp`: the per-token costs come from the file's tensors, the files run in a real
llama.cpp in alternation with the same token ids, and bad input is one line."""

from __future__ import annotations

import json

import gguf
import pytest
from click.testing import CliRunner

import sleb
from sleb.cli import main
from sleb.gguf_io.pruned import write_pruned_gguf
from sleb.llamacpp_bench import LlamaCppJob, format_table, gguf_cost, run_llamacpp_bench
from sleb.sizes import ModelCost, weight_bytes
from sleb.saver import save_gguf

from llamacpp import llama_cpp_generate
from helpers import craft_gguf
from tiny_models import family_model


def test_costs_are_read_from_the_tensors(tmp_path):
    path = craft_gguf(tmp_path / "c.gguf")
    reader = gguf.GGUFReader(path)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    others = [t for t in reader.tensors if t.name != "token_embd.weight"]
    cost = gguf_cost(path)
    # Every tensor but the embedding is read whole per generated token; of the embedding, one row (of 16).
    assert cost.bytes_per_token == sum(int(t.n_bytes) for t in others) + int(embd.n_bytes) // 16
    # 2 FLOPs per weight of the blocks (norms too, as for Hugging Face models) and of the head; not the output norm.
    assert cost.flops_per_token == 2 * sum(int(t.n_elements) for t in others if t.name != "output_norm.weight")
    assert cost.blocks == 4
    pruned = tmp_path / "p.gguf"
    write_pruned_gguf(path, pruned, [1, 2], progress=False)
    block = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.1."))
    assert cost.bytes_per_token - gguf_cost(pruned).bytes_per_token == 2 * block


@pytest.mark.parametrize("family, extra", [("llama", {}), ("qwen2", {"use_sliding_window": False}),
                                           ("qwen3", {"tie_word_embeddings": True})])
def test_a_model_and_its_gguf_file_cost_the_same(family, extra, tiny_tokenizer, tmp_path):
    """One cost model: a Hugging Face model and its GGUF file agree on parameters, FLOPs per token at two
    contexts and KV cache bytes (qwen2: biases; qwen3: query and key norms, and a tied LM head)."""
    model = family_model(family, layers=3, **extra)
    path = save_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", gguf_type="f16", progress=False)
    hf, file = ModelCost.of_model(model), gguf_cost(path).model
    assert file.params == hf.params == sum(p.numel() for p in model.parameters())
    for context in (16, 2048):
        assert file.flops_per_token(context) == hf.flops_per_token(context)
    assert file.kv_cache_bytes_per_token(2) == hf.kv_cache_bytes_per_token(2) > 0
    assert file.attention_layers == hf.attention_layers == 3
    # Bytes read per generated token: every weight once, but of the embedding one row (all of it again as a tied head).
    embedding = model.get_input_embeddings().weight
    whole, row = embedding.numel() * embedding.element_size(), embedding[0].numel() * embedding.element_size()
    tied = model.get_output_embeddings().weight is embedding
    assert hf.bytes_per_token() == weight_bytes(model) - whole + row + (whole if tied else 0)
    assert hf.bytes_per_token(100, 2) - hf.bytes_per_token() == 100 * hf.kv_cache_bytes_per_token(2)


@pytest.fixture()
def two_ggufs(tiny_tokenizer, tmp_path):
    model = family_model("llama", layers=4)
    dense = save_gguf(model, tiny_tokenizer, tmp_path / "dense.gguf", gguf_type="f16", progress=False)
    pruned = tmp_path / "pruned.gguf"
    write_pruned_gguf(dense, pruned, [1, 2], progress=False)
    return dense, pruned


@pytest.mark.filterwarnings("ignore:load average")
def test_two_files_in_llama_cpp_in_alternation(two_ggufs, tmp_path):
    llama_cpp_generate(two_ggufs[0], "a", 1)  # skips, with the reason, where the runtime is not installed
    job = LlamaCppJob([str(p) for p in two_ggufs], prefill_len=24, gen_prompt=8, gen_tokens=6, rounds=2, warmup=1,
                      threads=1, json_path=str(tmp_path / "bench.json"))
    result = run_llamacpp_bench(job, show_bar=False)
    dense, pruned = result.files
    assert (dense.n_layer, pruned.n_layer) == (4, 2)  # llama.cpp's loader's own count
    assert len(dense.prefill_s) == len(pruned.gen_s) == 2 and all(s > 0 for s in dense.prefill_s + pruned.gen_s)
    rows = result.summary()
    assert rows[0]["prefill_speedup"] == rows[0]["gen_speedup"] == 1.0
    # The ideals include the KV cache read at the mean generated context and attention over half the prompt.
    assert rows[1]["gen_ideal"] == pytest.approx(dense.cost.generation_bytes(8, 6) / pruned.cost.generation_bytes(8, 6))
    assert rows[1]["prefill_ideal"] == pytest.approx(dense.cost.prefill_flops(24) / pruned.cost.prefill_flops(24))
    assert dense.cost.attention_layers == 4 and pruned.cost.attention_layers == 2
    assert rows[1]["gen_ideal"] > 1 and rows[1]["prefill_ideal"] > 1
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["settings"]["threads"] == 1 and len(written["summary"]) == 2
    table = format_table(result)
    assert "ideal (bytes)" in table and "1 thread," in table and "median of 2 rounds" in table


@pytest.mark.parametrize("args, message", [
    (["--runtime", "llama.cpp", "MODEL_DIR"], "measures .gguf files"),
    (["--runtime", "llama.cpp", "missing.gguf"], "no such file"),
    (["--runtime", "llama.cpp", "--paper", "A.gguf"], "--paper applies to --runtime transformers only"),
    # #29: these were a raw ValueError, accepted and ignored, or measured twice
    (["--runtime", "llama.cpp", "A.gguf", "fake.gguf"], "fake.gguf is not a readable GGUF file"),
    (["--runtime", "llama.cpp", "A.gguf", "cut.gguf"], "cut.gguf is not a readable GGUF file"),
    (["--runtime", "llama.cpp", "--dtype", "float16", "A.gguf"], "--dtype applies to --runtime transformers only"),
    (["--runtime", "llama.cpp", "--device", "auto", "A.gguf"], "--device applies to --runtime transformers only"),
    (["--runtime", "llama.cpp", "--trust-remote-code", "A.gguf"], "--trust-remote-code applies to --runtime"),
    (["--runtime", "llama.cpp", "A.gguf", "A.gguf"], "the same file is given twice"),
    (["--runtime", "llama.cpp", "A.gguf", "link.gguf"], "the same file is given twice"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    craft_gguf(tmp_path / "A.gguf")
    (tmp_path / "MODEL_DIR").mkdir()
    (tmp_path / "fake.gguf").write_text("not a GGUF file\n")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "A.gguf").read_bytes()[:-100])
    (tmp_path / "link.gguf").symlink_to(tmp_path / "A.gguf")
    files = ("MODEL_DIR", "missing.gguf", "A.gguf", "fake.gguf", "cut.gguf", "link.gguf")
    args = [str(tmp_path / a) if a in files else a for a in args]
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code != 0 and message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_missing_runtime_names_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLEB_LLAMA_RUNTIME", str(tmp_path / "nothing-here"))
    craft_gguf(tmp_path / "A.gguf")
    with pytest.raises(sleb.BadInput, match="make llama-runtime"):
        run_llamacpp_bench(LlamaCppJob([str(tmp_path / "A.gguf")], rounds=1), show_bar=False)


def test_more_threads_than_cores_is_a_warning(tmp_path, monkeypatch):
    """#29: llama.cpp's spin-waiting threads collapse when oversubscribed, so the times would mislead."""
    import os

    from sleb.errors import SlebWarning

    craft_gguf(tmp_path / "A.gguf")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.warns(SlebWarning, match="--threads 3 is more than the 2 cores here"):
        assert LlamaCppJob([str(tmp_path / "A.gguf")], threads=3).validate().threads == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LlamaCppJob([str(tmp_path / "A.gguf")], threads=2).validate().threads == 2

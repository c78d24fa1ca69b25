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
from sleb.saver import save_gguf

from llamacpp import llama_cpp_generate
from test_gguf_export import craft_gguf
from tiny_models import family_model


def test_costs_are_read_from_the_tensors(tmp_path):
    path = craft_gguf(tmp_path / "c.gguf")
    reader = gguf.GGUFReader(path)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    others = [t for t in reader.tensors if t.name != "token_embd.weight"]
    cost = gguf_cost(path)
    # Every tensor but the embedding is read whole per generated token; of the embedding, one row (of 16).
    assert cost.bytes_per_token == sum(int(t.n_bytes) for t in others) + int(embd.n_bytes) // 16
    assert cost.flops_per_token == 2 * sum(int(t.n_elements) for t in others if len(t.shape) >= 2)
    assert cost.blocks == 4
    pruned = tmp_path / "p.gguf"
    write_pruned_gguf(path, pruned, [1, 2], progress=False)
    block = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.1."))
    assert cost.bytes_per_token - gguf_cost(pruned).bytes_per_token == 2 * block


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
])
def test_bad_input_is_one_line(tmp_path, args, message):
    craft_gguf(tmp_path / "A.gguf")
    (tmp_path / "MODEL_DIR").mkdir()
    args = [str(tmp_path / a) if a in ("MODEL_DIR", "missing.gguf", "A.gguf") else a for a in args]
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code != 0 and message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_missing_runtime_names_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLEB_LLAMA_RUNTIME", str(tmp_path / "nothing-here"))
    craft_gguf(tmp_path / "A.gguf")
    with pytest.raises(sleb.BadInput, match="make llama-runtime"):
        run_llamacpp_bench(LlamaCppJob([str(tmp_path / "A.gguf")], rounds=1), show_bar=False)

"""GGUF out: a GGUF source pruned byte for byte, Hugging Face models written to GGUF, and llama.cpp running both."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import sleb
from sleb import export as export_module
from sleb.cli import main
from sleb.errors import SlebWarning
from sleb.gguf_io import from_hf
from sleb.gguf_io.pruned import write_pruned_gguf
from sleb.gguf_io.reader import check_layer_pattern
from sleb.runfile import report_path
from sleb.saver import save_gguf

from helpers import craft_gguf, gemma3_gguf
from llamacpp import llama_cpp_generate
from tiny_models import family_model

VT = gguf.GGUFValueType
BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def check_pruned_file(source, out, removed: list[int]) -> tuple[gguf.GGUFReader, gguf.GGUFReader]:
    """The kept blocks' tensors are the source's bytes, in increasing order, renumbered without gaps;
    every other tensor is identical, and so is the tensor order."""
    src, new = gguf.GGUFReader(source), gguf.GGUFReader(out)
    arch = src.fields["general.architecture"].contents()
    n = src.fields[f"{arch}.block_count"].contents()
    kept = [i for i in range(n) if i not in removed]
    assert new.fields[f"{arch}.block_count"].contents() == len(kept)
    by_name = {t.name: t for t in src.tensors}
    origins = []  # the source tensor each output tensor must be, mapped back from its new name
    for t in new.tensors:
        m = BLOCK.match(t.name)
        origin = by_name[f"blk.{kept[int(m.group(1))]}.{m.group(2)}" if m else t.name]
        assert (t.tensor_type, list(t.shape), t.data.tobytes()) == \
            (origin.tensor_type, list(origin.shape), origin.data.tobytes()), t.name
        origins.append(origin.name)
    dropped = {f"blk.{i}." for i in removed}
    assert origins == [t.name for t in src.tensors if not any(t.name.startswith(d) for d in dropped)]
    blocks = sorted({int(m.group(1)) for t in new.tensors if (m := BLOCK.match(t.name))})
    assert blocks == list(range(len(kept)))
    assert new.alignment == src.alignment and new.endianess == src.endianess
    return src, new


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_per_block_metadata_sliced_and_every_quant_type_copied(tmp_path, endianess):
    source = craft_gguf(tmp_path / "src.gguf", endianess)
    info = write_pruned_gguf(source, tmp_path / "out.gguf", [2, 1], progress=False)
    assert info.kept == [0, 3]
    src, new = check_pruned_file(source, tmp_path / "out.gguf", [2, 1])
    assert new.alignment == 64
    sliced = {"llama.attention.head_count": [4, 2], "llama.feed_forward_length": [64, 32],
              "llama.attention.sliding_window_pattern": [True, False]}
    assert sorted(info.sliced_arrays) == sorted(sliced)
    for key, value in sliced.items():
        assert new.fields[key].contents() == value and new.fields[key].types == src.fields[key].types
    # Everything else, tokenizer and chat template included, is unchanged (value and type).
    for key, f in src.fields.items():
        if key.startswith("GGUF.") or key in sliced or key == "llama.block_count":
            continue
        assert new.fields[key].contents() == f.contents() and new.fields[key].types == f.types, key
    assert set(new.fields) == set(src.fields)
    assert set(info.tensor_types) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1", "Q4_1"}


def test_bad_removals_and_non_model_files(tmp_path):
    source = craft_gguf(tmp_path / "src.gguf")
    with pytest.raises(sleb.SlebError, match="distinct indices"):
        write_pruned_gguf(source, tmp_path / "o.gguf", [4], progress=False)
    with pytest.raises(sleb.SlebError, match="all 4 blocks"):
        write_pruned_gguf(source, tmp_path / "o.gguf", [0, 1, 2, 3], progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(sleb.SlebError, match="cannot read GGUF"):
        write_pruned_gguf(tmp_path / "junk.gguf", tmp_path / "o.gguf", [1], progress=False)


def greedy(model, ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -n:].tolist()


@pytest.mark.parametrize("family, gguf_type", [("llama", "f16"), ("qwen2", "q8_0"), ("qwen3", "bf16"),
                                               ("stablelm", "q8_0"), ("starcoder2", "f16")])
def test_hf_model_written_to_gguf_reloads_and_runs_in_llama_cpp(family, gguf_type, tiny_tokenizer, tmp_path):
    model = family_model(family, layers=5, **({"use_sliding_window": False} if family == "qwen2" else {}))
    sleb.remove_blocks(model, [1, 3])
    out = save_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", gguf_type=gguf_type, progress=False)
    report = json.loads(report_path(out).read_text())
    assert report["blocks_after"] == 3 and report["gguf"]["gguf_type"] == gguf_type
    assert report["reload_max_logit_diff"] < 1e-4  # against the model with its weights rounded to gguf_type
    reader = gguf.GGUFReader(out)
    assert reader.fields[f"{family}.block_count"].contents() == 3
    matrix_types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert matrix_types == {gguf_type.upper()}
    ran = llama_cpp_generate(out, "The capital of France is", 6)
    assert ran["n_layer"] == 3
    assert ran["prompt_tokens"] == tiny_tokenizer("The capital of France is")["input_ids"]
    # llama.cpp computes what transformers computes from the same file (q/k layout, tokenizer, norms).
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert ran["tokens"] == greedy(reloaded, ran["prompt_tokens"], 6)


def test_unsupported_hf_models_are_refused_in_one_line(tiny_tokenizer, tmp_path):
    from tiny_models import tiny_tokenizer as word_level_tokenizer

    with pytest.raises(sleb.SlebError, match="'phi3' model to GGUF is not supported"):
        save_gguf(family_model("phi3", layers=3), tiny_tokenizer, tmp_path / "a.gguf")
    with pytest.raises(sleb.SlebError, match="sliding-window"):
        save_gguf(family_model("qwen2", layers=3), tiny_tokenizer, tmp_path / "b.gguf")
    with pytest.raises(sleb.SlebError, match="byte-level BPE"):
        save_gguf(family_model("llama", layers=3), word_level_tokenizer(), tmp_path / "c.gguf")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_and_failed_check_leaves_nothing(tiny_tokenizer, tmp_path, monkeypatch):
    model = family_model("llama", layers=3)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(sleb.SlebError, match="already exists"):
        save_gguf(model, tiny_tokenizer, out)
    result = run("prune", craft_gguf(tmp_path / "src.gguf"), "-o", out, "--remove", "1")
    assert result.exit_code == 1 and "already exists" in result.output
    with pytest.raises(sleb.SlebError, match="sleb did not write it"):  # even with overwrite
        save_gguf(model, tiny_tokenizer, out, overwrite=True)
    report_path(out).write_text('{"format": "sleb-report/1"}')  # a run file beside it proves nothing
    with pytest.raises(sleb.SlebError, match="sleb did not write it"):
        save_gguf(model, tiny_tokenizer, out, overwrite=True)
    from sleb import ledger

    ledger.record([out, report_path(out)])  # now they are an earlier sleb output

    # A file that is not the in-memory model (another seed's weights) fails the reload check.
    original = from_hf.write_hf_gguf

    def write_other(model, tokenizer, target, gguf_type, progress):
        written = original(family_model("llama", layers=3, seed=1), tokenizer, target, gguf_type, progress)
        return {**written, "expected_state": {}}

    monkeypatch.setattr(from_hf, "write_hf_gguf", write_other)
    with pytest.raises(sleb.SlebError, match="differ"):
        save_gguf(model, tiny_tokenizer, out, overwrite=True, progress=False)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.sleb_report.json", "src.gguf"]
    monkeypatch.setattr(from_hf, "write_hf_gguf", original)

    def broken(*args, **kwargs):
        raise sleb.SlebError("logits differ")

    monkeypatch.setattr(export_module, "verify_reload", broken)
    with pytest.raises(sleb.SlebError):
        save_gguf(model, tiny_tokenizer, tmp_path / "new.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.sleb_report.json", "src.gguf"]


@pytest.fixture()
def calib_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"The bushfire near Hill Top moved {i} kilometres overnight." for i in range(400)))
    return text


def test_cli_output_format_rules_fail_before_loading(tmp_path):
    source = craft_gguf(tmp_path / "src.gguf")
    cases = [
        (["--gguf-type", "q8_0"], "out.gguf", "own quantization"),
        (["--format", "gguf"], "out_dir", "ending in .gguf"),
        (["--format", "safetensors"], "out.gguf", "writes a folder"),
        (["--gguf-type", "f16"], "out_dir", "applies to GGUF output"),
        (["--overwrite"], "src.gguf", "is the source GGUF file"),
    ]
    for extra, out, message in cases:
        result = run("prune", source, "-o", tmp_path / out, "--remove", "1", *extra)
        assert result.exit_code == 1 and message in result.output, (extra, result.output)


def test_cli_non_gguf_source_to_gguf(tiny_tokenizer, tmp_path, calib_text):
    from tiny_models import save_tiny

    # A word-level tokenizer cannot go into GGUF: refused in one line before the search.
    result = run("prune", save_tiny(tmp_path / "words"), "-o", tmp_path / "w.gguf", "--remove", "1",
                 "--calib", calib_text, "--nsamples", "2", "--seqlen", "16")
    assert result.exit_code == 1 and "byte-level BPE" in result.output and "searching" not in result.output
    folder = tmp_path / "qwen3"
    family_model("qwen3", layers=5).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    result = run("prune", folder, "-o", tmp_path / "q.gguf", "--remove", "2", "--gguf-type", "q8_0",
                 "--calib", calib_text, "--nsamples", "2", "--seqlen", "16")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.gguf.sleb_report.json").read_text())
    assert report["gguf"]["gguf_type"] == "q8_0" and report["blocks_after"] == 3
    assert gguf.GGUFReader(tmp_path / "q.gguf").fields["qwen3.block_count"].contents() == 3


def test_held_out_family_gguf_pruned_through_the_cli(tiny_tokenizer, tmp_path, calib_text, monkeypatch):
    """A GGUF of another family than SmolLM2's (Qwen2, random weights, Q8_0, written offline with the
    gguf package) pruned like any downloaded .gguf: search on the dequantized model, blocks copied."""
    monkeypatch.setenv("SLEB_CACHE", str(tmp_path / "cache"))
    dense = family_model("qwen2", layers=6, use_sliding_window=False)
    source = save_gguf(dense, tiny_tokenizer, tmp_path / "qwen2-q8_0.gguf", gguf_type="q8_0", progress=False)
    out = tmp_path / "pruned.gguf"
    result = run("prune", source, "-o", out, "--remove", "2", "--calib", calib_text, "--nsamples", "2",
                 "--seqlen", "16")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path(out).read_text())
    removed = report["removed"]
    assert report["gguf"]["kept"] == [i for i in range(6) if i not in removed]
    assert set(report["gguf"]["tensor_types"]) == {"F32", "Q8_0"}
    check_pruned_file(source, out, removed)
    # transformers: the output's logits are the dequantized source's with the same blocks removed.
    expected = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name, dtype=torch.float32).eval()
    sleb.remove_blocks(expected, removed)
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = tiny_tokenizer("The bushfire near Hill Top moved", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, expected(ids).logits, rtol=0, atol=1e-5)
    ran = llama_cpp_generate(out, "The capital of France is", 6)
    assert ran["n_layer"] == 4 and len(ran["tokens"]) == 6
    assert ran["tokens"] == greedy(got, ran["prompt_tokens"], 6)


@pytest.mark.slow
def test_smollm2_gguf_pruned_by_three_blocks(smollm2, tmp_path):
    import copy

    from sleb.loading import alias_path

    model, tokenizer = smollm2
    source = alias_path("smollm2-135m")
    removed = [20, 5, 12]
    pruned = sleb.remove_blocks(copy.deepcopy(model), removed)
    out = save_gguf(pruned, tokenizer, tmp_path / "smollm2-pruned.gguf", source=source, removed=removed,
                    report={"source": "smollm2-135m"})
    src, new = check_pruned_file(source, out, removed)
    assert new.fields["llama.block_count"].contents() == 27
    report = json.loads(report_path(out).read_text())
    assert report["gguf"]["tensor_types"] == {"Q8_0": 1, "F32": 55, "Q4_1": 189}
    # The reload check inside save: transformers' logits of the file == the dequantized source minus the blocks.
    assert report["reload_max_logit_diff"] == 0.0
    ran = llama_cpp_generate(out, "The capital of France is", 6)
    assert ran["n_layer"] == 27
    assert ran["prompt_tokens"] == tokenizer("The capital of France is")["input_ids"]
    # Q4_1 weights times 8-bit activations in llama.cpp vs float dequantized weights: compare the first token.
    assert ran["tokens"][:1] == greedy(pruned, ran["prompt_tokens"], 1)
    print(f"llama.cpp on the pruned SmolLM2: {ran['text']!r}")


def _metadata_only_gguf(path, arch: str, window: int | None, pattern: list[bool] | None = None, blocks: int = 12):
    """A GGUF with an architecture's metadata and one tensor: enough for the checks made before loading."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(blocks)
    w.add_context_length(64)
    if window is not None:
        w.add_key_value(f"{arch}.attention.sliding_window", window, VT.UINT32)
    if pattern is not None:
        w.add_key_value(f"{arch}.attention.sliding_window_pattern", pattern, VT.ARRAY, sub_type=VT.BOOL)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_layer_patterns_a_pruned_file_cannot_state_are_refused_before_loading(tmp_path, monkeypatch):
    import sleb.loading

    monkeypatch.setattr(sleb.loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    gemma3n = _metadata_only_gguf(tmp_path / "gemma3n.gguf", "gemma3n", 512)
    result = run("prune", gemma3n, "-o", tmp_path / "out.gguf", "--remove", "2", "--calib", "gensim-wiki")
    assert result.exit_code == 1
    assert "places gemma3n layers' attention types" in result.output
    assert "one layer in 5 global" in result.output and "-o DIR" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3n.gguf"]
    with pytest.raises(sleb.BadInput, match=r"llama4 layers' attention types \(one layer in 4 global"):
        check_layer_pattern(_metadata_only_gguf(tmp_path / "l4.gguf", "llama4", None))
    # Families whose llama.cpp loader reads a per-layer pattern (written into the pruned file, with or
    # without one in the source), no window, or no such rule: no refusal.
    for name, arch, window, pattern in [("a", "gemma2", 4096, None), ("b", "gemma3", 512, None),
                                        ("c", "gemma3", 512, [True] * 5 + [False] + [True] * 6),
                                        ("d", "cohere2", 4096, None), ("e", "gemma3n", 0, None), ("f", "llama", 512, None)]:
        check_layer_pattern(_metadata_only_gguf(tmp_path / f"{name}.gguf", arch, window, pattern))
    # A pattern that is not one entry per layer cannot be sliced.
    with pytest.raises(sleb.BadInput, match="has 11 entries for 12 layers"):
        check_layer_pattern(_metadata_only_gguf(tmp_path / "g.gguf", "gemma2", 4096, [True, False] * 5 + [True]))


def test_swa_pattern_as_llama_cpp_reads_it(tmp_path):
    from sleb.gguf_io.reader import swa_pattern

    def pattern(arch, value=None, blocks=8):
        path = tmp_path / f"{arch}-{blocks}.gguf"
        w = gguf.GGUFWriter(path, arch)
        w.add_block_count(blocks)
        if isinstance(value, list):
            w.add_key_value(f"{arch}.attention.sliding_window_pattern", value, VT.ARRAY, sub_type=VT.INT32)
        elif value is not None:
            w.add_key_value(f"{arch}.attention.sliding_window_pattern", value, VT.UINT32)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return [int(v) for v in swa_pattern(gguf.GGUFReader(path), arch, blocks)]

    # llama.cpp's set_swa_pattern: global where il % period == period - 1, or (dense_first) il % period == 0.
    assert pattern("gemma2") == [1, 0] * 4
    assert pattern("gemma3", blocks=13) == [1, 1, 1, 1, 1, 0] * 2 + [1]
    assert pattern("cohere2moe") == [0, 1, 1, 1] * 2
    assert pattern("gemma3", 3) == [1, 1, 0] * 2 + [1, 1]  # a scalar under the key is the period
    assert pattern("gemma3", 0) == [1] * 8  # period 0: every layer sliding
    assert pattern("gemma2", [0, 1, 1, 0, 0, 1, 1, 1]) == [0, 1, 1, 0, 0, 1, 1, 1]
    assert swa_pattern(gguf.GGUFReader(craft_gguf(tmp_path / "llama.gguf")), "llama", 4) is None


@pytest.fixture()
def tiny_gemma3(tiny_tokenizer, tmp_path):
    """A 7-block Gemma-3 GGUF (F32, random weights, no pattern key: llama.cpp and transformers both put the
    global layer at 5) with a 4-token window, so sliding and global layers differ on short prompts."""
    dense = family_model("gemma3_text", layers=7, head_dim=256, sliding_window=4, sliding_window_pattern=6,
                         tie_word_embeddings=True)
    return gemma3_gguf(tmp_path / "gemma3.gguf", dense, tiny_tokenizer)


def test_gemma3_gguf_pruned_carries_the_kept_layers_pattern_and_runs_in_llama_cpp(tiny_gemma3, tiny_tokenizer,
                                                                                     tmp_path):
    source = tiny_gemma3
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name, dtype=torch.float32).eval()
    assert model.config.layer_types[5] == "full_attention" and model.config.layer_types.count("full_attention") == 1
    sleb.remove_blocks(model, [1, 3])
    # Older llama.cpp builds ignore the array and would put no global layer in 5 layers: said.
    with pytest.warns(SlebWarning, match=r"global layers \[3\]\) .* older than the one that reads it"):
        out = save_gguf(model, tiny_tokenizer, tmp_path / "pruned.gguf", source=source, removed=[1, 3],
                        progress=False)
    check_pruned_file(source, out, [1, 3])
    kept = [1, 1, 1, 0, 1]  # source layers 0, 2, 4, 5, 6; by position 5 layers would all be sliding
    field = gguf.GGUFReader(out).fields["gemma3.attention.sliding_window_pattern"]
    assert field.contents() == [bool(v) for v in kept] and field.types == [VT.ARRAY, VT.BOOL]
    report = json.loads(report_path(out).read_text())
    assert report["gguf"]["sliding_window_pattern"] == kept
    # The reload check ran with the file's pattern as the layer types (transformers' GGUF loader ignores it).
    assert report["reload_max_logit_diff"] < 1e-4
    ran = llama_cpp_generate(out, "The bushfire near Hill Top moved", 6, swa=True)
    assert ran["n_layer"] == 5 and ran["is_swa"] == kept
    # llama.cpp computes what the pruned model computes: each kept layer keeps its window and rope base.
    assert ran["prompt_tokens"] == tiny_tokenizer("The bushfire near Hill Top moved")["input_ids"]
    assert ran["tokens"] == greedy(model, ran["prompt_tokens"], 6)


def test_gemma3_gguf_pattern_checked_against_the_models_layer_types(tiny_gemma3, tiny_tokenizer, tmp_path):
    """transformers' GGUF loader ignores sliding_window_pattern, so a plain reload cannot catch a wrong
    pattern: the pruned model's own layer types must be the file's."""
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=tiny_gemma3.name, dtype=torch.float32).eval()
    sleb.remove_blocks(model, [1, 3])
    model.config.layer_types = ["sliding_attention"] * 5  # what a positional reading of 5 layers would say
    with pytest.raises(sleb.CheckFailed, match=r"sliding-window pattern \[1, 1, 1, 0, 1\] .* not the model's layer"):
        save_gguf(model, tiny_tokenizer, tmp_path / "pruned.gguf", source=tiny_gemma3, removed=[1, 3], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3.gguf"]


def test_gemma3_gguf_pruned_through_the_cli_after_a_search(tiny_gemma3, tmp_path, calib_text, monkeypatch):
    monkeypatch.setenv("SLEB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pruned.gguf"
    result = run("prune", tiny_gemma3, "-o", out, "--remove", "2", "--calib", calib_text, "--nsamples", "2",
                 "--seqlen", "16")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path(out).read_text())
    kept = [i for i in range(7) if i not in report["removed"]]
    expected = [int(i != 5) for i in kept]
    assert report["gguf"]["sliding_window_pattern"] == expected
    field = gguf.GGUFReader(out).fields["gemma3.attention.sliding_window_pattern"]
    assert [int(v) for v in field.contents()] == expected

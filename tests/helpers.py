"""Helpers shared by several test files (test files import from here, never from each other).

Fixtures shared by several files live in conftest.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gguf
import numpy as np
from click.testing import CliRunner

from sleb.cli import main

QT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType

# Calibration text of the scratch folder (conftest.scratch): a small vocabulary of made-up words.
CALIB_WORDS = " ".join(f"w{(i * 7) % 250}" for i in range(4000))


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root -> a digest of its content (folders: 'dir'; links: their target;
    FIFOs and other special files: 'special', never opened)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "link to " + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        elif not path.is_file():
            found[rel] = "special"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def prune_args(model="models/tiny", out="out", *extra):
    return ["prune", model, "-o", out, "--remove", "1", "--calib", "calib.txt", "--nsamples", "2", "--seqlen", "16",
            "--device", "cpu", *extra]


def assert_refused(result, root: Path, before: dict, *words: str):
    assert result.exit_code not in (0, None), result.output
    err = (result.stderr or result.output).strip().splitlines()
    assert err and err[-1].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in err[-1], err[-1]
    after = snapshot(root)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


def craft_gguf(path, endianess=gguf.GGUFEndian.LITTLE, blocks: int = 4):
    """A small llama-named GGUF with per-block metadata arrays and seven tensor types (not a runnable model)."""
    rng = np.random.default_rng(0)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w = gguf.GGUFWriter(path, "llama", endianess=endianess)
    w.add_custom_alignment(64)
    w.add_name("crafted")
    w.add_block_count(blocks)
    w.add_context_length(64)
    w.add_key_value("llama.attention.head_count", [4, 4, 2, 2], VT.ARRAY, sub_type=VT.UINT32)
    w.add_key_value("llama.feed_forward_length", [64, 48, 64, 32], VT.ARRAY, sub_type=VT.INT32)
    w.add_key_value("llama.attention.sliding_window_pattern", [True, False, True, False], VT.ARRAY, sub_type=VT.BOOL)
    # Four entries like the blocks, but a fixed-length field: must not be sliced.
    w.add_key_value("llama.rope.dimension_sections", [8, 8, 8, 8], VT.ARRAY, sub_type=VT.INT32)
    w.add_token_list(["<s>", "a", "b"])
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", f32(16, 64))
    for i in range(blocks):
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(64))
        w.add_tensor(f"blk.{i}.attn_q.weight", gguf.quants.quantize(f32(64, 64), QT.Q8_0), raw_dtype=QT.Q8_0)
        w.add_tensor(f"blk.{i}.attn_k.weight", f32(64, 64).astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_v.weight", gguf.quants.quantize(f32(64, 64), QT.BF16), raw_dtype=QT.BF16)
        w.add_tensor(f"blk.{i}.ffn_up.weight", gguf.quants.quantize(f32(32, 64), QT.Q4_0), raw_dtype=QT.Q4_0)
        w.add_tensor(f"blk.{i}.ffn_down.weight", gguf.quants.quantize(f32(64, 32), QT.Q5_1), raw_dtype=QT.Q5_1)
    w.add_tensor("output_norm.weight", f32(64))
    w.add_tensor("output.weight", gguf.quants.quantize(f32(16, 64), QT.Q4_1), raw_dtype=QT.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gemma3_gguf(path, model, tokenizer):
    """A Hugging Face Gemma-3 model (random weights) as a runnable gemma3 GGUF in F32, without a
    sliding_window_pattern key (llama.cpp then derives the pattern from positions, as for Google's own
    files), written the way llama.cpp's converter does: norm weights + 1 (transformers' GGUF loader
    subtracts it), the output head tied to token_embd, a byte-level BPE tokenizer."""
    import torch
    from transformers.modeling_gguf_pytorch_utils import Gemma2TensorProcessor, get_gguf_hf_weights_map

    from sleb.gguf_io.from_hf import _add_tokenizer

    cfg = model.config
    rope = cfg.rope_parameters
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_name("tiny gemma3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_key_value("gemma3.rope.freq_base_swa", float(rope["sliding_attention"]["rope_theta"]), VT.FLOAT32)
    w.add_sliding_window(cfg.sliding_window)
    _add_tokenizer(w, tokenizer, cfg.vocab_size)
    # transformers builds Gemma's tokenizer class for a gemma3 file, which needs an unknown token.
    w.add_unk_token_id(tokenizer.pad_token_id)
    state = model.state_dict()
    for gguf_name, hf_name in get_gguf_hf_weights_map(model, Gemma2TensorProcessor(config=cfg.to_dict())).items():
        if gguf_name.startswith("output.") or hf_name not in state:
            continue
        array = state[hf_name].detach().to(torch.float32).numpy()
        w.add_tensor(gguf_name, array + 1 if "norm.weight" in gguf_name else array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

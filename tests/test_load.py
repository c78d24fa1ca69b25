"""Loading from a local folder, a .gguf file and the offline alias."""

from __future__ import annotations

import pytest
import torch

import sleb
from sleb.arch import find_blocks
from sleb.loading import alias_path, local_checkpoint

from tiny_models import family_model


def test_local_folder_with_dtype(tmp_path, tiny_tokenizer):
    family_model("qwen2", layers=3).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, tokenizer = sleb.load(str(tmp_path / "m"), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and not model.training
    assert len(find_blocks(model).modules) == 3
    assert tokenizer.bos_token == "<s>"


def test_missing_model_and_bad_dtype(tmp_path):
    with pytest.raises(sleb.SlebError, match="model folder not found"):
        sleb.load(str(tmp_path / "nothing-here"), device="cpu")
    with pytest.raises(sleb.SlebError, match="cannot load model 'no-such-model-anywhere'"):
        sleb.load("no-such-model-anywhere", device="cpu")
    with pytest.raises(sleb.SlebError, match="GGUF file not found"):
        sleb.load(str(tmp_path / "x.gguf"))
    with pytest.raises(sleb.SlebError, match="unknown dtype"):
        sleb.load("whatever", dtype="float8")


def test_blocks_not_found_is_one_clear_error():
    model = family_model("llama", layers=3)
    model.config.num_hidden_layers = 7
    with pytest.raises(sleb.SlebError, match="ModuleList of 7 modules"):
        find_blocks(model)


@pytest.mark.slow
def test_gguf_file_and_alias_share_one_converted_copy(smollm2):
    model, tokenizer = smollm2
    assert len(find_blocks(model).modules) == 30 and model.dtype == torch.float32
    gguf = alias_path("smollm2-135m")
    assert local_checkpoint(str(gguf)) == local_checkpoint("smollm2-135m")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])

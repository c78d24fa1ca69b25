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


def test_runs_that_start_together_convert_a_gguf_once(tmp_path, monkeypatch):
    """Two runs loading the same .gguf at once (parallel jobs): one converts, the other waits and reads it
    (the second used to fail with 'already exists')."""
    import threading
    import time

    from sleb import loading

    monkeypatch.setenv("SLEB_CACHE", str(tmp_path / "cache"))
    from helpers import craft_gguf

    craft_gguf(tmp_path / "m.gguf")
    calls = []

    def convert(folder, gguf_file, target):
        calls.append(gguf_file)
        time.sleep(0.3)  # long enough for the other run to arrive meanwhile
        with loading.atomic_folder(target) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    found, errors = [], []

    def run():
        try:
            found.append(local_checkpoint(str(tmp_path / "m.gguf")))
        except Exception as err:  # noqa: BLE001 (the test reports any failure)
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and calls == ["m.gguf"] and len(set(found)) == 1


def test_gguf_conversion_bar_is_plain_lines_through_a_pipe(tmp_path, monkeypatch, capsys, tiny_tokenizer):
    """transformers draws its de-quantization bar with tqdm directly: through a pipe it must come out as
    sleb's plain lines, not carriage-return redraws (a 1.5B model's log was full of them)."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    from sleb.gguf_io.from_hf import write_hf_gguf
    from sleb.progress import quiet_library_bars

    monkeypatch.setenv("SLEB_CACHE", str(tmp_path / "cache"))
    write_hf_gguf(family_model("llama", layers=2), tiny_tokenizer, tmp_path / "m.gguf", progress=False)
    capsys.readouterr()
    quiet_library_bars()  # as the command line does: transformers' own loading and writing bars
    try:
        local_checkpoint(str(tmp_path / "m.gguf"))
    finally:
        enable_progress_bars()
        transformers_logging.enable_progress_bar()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert any(line.startswith("Converting and de-quantizing GGUF tensors") and "100%" in line
               for line in err.splitlines()), err

"""Shared fixtures: tiny random-weight models of many families, a small tokenizer, the offline model."""

from __future__ import annotations

import os
import tempfile

import pytest

# The record of files sleb wrote (sleb.ledger) goes to a folder of the test session's own, so tests
# neither read nor grow the user's. Subprocesses inherit it.
os.environ["SLEB_STATE"] = tempfile.mkdtemp(prefix="sleb-test-state-")
# Tests never reach the hub (a hub id in a test is a mistake, not a download), and subprocesses
# inherit this.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# The tiny models' matrices are too small to share between threads: on 2 cores a second thread only
# adds synchronisation. Tests that time or count threads set their own.
torch.set_num_threads(1)

from helpers import CALIB_WORDS  # noqa: E402
from tiny_models import VOCAB, family_model, save_tiny  # noqa: E402  (VOCAB: the session tokenizer's vocabulary)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer (vocab VOCAB) trained on offline news text, with a BOS it adds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sleb.data import documents

    docs, _ = documents("gensim-lee", "train")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs[:50], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return fast


@pytest.fixture(scope="session")
def smollm2():
    """The real offline model (SmolLM2-135M-Instruct, fp32 on CPU) and its tokenizer."""
    import sleb

    return sleb.load("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture()
def tiny_folder(tmp_path, tiny_tokenizer):
    """A tiny 6-block Llama checkpoint with the session tokenizer, and a calibration text: (folder, text)."""
    folder = tmp_path / "tiny-llama"
    family_model("llama", layers=6).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"The bushfire near Hill Top moved {i} kilometres overnight." for i in range(400)))
    return folder, text


@pytest.fixture()
def scratch(tmp_path, monkeypatch):
    """A working folder (tests/test_safety.py's method): a tiny model, calibration text, an unrelated file; the cwd is this folder."""
    root = tmp_path / "work"
    root.mkdir()
    save_tiny(root / "models" / "tiny", layers=5)
    (root / "calib.txt").write_text(CALIB_WORDS)
    (root / "notes.txt").write_text("my notes")
    monkeypatch.chdir(root)
    return root

"""Calibration windows and text specs."""

from __future__ import annotations

import json

import pytest
import torch

import sleb
from sleb.data import adds_bos, check_spec, documents, eval_windows, token_sha256


def test_offline_splits_are_disjoint_and_fixed():
    for spec in ("gensim-wiki", "gensim-lee"):
        train, _ = documents(spec, "train")
        test, _ = documents(spec, "test")
        assert train and test and not set(train) & set(test)
        assert len(test) == pytest.approx((len(train) + len(test)) / 4, abs=1)
    wiki, _ = documents("gensim-wiki", "train")
    assert sum(len(d.split()) for d in wiki) > 250_000  # real prose, not a stub
    assert "''" not in wiki[0]


def test_calibration_is_deterministic_and_follows_the_tokenizer_bos(tiny_tokenizer):
    a = sleb.calibration(tiny_tokenizer, "gensim-lee", nsamples=4, seqlen=32, seed=0)
    b = sleb.calibration(tiny_tokenizer, "gensim-lee", nsamples=4, seqlen=32, seed=0)
    c = sleb.calibration(tiny_tokenizer, "gensim-lee", nsamples=4, seqlen=32, seed=1)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert token_sha256(a) == token_sha256(b) != token_sha256(c)
    assert adds_bos(tiny_tokenizer)
    assert (a[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert (a[:, 1:] != tiny_tokenizer.bos_token_id).all()


def test_calibration_returns_the_tokenizers_freed_heap(tiny_tokenizer, monkeypatch):
    """The whole-stream tokenization's scratch memory goes back to the OS (malloc_trim), windows unchanged."""
    import sleb.data as data

    before = sleb.calibration(tiny_tokenizer, "gensim-lee", nsamples=4, seqlen=32, seed=0)
    calls = []
    monkeypatch.setattr(data, "return_freed_memory", lambda: calls.append(1))
    after = sleb.calibration(tiny_tokenizer, "gensim-lee", nsamples=4, seqlen=32, seed=0)
    assert calls == [1] and torch.equal(before, after)
    monkeypatch.undo()
    data.return_freed_memory()  # harmless wherever it runs (a no-op off glibc)


def test_local_files(tiny_tokenizer, tmp_path):
    text = " ".join(f"sentence number {i} about the weather in Sydney." for i in range(300))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in text.split(".")))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": text.split(".")}), tmp_path / "a.parquet")
    for name in ("a.txt", "a.jsonl", "a.parquet"):
        windows = sleb.calibration(tiny_tokenizer, str(tmp_path / name), nsamples=3, seqlen=16, seed=0)
        assert windows.shape == (3, 16)
        assert eval_windows(tiny_tokenizer, str(tmp_path / name), seqlen=16).shape[1] == 16


def test_bad_specs_say_what_is_available(tiny_tokenizer, tmp_path):
    with pytest.raises(sleb.SlebError, match="gensim-wiki"):
        check_spec("wikitext-9")
    with pytest.raises(sleb.SlebError, match="not found"):
        check_spec(str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(sleb.SlebError, match="tokens"):
        sleb.calibration(tiny_tokenizer, str(tmp_path / "short.txt"), nsamples=2, seqlen=64)
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(sleb.SlebError, match="text"):
        sleb.calibration(tiny_tokenizer, str(tmp_path / "bad.jsonl"), nsamples=1, seqlen=4)


def test_hub_specs_fail_in_one_line_when_offline(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(sleb.SlebError, match="cannot load dataset"):
        sleb.calibration(tiny_tokenizer, "wikitext2", nsamples=1, seqlen=8)


@pytest.mark.slow
def test_real_tokenizer_adds_no_bos(smollm2):
    _, tokenizer = smollm2
    assert not adds_bos(tokenizer)
    windows = sleb.calibration(tokenizer, "gensim-wiki", nsamples=2, seqlen=64, seed=0)
    assert windows.shape == (2, 64)
    assert "the" in tokenizer.decode(windows[0]).lower()


def test_long_texts_are_tokenized_in_pieces_with_the_same_ids(tiny_tokenizer, monkeypatch):
    """Pieces keep the tokenizer's memory bounded (a 37 MB text peaked at 4.8 GB in one call); the ids are
    those of one call, also across a stretch with no agreeing token boundary (tokenized in one call)."""
    import sleb.data as data
    from tiny_models import tiny_tokenizer as word_tokenizer

    lee = " ".join(documents("gensim-lee", "train")[0])[:60_000]
    words = " ".join(f"w{i % 250}" for i in range(3000))
    blob = f"{words} {'x' * 5000} {words}"  # one 5,000-character token for the word-level tokenizer
    monkeypatch.setattr(data, "PIECE_CHARS", 4000)
    monkeypatch.setattr(data, "PIECE_OVERLAP", 1000)
    encodes = []
    one_call = data._encode
    monkeypatch.setattr(data, "_encode", lambda tok, text: encodes.append(len(text)) or one_call(tok, text))
    for tokenizer in (tiny_tokenizer, word_tokenizer()):
        for text in (lee, blob):
            want = torch.tensor(one_call(tokenizer, text), dtype=torch.long)
            assert torch.equal(data.tokenize(tokenizer, text), want)
    assert encodes, "the word-level tokenizer's 5,000-character token should have needed the one-call fallback"

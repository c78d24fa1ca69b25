"""Disk offload (`load(..., offload_dir=...)`, `--offload-dir`): blocks stream from disk, the search is unchanged."""

from __future__ import annotations

import pytest

import sleb

from tiny_models import random_windows, save_tiny


@pytest.mark.spec
def test_offloaded_search_matches_the_in_memory_search(tmp_path):
    folder = save_tiny(tmp_path / "model", layers=5, seed=3, vocab_size=320)
    windows = random_windows(n=4, seqlen=12, seed=1)
    model, _ = sleb.load(folder, dtype="float32", device="cpu")
    offloaded, _ = sleb.load(folder, dtype="float32", device="cpu", offload_dir=tmp_path / "offload")
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}
    assert sum(v == "disk" for v in offloaded.hf_device_map.values()) == 5  # every block, nothing else
    # The blocks' weights are not in memory: they wait on the meta device until a call streams them in.
    assert all(p.device.type == "meta" for p in offloaded.model.layers.parameters())
    exact = sleb.search(model, windows, 2, progress=False)
    streamed = sleb.search(offloaded, windows, 2, progress=False)
    assert streamed.removed == exact.removed
    for a, b in zip(exact.steps, streamed.steps):
        assert b.scores == pytest.approx(a.scores, rel=1e-6)
    # Nothing the search did kept a block's weights: each call's hook put them back on the meta device.
    assert all(p.device.type == "meta" for p in offloaded.model.layers.parameters())

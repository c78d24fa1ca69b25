"""Data-parallel scoring: two processes (gloo) split the window batches and agree with one process."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sleb

from tiny_models import random_windows, family_model


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = sleb.search(family_model("llama", layers=6), random_windows(n=5, seqlen=10), 2, batch_size=2,
                             progress=False)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result.to_dict(), f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    single = sleb.search(family_model("llama", layers=6), random_windows(n=5, seqlen=10), 2, batch_size=2,
                         progress=False)
    for rank in range(2):
        shared = sleb.SearchResult.from_dict(json.loads(open(f"{out}.{rank}").read()))
        assert shared.removed == single.removed
        for a, b in zip(shared.steps, single.steps):
            for block, score in b.scores.items():
                assert abs(a.scores[block] - score) < 1e-6
        assert abs(shared.dense_loss - single.dense_loss) < 1e-6

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


def _sleb(*args, env=None, cwd=None, launcher=()):
    """Run `python -m sleb ...` (optionally under torchrun) in a subprocess with one thread per rank."""
    import subprocess
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [sys.executable, *launcher, "-m", "sleb", *[str(a) for a in args]]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def test_torchrun_prune_equals_one_process_and_only_rank_0_writes(tmp_path):
    from tiny_models import save_tiny

    model = save_tiny(tmp_path / "tiny", layers=6)
    (tmp_path / "calib.txt").write_text(" ".join(f"w{(i * 7) % 250}" for i in range(3000)))
    args = ["--remove", "2", "--calib", "calib.txt", "--nsamples", "5", "--seqlen", "16", "--device", "cpu"]
    single = _sleb("prune", model, "-o", "single", *args, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    before = sorted(p.name for p in tmp_path.iterdir())
    multi = _sleb("prune", model, "-o", "multi", *args, cwd=tmp_path, launcher=TORCHRUN)
    assert multi.returncode == 0, multi.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["multi"])  # one output, no leftovers
    assert multi.stdout.count("removed 2 of 6 blocks") == 1  # rank 0 alone prints
    one = json.loads((tmp_path / "single" / "sleb_report.json").read_text())
    two = json.loads((tmp_path / "multi" / "sleb_report.json").read_text())
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"} and one["distributed"]["world_size"] == 1
    assert two["removed"] == one["removed"]
    for a, b in zip(one["steps"], two["steps"]):
        for block, score in a["scores"].items():
            assert abs(two_score := b["scores"][block]) >= 0 and abs(two_score - score) <= 1e-9 * abs(score)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "multi").config.num_hidden_layers == 4
    ppl = [_sleb("eval", "multi", "--ppl", "calib.txt", "--seqlen", "16", "--device", "cpu", "--json", name,
                 cwd=tmp_path, launcher=launcher) for name, launcher in (("one.json", ()), ("two.json", TORCHRUN))]
    assert all(p.returncode == 0 for p in ppl), [p.stderr for p in ppl]
    values = [json.loads((tmp_path / n).read_text())["models"][0]["perplexity"]["calib.txt"]["ppl"]
              for n in ("one.json", "two.json")]
    assert abs(values[0] - values[1]) <= 1e-9 * values[0]


def test_a_failing_rank_ends_the_job_with_one_line_naming_it(tmp_path):
    from tiny_models import save_tiny

    model = save_tiny(tmp_path / "tiny", layers=6)
    (tmp_path / "calib.txt").write_text(" ".join(f"w{(i * 7) % 250}" for i in range(3000)))
    # Rank 1 alone cannot read its calibration text (a broken copy on a node, say).
    (tmp_path / "fail_rank_1.py").write_text(
        "import os, runpy, sleb.data as d\n"
        "if os.environ.get('RANK') == '1':\n"
        "    def broken(*a, **k):\n"
        "        raise OSError('disk read error')\n"
        "    d.calibration = broken\n"
        "runpy.run_module('sleb', run_name='__main__')\n")
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, *TORCHRUN, "fail_rank_1.py", "prune", model, "-o", "out", "--remove", "1", "--calib",
         "calib.txt", "--nsamples", "2", "--seqlen", "16", "--device", "cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert "Error: [rank 1] OSError: disk read error (rerun with --debug for the traceback)" in ours, proc.stderr
    # Rank 0, if it got that far, only says that it stopped because of another rank.
    assert all("[rank 1]" in line or "another rank failed" in line for line in ours), ours
    assert not (tmp_path / "out").exists()

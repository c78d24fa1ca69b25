"""Data-parallel scoring: two processes (gloo) split the window batches and agree with one process."""

from __future__ import annotations

import json
import os

import pytest
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


@pytest.mark.spec
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


@pytest.mark.spec
@pytest.mark.slow
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
    assert one["distributed"] == {"world_size": 1, "backend": None}
    agreed = two["distributed"].pop("ranks_agreed_on")  # what every rank was checked to share
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert {"--remove", "--nsamples", "--seqlen", "--calib", "--seed", "--batch-size", "the tokens of --calib",
            "the model weights"} <= set(agreed) and "--device" not in agreed
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


def _prune_through(tmp_path, wrapper: str, env=None, extra=()):
    """Run `prune` on a tiny model under torchrun (2 gloo ranks) through `wrapper`, a script that changes
    one rank and then runs sleb (with `extra` arguments); return the process, its wall time and its
    `Error:` lines."""
    import subprocess
    import sys
    import time

    from tiny_models import save_tiny

    model = save_tiny(tmp_path / "tiny", layers=6)
    (tmp_path / "calib.txt").write_text(" ".join(f"w{(i * 7) % 250}" for i in range(3000)))
    (tmp_path / "wrapper.py").write_text(wrapper)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *TORCHRUN, "wrapper.py", "prune", model, "-o", "out", "--remove", "2", "--calib",
         "calib.txt", "--nsamples", "5", "--seqlen", "16", "--device", "cpu", *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
    elapsed = time.monotonic() - started
    return proc, elapsed, [line for line in proc.stderr.splitlines() if line.startswith("Error:")]


def test_a_failing_rank_ends_the_job_with_one_line_naming_it(tmp_path):
    # Rank 1 alone cannot read its calibration text (a broken copy on a node, say).
    proc, _, ours = _prune_through(tmp_path, (
        "import os, runpy, sleb.data as d\n"
        "if os.environ.get('RANK') == '1':\n"
        "    def broken(*a, **k):\n"
        "        raise OSError('disk read error')\n"
        "    d.calibration = broken\n"
        "runpy.run_module('sleb', run_name='__main__')\n"))
    assert proc.returncode != 0
    assert "Error: [rank 1] OSError: disk read error (rerun with --debug for the traceback)" in ours, proc.stderr
    # Rank 0, if it got that far, only says that it stopped because of another rank.
    assert all("[rank 1]" in line or "another rank failed" in line for line in ours), ours
    assert not (tmp_path / "out").exists()


# Rank 1 is started with another command line: RANK1_ARGS maps a flag to rank 1's value for it,
# RANK1_CWD is a folder rank 1 runs in (its own copy of a relative --calib file, say).
_RANK_1_DIFFERS = (
    "import json, os, runpy, sys\n"
    "if os.environ.get('RANK') == '1':\n"
    "    swap = json.loads(os.environ.get('RANK1_ARGS', '{}'))\n"
    "    sys.argv = [swap.get(sys.argv[i - 1], a) if i else a for i, a in enumerate(sys.argv)]\n"
    "    os.chdir(os.environ.get('RANK1_CWD', '.'))\n"
    "runpy.run_module('sleb', run_name='__main__')\n")


@pytest.mark.parametrize("rank_1, named", [
    ({"--remove": "1"},
     "ranks disagree on --remove (rank 0 has 2, rank 1 has 1); start every rank with the same command"),
    ({"--nsamples": "4"}, "ranks disagree on --nsamples (rank 0 has 5, rank 1 has 4)"),
    ({"--seqlen": "12"}, "ranks disagree on --seqlen (rank 0 has 16, rank 1 has 12)"),
    ("calib.txt", "ranks disagree on the tokens of --calib (rank 0 has "),  # same name, other text
    ({"--heal-lr": "0.01"}, "ranks disagree on --heal-lr (rank 0 has 0.001, rank 1 has 0.01)"),
    ({"--heal-batch-size": "2"}, "ranks disagree on --heal-batch-size (rank 0 has 4, rank 1 has 2)"),
], ids=["remove", "nsamples", "seqlen", "calib-text", "heal-lr", "heal-batch-size"])
def test_ranks_started_differently_all_stop_before_any_work(tmp_path, rank_1, named):
    if rank_1 == "calib.txt":
        (tmp_path / "node2").mkdir()
        (tmp_path / "node2" / "calib.txt").write_text(" ".join(f"w{(i * 11) % 250}" for i in range(3000)))
        env = {"RANK1_CWD": str(tmp_path / "node2")}
    else:
        env = {"RANK1_ARGS": json.dumps(rank_1)}
    heal = "heal" in named
    extra = ["--heal", "--heal-steps", "2", "--heal-lr", "0.001", "--heal-batch-size", "4"] if heal else []
    proc, elapsed, ours = _prune_through(tmp_path, _RANK_1_DIFFERS, env, extra)
    assert proc.returncode != 0, proc.stderr
    assert len(ours) == len(set(ours)) and all(len(line.splitlines()) == 1 for line in ours)
    assert elapsed < 60
    assert ours and all(named in line for line in ours), proc.stderr  # whichever ranks got to say it, say the same
    written = sorted(p.name for p in tmp_path.rglob("*"))
    assert written == sorted(["tiny", *os.listdir(tmp_path / "tiny"), "calib.txt", "wrapper.py",
                              *(["node2", "calib.txt"] if rank_1 == "calib.txt" else [])])  # nothing else anywhere


def test_a_rank_that_never_comes_is_given_up_on_after_sleb_dist_timeout(tmp_path):
    # Rank 1 hangs before its first collective (stuck on a slow disk, say).
    proc, elapsed, ours = _prune_through(tmp_path, (
        "import os, runpy, time, sleb.distributed as d\n"
        "if os.environ.get('RANK') == '1':\n"
        "    d.agree = lambda *a, **k: time.sleep(600)\n"
        "runpy.run_module('sleb', run_name='__main__')\n"), {"SLEB_DIST_TIMEOUT": "3"})
    assert proc.returncode != 0 and elapsed < 60
    # torchrun then stops the stuck rank with SIGTERM, which it may report as such.
    stopped = "Error: [rank 1] stopped by SIGTERM: another rank failed or the job was stopped; nothing was written"
    assert [line for line in ours if line != stopped] == [
        "Error: [rank 0] stopped: waited 3 s (SLEB_DIST_TIMEOUT) for another rank; it is stuck, failed (see its "
        "error) or is slower than that (then raise SLEB_DIST_TIMEOUT)"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_disagreement_names_each_differing_setting_with_every_ranks_value():
    from sleb.distributed import agree, disagreement

    same = {"--remove": 2, "--calib": "c.txt", "--ratio": None, "--tolerance": float("nan")}
    assert disagreement([same, dict(same), dict(same)]) is None
    assert disagreement([same, {**same, "--remove": 1, "--ratio": 0.25}, {**same, "--remove": 1}]) == (
        "ranks disagree on --remove (rank 0 has 2, ranks 1, 2 have 1) "
        "and --ratio (ranks 0, 2 have none, rank 1 has 0.25)")
    assert disagreement([{"a": 1}, {}]) == "ranks disagree on a (rank 0 has 1, rank 1 has nothing)"
    digest = "ab" * 32  # hashes and long values are cut to their first digits
    assert disagreement([{"t": digest}, {"t": "cd" * 32}]) == (
        "ranks disagree on t (rank 0 has abababababab..., rank 1 has cdcdcdcdcdcd...)")
    close = lambda a, b: abs(a - b) < 0.1  # noqa: E731  (fingerprints compare within rounding)
    assert disagreement([{"w": 1.0}, {"w": 1.05}], same=close) is None
    assert agree({"--remove": 2}) == []  # one process: nothing to compare


def test_only_collectives_that_time_out_are_blamed_on_sleb_dist_timeout():
    from sleb.distributed import waited_too_long

    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 3000ms for send operation")
    assert "SLEB_DIST_TIMEOUT" in waited_too_long(gloo)
    assert waited_too_long(TimeoutError("ReadTimeout fetching config.json from the hub")) is None
    assert waited_too_long(RuntimeError("gloo: Connection closed by peer")) is None


def test_sleb_dist_timeout_must_be_a_positive_number(monkeypatch):
    from sleb.distributed import timeout
    from sleb.errors import BadInput

    monkeypatch.delenv("SLEB_DIST_TIMEOUT", raising=False)
    assert timeout().total_seconds() == 7200  # two hours: see sleb.distributed
    monkeypatch.setenv("SLEB_DIST_TIMEOUT", "90")
    assert timeout().total_seconds() == 90
    for bad in ("soon", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("SLEB_DIST_TIMEOUT", bad)
        with pytest.raises(BadInput, match="SLEB_DIST_TIMEOUT must be a number of seconds above 0"):
            timeout()


def _heal_case(params: str, batch_size: int):
    """A tiny pruned model, its healing windows (9 to train on: the last batch of each pass is short) and
    targets, and the heal settings."""
    import copy

    from sleb.config import Healing
    from sleb.heal import split_windows, teacher_targets

    dense = family_model("llama", layers=6)
    train, held = split_windows(random_windows(24, 16, seed=1), 9, 4, seed=0)
    targets = (teacher_targets(dense, train, 16, progress=False), teacher_targets(dense, held, 16, progress=False))
    pruned = copy.deepcopy(dense)
    sleb.remove_blocks(pruned, [2, 3])
    settings = Healing(params, steps=7, batch_size=batch_size, eval_every=2, patience=100, lr=1e-2)
    return pruned, train, held, targets, settings


# The heals two gloo ranks run in one spawn (starting processes is most of the time): name -> (parameter
# set, global batch, minutes). With minutes, a time budget instead of steps, and rank 1's clock jumps
# 1000 s ahead once the heal starts (alone it would stop before its first step).
_RANK_HEALS = {"lora": ("lora", 3, None), "neighbours": ("neighbours", 3, None), "minutes": ("neighbours", 3, 0.05)}


def _heal_worker(rank: int, world: int, port: int, out: str) -> None:
    from dataclasses import replace
    from datetime import timedelta

    from sleb.heal import heal

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        for name, (params, batch_size, minutes) in _RANK_HEALS.items():
            pruned, train, held, targets, settings = _heal_case(params, batch_size)
            if minutes is not None:
                settings = replace(settings, steps=None, minutes=minutes)
                if rank == 1:
                    import time

                    real, calls = time.perf_counter, []

                    def ahead():  # the heal's first reading (its start) is true, every later one 1000 s on
                        calls.append(1)
                        return real() + (1000.0 if len(calls) > 1 else 0.0)

                    time.perf_counter = ahead
            record = heal(pruned, train, held, *targets, settings, near=[1, 2], seed=0, progress=False)
            torch.save({"weights": pruned.state_dict(), "record": record.to_dict()}, f"{out}.{name}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_heals(tmp_path_factory):
    """`_RANK_HEALS` run by two gloo ranks: name -> [rank 0's, rank 1's] {"weights", "record"}."""
    out = str(tmp_path_factory.mktemp("heals") / "healed")
    mp.spawn(_heal_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return {name: [torch.load(f"{out}.{name}.{rank}", weights_only=True) for rank in range(2)] for name in _RANK_HEALS}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.spec
@pytest.mark.parametrize("params", ["lora", "neighbours"])
def test_two_ranks_heal_like_one_process_with_the_same_global_batch(rank_heals, params):
    from sleb.heal import heal

    # Global batch 3 over 2 ranks: shares of 2 and 1, and a last batch of 1 window, where rank 1 runs a
    # stand-in window that weighs nothing.
    pruned, train, held, targets, settings = _heal_case(params, 3)
    single = heal(pruned, train, held, *targets, settings, near=[1, 2], seed=0, progress=False)
    assert single.best_step > 0
    for shared in rank_heals[params]:
        record = shared["record"]
        assert record["world_size"] == 2 and record["steps"] == single.steps == 7
        assert record["best_step"] == single.best_step
        for a, b in zip(record["curve"], single.curve):
            assert a["step"] == b["step"]
            assert a["heldout_kl"] == pytest.approx(b["heldout_kl"], rel=1e-5)
            assert a["heldout_ppl"] == pytest.approx(b["heldout_ppl"], rel=1e-5)
            assert (a["train_kl"] is None and b["train_kl"] is None) or a["train_kl"] == pytest.approx(b["train_kl"],
                                                                                                    rel=1e-5)
        weights = pruned.state_dict()
        assert set(shared["weights"]) == set(weights)
        for key, value in weights.items():
            torch.testing.assert_close(shared["weights"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.spec
@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "smollm2-135m"])
def test_torchrun_heal_equals_one_process_with_the_same_global_batch(tmp_path, model):
    """`--heal` under torchrun (2 gloo ranks) against one process, same command: --heal-batch-size is the
    global batch. The real model (SmolLM2-135M, offline) and a tiny one."""
    from safetensors.torch import load_file

    if model == "tiny":
        from tiny_models import save_tiny

        model = save_tiny(tmp_path / "tiny", layers=6)
        (tmp_path / "calib.txt").write_text(" ".join(f"w{(i * 7) % 250}" for i in range(3000)))
        args = ["--remove", "2", "--calib", "calib.txt", "--nsamples", "5", "--seqlen", "16", "--heal-windows", "9",
                "--heal-batch-size", "3", "--heal-lr", "0.01"]
    else:
        args = ["--remove", "4", "--calib", "gensim-wiki", "--nsamples", "2", "--seqlen", "64", "--heal-windows",
                "16", "--heal-batch-size", "4"]
    args += ["--device", "cpu", "--dtype", "float32", "--heal", "--heal-steps", "6", "--heal-eval-every", "2",
             "--heal-heldout-windows", "4"]
    single = _sleb("prune", model, "-o", "single", *args, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    multi = _sleb("prune", model, "-o", "multi", *args, cwd=tmp_path, launcher=TORCHRUN)
    assert multi.returncode == 0, multi.stderr
    assert multi.stderr.count("healed lora") == 1  # rank 0 alone logs
    one, two = (json.loads((tmp_path / n / "sleb_report.json").read_text())["healing"] for n in ("single", "multi"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["best_step"] == two["best_step"] > 0 and one["steps"] == two["steps"] == 6
    for a, b in zip(one["curve"], two["curve"]):
        assert abs(a["heldout_ppl"] - b["heldout_ppl"]) <= 1e-4 * a["heldout_ppl"]  # the issue asks 0.5%
        assert a["heldout_kl"] == pytest.approx(b["heldout_kl"], rel=1e-3, abs=1e-6)
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "multi" / "model.safetensors")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    print(f"{model}: held-out ppl {one['heldout_ppl_after']:.6f} one process vs {two['heldout_ppl_after']:.6f} two "
          f"ranks; largest weight difference {max((a[k] - b[k]).abs().max().item() for k in a):.3g}")


def test_a_time_budget_under_torchrun_ends_every_rank_at_rank_0s_step(rank_heals):
    records = [shared["record"] for shared in rank_heals["minutes"]]
    assert records[0]["stopped_by"] == records[1]["stopped_by"] == "minutes"
    assert records[0]["steps"] == records[1]["steps"] > 0  # rank 1's own clock would have stopped it at step 0
    assert [c["heldout_kl"] for c in records[0]["curve"]] == [c["heldout_kl"] for c in records[1]["curve"]]

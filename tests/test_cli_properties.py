"""Property: whatever arguments `sleb prune`, `eval` and `bench` get, they succeed, or fail with one
deliberate error line (exit != 0, no traceback, not the catch-all), and never change a file outside
the outputs they were asked to write."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sleb.cli import main

from tiny_models import save_tiny

ORIGINAL = ("models", "calib.txt", "notes.txt", "empty")


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    save_tiny(root / "models" / "tiny", layers=5)
    (root / "calib.txt").write_text(" ".join(f"w{(i * 7) % 250}" for i in range(3000)))
    (root / "notes.txt").write_text("not a model, not text to calibrate on")
    (root / "empty").mkdir()
    return root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*")}


def mostly(good, bad) -> st.SearchStrategy:
    """A valid value seven times in eight, else one of the bad ones (so that whole commands often succeed)."""
    return st.tuples(st.integers(0, 7), st.sampled_from(bad)).map(lambda t: good if t[0] else t[1])


MODEL = mostly("models/tiny", ["models/none", "notes.txt", "empty", "./missing", "calib.txt"])
OUT = mostly("out", [".", "..", "models", "models/tiny", "notes.txt", "empty", "calib.txt", "out2/sub"])
BUDGET = st.one_of(
    mostly(["--remove", "1"], [[], ["--remove", "-1"], ["--remove", "9"], ["--remove", "3"]]),
    st.sampled_from([["--ratio", "0.2"], ["--ratio", "1.5"], ["--ratio", "nan"], ["--target-params", "0.9"],
                     ["--target-params", "nan"], ["--target-params", "1e12"], ["--max-ppl-increase", "50"],
                     ["--max-ppl-increase", "inf"], ["--max-ppl-increase", "0.5"]]),
)


def flag(name: str, good, bad) -> st.SearchStrategy[list[str]]:
    return mostly(good, bad).map(lambda v: [] if v is None else [name, str(v)])


prune_args = st.tuples(
    MODEL.map(lambda m: [m]),
    OUT.map(lambda o: ["-o", o]),
    BUDGET,
    flag("--calib", "calib.txt", ["notes.txt", "nope.txt", "empty", "bogus"]),
    flag("--nsamples", 2, [0, 1]),
    flag("--seqlen", 16, [1, 8, 100000]),
    flag("--early-barrier", None, [-1, 0, 3]),
    flag("--latter-barrier", None, [-2, 0]),
    flag("--metric", None, ["cosine", "random", "bogus"]),
    flag("--checkpoint", None, ["ck.json", "notes.txt", "empty", "out/ck.json"]),
    flag("--device", "cpu", ["cuda:3", "nowhere"]),
    mostly([], [["--overwrite"]]),
).map(lambda parts: ["prune", *[a for part in parts for a in part]])

eval_args = st.tuples(
    st.lists(MODEL, min_size=1, max_size=2),
    flag("--ppl", "calib.txt", ["notes.txt", "bogus", "calib.txt,nope.txt"]),
    flag("--seqlen", 16, [1, 99999]),
    flag("--max-windows", 2, [0]),
    flag("--json", None, ["e.json", "empty", "models/tiny/config.json", "out3/e.json"]),
    flag("--markdown", None, ["e.md", "calib.txt"]),
    flag("--device", "cpu", ["cuda:2"]),
).map(lambda parts: ["eval", *parts[0], *[a for part in parts[1:] for a in part]])

bench_args = st.tuples(
    st.lists(MODEL, min_size=1, max_size=2),
    st.just(["--prefill-len", "8", "--gen-batch", "1", "--gen-prompt", "4", "--gen-tokens", "2", "--repeats", "1"]),
    flag("--warmup", 1, [0]),
    flag("--prefill-len", 16, [0, 99999]),
    flag("--json", None, ["b.json", "empty", "notes.txt"]),
    flag("--device", "cpu", ["mps"]),
).map(lambda parts: ["bench", *parts[0], *[a for part in parts[1:] for a in part]])


def outputs_of(args: list[str]) -> list[str]:
    """The paths a command was asked to write."""
    flags = ("-o", "--json", "--markdown", "--checkpoint")
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in flags]


def allowed(rel: str, outputs: list[str], root: Path) -> bool:
    path = (root / rel).resolve()
    if rel.split(os.sep)[0] in ORIGINAL:
        return False  # the inputs never change, whatever was asked
    return any(path == (root / o).resolve() or (root / o).resolve() in path.parents for o in outputs)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(args=st.one_of(prune_args, eval_args, prune_args, bench_args, prune_args))
def test_any_arguments_end_cleanly_and_touch_only_the_outputs(playground, args, monkeypatch):
    monkeypatch.chdir(playground)
    shutil.rmtree(playground / "out", ignore_errors=True)  # the last example's output: "out" starts absent
    before = digest(playground)
    result = CliRunner().invoke(main, args)
    output = result.output
    event(f"{args[0]} exit {result.exit_code}")
    if result.exit_code != 0:
        lines = (result.stderr or output).strip().splitlines()
        assert result.exit_code in (1, 2), (args, result.exit_code, output)
        assert lines and lines[-1].startswith("Error:"), (args, output)
        assert "Traceback" not in output and "rerun with --debug" not in output, (args, output)
    after = digest(playground)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    bad = sorted(k for k in changed if not allowed(k, outputs_of(args), playground))
    assert not bad, (args, bad, output)

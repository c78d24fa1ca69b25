"""The benchmark scripts still import: every `from sleb... import name` in benchmarks/ resolves (they are not run
in the suite, so a rename would otherwise break them silently)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_benchmark_imports_resolve(script):
    missing = []
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sleb":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name}")
    assert not missing, f"{script.name} imports names sleb no longer has: {missing}"


def test_racing_replay_runs_on_loss_tables(tmp_path, monkeypatch, capsys):
    """The replay benchmark on small synthetic tables (two steps of a 6-block model): a row per setting with
    every step's speedup and the whole search's, and the oracle row never slower than exact."""
    import json
    import sys

    import torch

    g = torch.Generator().manual_seed(0)
    alive, tables = list(range(6)), []
    for removed in (2, 3):
        cands = alive[1:-1]
        losses = 3 + torch.rand(len(cands), 8, generator=g, dtype=torch.float64)
        losses[cands.index(removed)] -= 0.5
        tables.append({"alive": alive, "cands": cands, "losses": losses.tolist()})
        alive = [b for b in alive if b != removed]
    path = tmp_path / "tables.json"
    path.write_text(json.dumps({"blocks": 6, "removed": [2, 3], "metric1": [0.5, 0.4, 0.1, 0.2, 0.3, 0.6],
                                "tables": tables}))
    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    replay = importlib.import_module("racing_replay")
    monkeypatch.setattr(sys, "argv", ["racing_replay.py", "--tables", str(path), "--orders", "3", "--guesses", "1,2",
                                      "--confidence", "0.9", "--tolerance", "0.001", "--min-windows", "4"])
    replay.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x (" in line]
    assert len(rows) == 3  # best of 1, best of 2, oracle
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        speedups = [float(c.split("x")[0]) for c in cells[4:]]
        assert len(speedups) == 3 and all(s >= 1.0 for s in speedups)


def test_speed_aware_tables_each_unit_result_against_block_sleb(monkeypatch):
    """The speed-aware comparison's table from `sleb bench --json` and `sleb eval --json` shaped records:
    speedups with the two spreads added, and each unit row's perplexity change against block SLEB's row."""
    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    speed_aware = importlib.import_module("speed_aware")

    def model(speedup, spread):
        return {"decode_speedup": speedup, "decode": {"spread": spread}}

    bench = {"models": [model(1.0, 0.01), model(1.18, 0.02), model(1.22, 0.03)]}
    plain = {"models": [{"perplexity": {"wiki": {"ppl": p}, "lee": {"ppl": 2 * p}}} for p in (20.0, 50.0, 40.0)]}
    text = speed_aware.table("generation:1024", "decode", bench, {"plain": plain}, ["sublayer"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "model" not in line]
    assert rows[1] == "| block SLEB | 1.18x ±3% | 50.00 | 100.00 |"
    assert rows[2] == "| sublayer per-second | 1.22x ±4% | 40.00 (-20.0%) | 80.00 (-20.0%) |"
    assert speed_aware.bench_shape("prefill:512")[0] == "prefill"
    assert "--no-prefill" in speed_aware.bench_shape("generation:128")[1]

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

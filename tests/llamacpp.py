"""A real llama.cpp runtime for the tests: node-llama-cpp's prebuilt CPU binaries (llama_runtime/, also what `sleb bench --runtime llama.cpp` runs).

Test-only and outside the Python install: `make test` (and `make llama-runtime`) runs `npm ci` there
when npm exists. Tests that need it skip, with the reason, where it is absent.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

RUNTIME = Path(__file__).parents[1] / "llama_runtime"


def _node() -> str:
    """node, with node-llama-cpp installed in RUNTIME; skips the test (saying why) where it is not."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip(f"llama.cpp runtime: prebuilt binaries are installed for linux x86_64 only, not {platform.machine()}")
    node = shutil.which("node")
    if node is None:
        pytest.skip("llama.cpp runtime: node not found (install Node.js >= 20; `make test` then installs node-llama-cpp)")
    if not (RUNTIME / "node_modules" / "node-llama-cpp").is_dir():
        pytest.skip("llama.cpp runtime not installed: run `make llama-runtime` (npm install in llama_runtime)")
    return node


def llama_cpp_logits(path, tokens: list[int], flash_attention: bool = False):
    """(llama.cpp's logits after each of `tokens` as a float32 array tokens x vocabulary, facts) for the file at
    `path`; facts: {"flash_attention_supported": node-llama-cpp's decision for the file, ...} (logits.mjs)."""
    import tempfile

    import numpy as np

    node = _node()
    with tempfile.TemporaryDirectory() as folder:
        ids, out = Path(folder) / "tokens.json", Path(folder) / "logits.bin"
        ids.write_text(json.dumps([int(t) for t in tokens]))
        env = {**os.environ, "SLEB_FLASH_ATTENTION": "1" if flash_attention else "0"}
        proc = subprocess.run([node, "logits.mjs", str(path), str(ids), str(out)], cwd=RUNTIME, capture_output=True,
                              text=True, timeout=600, env=env)
        assert proc.returncode == 0, f"llama.cpp failed on {path}:\n{proc.stderr[-3000:]}"
        facts = json.loads(proc.stdout.strip().splitlines()[-1])
        logits = np.fromfile(out, dtype=np.float32).reshape(facts["n_tokens"], facts["n_vocab"])
    return logits, facts


def llama_cpp_generate(path, prompt: str = "The capital of France is", max_tokens: int = 8, swa: bool = False) -> dict:
    """Load `path` with llama.cpp and generate greedily: {"n_layer": loader's count, "text": ..., ...}.

    `swa`: also "is_swa", each layer's sliding-window flag (0/1) as llama.cpp's loader set it."""
    node = _node()
    env = {**os.environ, "SLEB_LLAMA_SWA": "1" if swa else "0"}
    proc = subprocess.run([node, "run.mjs", str(path), prompt, str(max_tokens)], cwd=RUNTIME, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"llama.cpp failed on {path}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])

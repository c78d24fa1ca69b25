"""#32: `--speed-at` with a .gguf output: the cost model timed in llama.cpp on probe files (sleb.llamacpp_costs).

llama.cpp is replaced by a clock that prices each file by what it holds (`_seconds`: a fixed part, and every
block, attention and MLP it runs at a known cost), so the fit can be checked exactly; the real runtime's
numbers are in docs/results.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

import sleb.llamacpp_bench
import sleb.llamacpp_costs
from sleb.errors import SlebError
from sleb.gguf_io.reader import block_count, field_value
from sleb.llamacpp_bench import FileSpeed, LlamaCppResult, Runtime, gguf_cost
from sleb.llamacpp_costs import GEN_TOKENS, fit_costs, measure_gguf_costs, probe_layers
from sleb.runfile import report_path
from sleb.saver import save_gguf
from sleb.settings import SearchOptions

from helpers import invoke
from tiny_models import family_model

FIXED, BLOCK, ATTENTION, MLP = 1.0, 0.1, 0.3, 0.2  # seconds per decode step (BLOCK: what is neither branch)


def _seconds(path: str) -> float:
    """What the fake llama.cpp takes for one step of the file at `path`."""
    reader = gguf.GGUFReader(path)
    arch, blocks = block_count(reader)

    def count(key: str, runs) -> int:
        value = field_value(reader, f"{arch}.{key}")
        return sum(1 for v in value if runs(v)) if isinstance(value, list) else blocks

    attention = count("attention.head_count", lambda heads: heads > 0)
    mlp = count("feed_forward_length", lambda width: width > 1)  # a deci stand-in MLP has width 1
    return FIXED + BLOCK * blocks + ATTENTION * attention + MLP * mlp


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    """llama.cpp's bench replaced by `_seconds`; returns the list of jobs it ran."""
    jobs = []

    def bench(job, progress=None, show_bar=True):
        job = job.validate()
        jobs.append(job)
        files = []
        for path in job.files:
            speed = FileSpeed(path, gguf_cost(path))
            per_round = [_seconds(path) * (1.0, 1.01, 0.99)[r % 3] for r in range(job.rounds)]  # +-1%, median exact
            speed.prefill_s = per_round if job.prefill_len else []
            speed.gen_s = [s * job.gen_tokens for s in per_round] if job.gen_tokens else []
            files.append(speed)
        return LlamaCppResult(job, Runtime("fake", Path("fake")), "b0", {"before": [0.0], "after": [0.0]}, files)

    monkeypatch.setattr(sleb.llamacpp_costs, "run_llamacpp_bench", bench)
    monkeypatch.setattr(sleb.llamacpp_bench, "find_runtime", lambda llama_bench=None: Runtime("fake", Path("fake")))
    return jobs


@pytest.fixture
def llama_gguf(tiny_tokenizer, tmp_path):
    """A runnable 6-block llama GGUF (random weights, Q8_0)."""
    model = family_model("llama", layers=6)
    return save_gguf(model, tiny_tokenizer, tmp_path / "llama.gguf", gguf_type="q8_0", progress=False)


def test_probe_layers_spread_over_the_candidates_and_skip_layer_0():
    assert probe_layers(30, SearchOptions()) == [2, 5, 8, 11, 15, 18, 21, 24, 27]
    assert probe_layers(6, SearchOptions(early_barrier=0, latter_barrier=0)) == [2, 4]
    with pytest.raises(SlebError, match="no candidate layers to probe"):
        probe_layers(2, SearchOptions())


def test_the_fit_recovers_each_units_cost_from_whole_file_timings(fake_llama_cpp, llama_gguf):
    cost = measure_gguf_costs(llama_gguf, "generation:16", 6, branches=True,
                              options=SearchOptions(early_barrier=0, latter_barrier=0), progress=False)
    assert cost.spec == "generation:16" and cost.total_seconds == pytest.approx(FIXED + 6 * (BLOCK + ATTENTION + MLP))
    assert cost.block_seconds == pytest.approx((BLOCK + ATTENTION + MLP,) * 6)
    assert [a for a, _ in cost.branch_seconds] == pytest.approx([ATTENTION] * 6)
    assert [m for _, m in cost.branch_seconds] == pytest.approx([MLP] * 6)
    assert cost.fixed_seconds == pytest.approx(FIXED) and cost.spread == pytest.approx(0.01, rel=0.05)
    (job,) = fake_llama_cpp
    assert (job.prefill_len, job.gen_prompt, job.gen_tokens) == (0, 16, GEN_TOKENS)
    assert [Path(f).name for f in job.files] == ["llama.gguf", "blocks.gguf", "deci.gguf", "attention.gguf", "mlp.gguf"]
    info = cost.info
    assert info["runtime"] == "llama.cpp" and info["probe_layers"] == [2, 4] and info["fit"]["deci_overhead"] == 0
    assert set(info["probes"]) == {"source", "blocks", "deci", "attention", "mlp"} and "probe files" in info["how"]
    # Blocks only: two files, no branch costs.
    blocks = measure_gguf_costs(llama_gguf, "prefill:8", 6, branches=False, progress=False)
    assert blocks.branch_seconds is None and blocks.block_seconds == pytest.approx((BLOCK + ATTENTION + MLP,) * 6)
    assert fake_llama_cpp[-1].prefill_len == 8 and len(fake_llama_cpp[-1].files) == 2


def test_noisy_probes_are_clamped_or_refused():
    fit = fit_costs({"source": 10.0, "blocks": 9.0, "deci": 10.0, "attention": 9.4, "mlp": 9.5}, 10, 2, True)
    assert fit["block"] == pytest.approx(0.55) and fit["clamped"]  # 0.5 a block, but 0.3 + 0.25 in its branches
    with pytest.raises(SlebError, match="probes contradict each other: removing 2 of 10 blocks saved nothing"):
        fit_costs({"source": 10.0, "blocks": 10.2}, 10, 2, False)
    # 2 of 10 blocks saved 3 of 10 s (more than their share): each block is a tenth of the pass, branches alike.
    fit = fit_costs({"source": 10.0, "blocks": 7.0, "deci": 10.0, "attention": 8.0, "mlp": 9.0}, 10, 2, True)
    assert fit["block"] == pytest.approx(1.0) and fit["block_probe"] == pytest.approx(1.5)
    assert (fit["attention"], fit["mlp"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert "exceed the pass" in fit["clamped"][0]


def test_prune_to_a_gguf_searches_and_times_in_llama_cpp(fake_llama_cpp, llama_gguf, tiny_folder, tmp_path):
    _, text = tiny_folder
    out = tmp_path / "att.gguf"
    result = invoke("prune", llama_gguf, "-o", out, "--unit", "attention", "--unit-score", "per-second",
                    "--target-speedup", "1.1", "--speed-at", "generation:16", "--early-barrier", "1",
                    "--latter-barrier", "0", "--calib", text, "--nsamples", "2", "--seqlen", "12")
    assert result.exit_code == 0, result.output
    # 4.6 s a step; each attention saves 0.3 s: two are 4.6 / 4.0 = 1.15x (one is 1.07x).
    report = json.loads(report_path(out).read_text())
    assert len(report["removed_units"]) == 2 and report["gguf"]["attention_layers"] == 4
    speed = report["speed"]
    assert speed["measured"]["runtime"] == "llama.cpp" and speed["predicted_speedup"] == pytest.approx(1.15)
    assert speed["measured_speedup"] == pytest.approx(1.15) and "llama.cpp" in speed["measured_in"]
    assert "speedup at generation:16 in llama.cpp: predicted 1.150x, measured 1.150x" in result.output
    assert "the saved file against its source" in result.output
    # The written file was timed before it was moved into place (the same one llama.cpp runs).
    assert len(fake_llama_cpp) == 2 and Path(fake_llama_cpp[1].files[0]) == llama_gguf


def test_refused_before_loading_a_hf_source_to_gguf_and_a_missing_runtime(tiny_folder, llama_gguf, tmp_path,
                                                                           monkeypatch):
    folder, text = tiny_folder
    monkeypatch.setattr(sleb.loading, "load", lambda *a, **k: pytest.fail("loaded"))
    common = ["--remove", "1", "--speed-at", "generation:8", "--calib", text, "--nsamples", "2", "--seqlen", "12"]
    result = invoke("prune", folder, "-o", tmp_path / "hf.gguf", *common)
    assert result.exit_code != 0 and "this source is a Hugging Face model" in result.output.strip().splitlines()[-1]
    monkeypatch.setenv("SLEB_LLAMA_RUNTIME", str(tmp_path / "nothing"))
    result = invoke("prune", llama_gguf, "-o", tmp_path / "x.gguf", *common)
    assert result.exit_code != 0 and "setup-runtime" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "hf.gguf").exists() and not (tmp_path / "x.gguf").exists()


def test_a_resumed_search_goes_on_with_the_llama_cpp_table_its_checkpoint_recorded(fake_llama_cpp, llama_gguf,
                                                                                  tiny_folder, tmp_path):
    _, text = tiny_folder
    common = ["--unit", "attention", "--unit-score", "per-second", "--target-speedup", "1.1", "--speed-at",
              "generation:16", "--calib", text, "--nsamples", "2", "--seqlen", "12", "--checkpoint",
              tmp_path / "search.ckpt"]
    first = invoke("prune", llama_gguf, "-o", tmp_path / "a.gguf", *common)
    assert first.exit_code == 0, first.output
    probes = len(fake_llama_cpp)  # the probes, then the written file
    again = invoke("prune", llama_gguf, "-o", tmp_path / "b.gguf", *common)
    assert again.exit_code == 0, again.output
    assert "using the llama.cpp cost table recorded in" in again.output
    assert len(fake_llama_cpp) == probes + 1  # only the written file was timed again
    first_report, second = (json.loads(report_path(tmp_path / f).read_text()) for f in ("a.gguf", "b.gguf"))
    assert second["removed"] == first_report["removed"]
    assert second["speed"]["total_seconds"] == first_report["speed"]["total_seconds"]

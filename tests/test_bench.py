"""`sleb.bench` and `sleb bench`: structure, ideal speedup, alternation, exact generation, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from sleb import bench as B
from sleb import sizes  # noqa: E402
from sleb.cli import main
from sleb.errors import SlebError
from sleb.units import remove_blocks
from tiny_models import save_tiny, tiny_config, tiny_model, tiny_tokenizer

# spread_target inf: exactly `repeats` timed runs, however noisy the machine.
SMALL = dict(prefill_batch=2, prefill_len=32, gen_batch=2, gen_prompt=8, gen_tokens=6, warmup=1, repeats=2,
             spread_target=float("inf"))


@pytest.fixture(scope="module")
def pair():
    tok = tiny_tokenizer()
    dense = tiny_model()
    pruned = tiny_model()
    remove_blocks(pruned, [1, 2])
    return tok, dense, pruned


def _flops_by_hand(model, context):
    """Forward FLOPs per token of a tiny Llama, written out from its shapes (not via sleb.flops)."""
    cfg = model.config
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_block = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h  # q, o; k, v; mlp; two norms
    layers = cfg.num_hidden_layers
    return 2 * layers * per_block + 2 * h * v + layers * 4 * (context / 2) * h


def test_two_models_structure_and_ideal_speedup(pair):
    tok, dense, pruned = pair
    result = B.bench([("dense", dense, tok), ("pruned", pruned, tok)], B.BenchConfig(**SMALL))
    base, other = result.models
    assert [m.name for m in result.models] == ["dense", "pruned"]
    assert (base.blocks, other.blocks) == (4, 2)
    assert base.params == sum(p.numel() for p in dense.parameters())
    buffers = sum(b.numel() * b.element_size() for b in dense.buffers())  # rotary inv_freq
    assert base.weight_bytes == 4 * base.params + buffers  # fp32, nothing tied
    for m in result.models:
        assert len(m.prefill.samples) == 2 and len(m.generation.samples) == 2
        assert all(s > 0 for s in m.prefill.samples + m.generation.samples)
        assert m.prefill_peak_bytes >= m.weight_bytes and m.generation_peak_bytes >= m.weight_bytes
        assert m.generation_tokens_per_s == pytest.approx(2 * 6 / m.generation.median)
    assert base.prefill_speedup == 1.0 and base.prefill_ideal_speedup == 1.0
    expected = _flops_by_hand(dense, 32) / _flops_by_hand(pruned, 32)
    assert other.prefill_ideal_speedup == pytest.approx(expected, rel=1e-9)
    assert 1.3 < other.prefill_ideal_speedup < 2.0  # the head is not removed
    gen_context = 2 * 8 + 6
    assert other.generation_ideal_speedup == pytest.approx(
        _flops_by_hand(dense, gen_context) / _flops_by_hand(pruned, gen_context), rel=1e-9)
    assert other.prefill_speedup == pytest.approx(base.prefill.median / other.prefill.median)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["models"][1]["generation"]["samples_s"] == other.generation.samples
    table = B.format_table(result)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3 and "| pruned |" in table


def test_decode_times_the_steps_after_the_first_token_and_not_the_prompt(pair):
    """The decode figure starts at the first new token: a slow prompt pass (0.3 s, injected) is inside the
    generation time and outside the decode time, and every later step (10 ms each, injected) is inside."""
    import time as clock

    tok, dense, pruned = pair

    def slow(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        clock.sleep(0.3 if ids.shape[1] > 1 else 0.01)

    hooks = [m.register_forward_pre_hook(slow, with_kwargs=True) for m in (dense, pruned)]
    try:
        result = B.bench([("dense", dense, tok), ("pruned", pruned, tok)],
                         B.BenchConfig(**{**SMALL, "prefill": False, "gen_tokens": 4}))
    finally:
        for h in hooks:
            h.remove()
    for m in result.models:
        assert m.decode_tokens == 2 * 3 and len(m.decode.samples) == len(m.generation.samples) == 2
        for total, decode in zip(m.generation.samples, m.decode.samples):
            assert 3 * 0.01 <= decode < 0.3 <= total - decode
        assert m.decode_tokens_per_s == pytest.approx(6 / m.decode.median)
    assert result.models[1].decode_speedup == pytest.approx(result.models[0].decode.median
                                                            / result.models[1].decode.median)
    assert "decode (tok/s)" in B.format_table(result)
    assert json.loads(json.dumps(result.to_dict()))["models"][0]["decode"]["samples_s"] == result.models[0].decode.samples


def test_models_alternate_within_each_repeat(pair):
    tok, dense, pruned = pair
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
             for name, m in (("a", dense), ("b", pruned))]
    try:
        B.bench([("a", dense, tok), ("b", pruned, tok)], B.BenchConfig(**{**SMALL, "repeats": 3, "generation": False}))
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["a", "b"] * 4  # 1 warm-up + 3 repeats, in turn


def test_generation_makes_exactly_g_tokens_even_when_eos_wins(pair):
    tok, dense, _ = pair
    model = tiny_model()

    def eos_always(module, args, output):
        output = output.clone()
        output[..., tok.eos_token_id] += 1e4
        return output

    model.lm_head.register_forward_hook(eos_always)
    ids = B.random_ids(tok, 2, 5, seed=0)
    out = B._generate_fn(model, ids, 7, tok)()
    assert out.shape == (2, 5 + 7)
    assert (out[:, 5:] != tok.eos_token_id).all()


def test_inputs_are_seeded_and_avoid_special_tokens():
    tok = tiny_tokenizer()
    a, b = B.random_ids(tok, 3, 50, seed=4), B.random_ids(tok, 3, 50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, B.random_ids(tok, 3, 50, seed=5))
    assert not set(a.flatten().tolist()) & set(tok.all_special_ids)


def test_mismatched_tokenizers_and_impossible_sizes_raise(pair):
    tok, dense, pruned = pair
    other_tok = tiny_tokenizer(prefix="x")
    with pytest.raises(SlebError, match="different tokenizer"):
        B.bench([("a", dense, tok), ("b", pruned, other_tok)], B.BenchConfig(**SMALL))
    with pytest.raises(SlebError, match="context of 256"):
        B.bench([("a", dense, tok)], B.BenchConfig(**{**SMALL, "prefill_len": 300}))
    with pytest.raises(SlebError, match="context of 256"):
        B.bench([("a", dense, tok)], B.BenchConfig(**{**SMALL, "gen_prompt": 200, "gen_tokens": 100}))
    with pytest.raises(SlebError, match="GiB free"):
        B.bench([("a", dense, tok)], B.BenchConfig(**{**SMALL, "gen_batch": 10**9}))


def test_weight_bytes_counts_tied_weights_once():
    model = tiny_model(tiny_config())
    untied = sizes.weight_bytes(model)
    cfg = tiny_config()
    cfg.tie_word_embeddings = True
    tied = tiny_model(cfg)
    assert sizes.weight_bytes(tied) == untied - 4 * cfg.vocab_size * cfg.hidden_size


def test_head_size_and_widths_have_one_formula():
    """`sleb.arch`: the config's head_dim when stated, else hidden / heads; the hidden size when no heads are stated."""
    from transformers import LlamaConfig

    from sleb.arch import attention_width, head_dim, kv_width

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert (head_dim(cfg), attention_width(cfg), kv_width(cfg)) == (16, 64, 32)
    cfg.head_dim = 32
    assert (head_dim(cfg), attention_width(cfg), kv_width(cfg)) == (32, 128, 64)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 0, None, None
    assert (head_dim(cfg), attention_width(cfg), kv_width(cfg)) == (64, 64, 64)
    model = tiny_model()
    assert kv_width(model) == kv_width(model.config) == model.config.num_key_value_heads * head_dim(model)

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    dense = save_tiny(root / "dense", layers=4)
    pruned = save_tiny(root / "pruned", layers=3)
    other = root / "other"
    tiny_model().save_pretrained(other)
    tiny_tokenizer(prefix="x").save_pretrained(other)
    return {"dense": dense, "pruned": pruned, "other": str(other), "root": root}


CLI_SIZES = ["--prefill-len", "16", "--gen-batch", "2", "--gen-prompt", "4", "--gen-tokens", "4",
             "--repeats", "2", "--device", "cpu"]


def test_cli_bench_table_and_json(folders):
    out = folders["root"] / "bench.json"
    res = CliRunner().invoke(main, ["bench", folders["dense"], folders["pruned"], *CLI_SIZES, "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [m["blocks"] for m in data["models"]] == [4, 3]
    assert data["config"]["gen_tokens"] == 4 and data["machine"]["torch_threads"] >= 1
    assert "| " + folders["pruned"] in res.stdout


@pytest.mark.parametrize("extra, message", [
    ([], "different tokenizer"),
    (["--prefill-len", "100000"], "context of 256"),
    (["--gen-batch", "1000000000"], "GiB free"),
])
def test_cli_bench_errors_are_one_line(folders, extra, message):
    second = folders["other"] if not extra else folders["pruned"]
    res = CliRunner().invoke(main, ["bench", folders["dense"], second, *CLI_SIZES, *extra])
    assert res.exit_code == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], res.stderr


def test_run_bench_is_sleb_bench_without_the_command_line(folders):
    """`B.run_bench` with a BenchJob, no CLI: the same workload (sizes not given take the CPU defaults), models
    and file as `sleb bench`; only the timings differ."""
    lib, cli = folders["root"] / "lib.json", folders["root"] / "cli.json"
    job = B.BenchJob([folders["dense"], folders["pruned"]], prefill_len=16, gen_batch=2, gen_prompt=4, gen_tokens=4,
                     repeats=2, device="cpu", json_path=str(lib))
    result = B.run_bench(job)
    res = CliRunner().invoke(main, ["bench", folders["dense"], folders["pruned"], *CLI_SIZES, "--json", str(cli)])
    assert res.exit_code == 0, res.output
    ours, theirs = json.loads(lib.read_text()), json.loads(cli.read_text())
    assert ours == json.loads(json.dumps(result.to_dict()))
    assert ours["config"] == theirs["config"] and ours["config"]["cache"] == "dynamic"
    assert ours["config"]["prefill_batch"] == B.CPU_SIZES["prefill_batch"]
    measured = ("prefill", "generation", "speedup", "peak", "warmup", "per_s")
    measured_keys = ("decode", "decode_speedup", "decode_tokens_per_s")
    for a, b in zip(ours["models"], theirs["models"], strict=True):
        assert {k: v for k, v in a.items() if not any(m in k for m in measured) and k not in measured_keys} == \
               {k: v for k, v in b.items() if not any(m in k for m in measured) and k not in measured_keys}
        assert (a["prefill_ideal_speedup"], a["generation_ideal_speedup"]) == \
               (b["prefill_ideal_speedup"], b["generation_ideal_speedup"])
    assert B.format_table(result).splitlines()[0] == res.stdout.splitlines()[0]


def _fake_clock(monkeypatch, seconds):
    """B.timed returns the given durations in turn (then the last one) without timing anything."""
    values = iter(seconds)
    last = [seconds[-1]]

    def fake(fn, device):
        fn()
        last[0] = next(values, last[0])
        return last[0]

    monkeypatch.setattr(B, "timed", fake)


def test_more_repeats_while_the_spread_is_large(pair, monkeypatch):
    tok, dense, _ = pair
    # one model, prefill only: warm-up 1 measures memory (real clock), then repeats 1.0, 2.0, 1.0, ...
    _fake_clock(monkeypatch, [1.0, 2.0] * 20)
    config = B.BenchConfig(**{**SMALL, "spread_target": 0.05, "repeats": 2, "max_repeats": 5, "generation": False})
    result = B.bench([("a", dense, tok)], config)
    assert len(result.models[0].prefill.samples) == 5
    _fake_clock(monkeypatch, [1.0] * 20)
    result = B.bench([("a", dense, tok)], config)
    assert len(result.models[0].prefill.samples) == 2


def test_warm_up_goes_on_while_runs_get_faster(pair, monkeypatch):
    tok, dense, _ = pair
    # warm-up 2 takes 5.0 (compiling), 3 takes 1.0, 4 takes 1.0: the last two agree, so the repeats start
    _fake_clock(monkeypatch, [5.0, 1.0, 1.0, 1.0, 1.0])
    config = B.BenchConfig(**{**SMALL, "warmup": 2, "generation": False})
    model = B.bench([("a", dense, tok)], config).models[0]
    assert model.prefill_warmup_s[1:] == [5.0, 1.0, 1.0] and len(model.prefill.samples) == 2


def test_static_cache_generation(pair):
    tok, dense, pruned = pair
    config = B.BenchConfig(**{**SMALL, "prefill": False, "cache": "static"})
    result = B.bench([("dense", dense, tok), ("pruned", pruned, tok)], config)
    assert all(len(m.generation_warmup_s) >= 2 for m in result.models)  # static: compilation is warmed up
    assert "static cache" in B.format_table(result)
    with pytest.raises(SlebError, match="unknown cache"):
        B.BenchConfig(cache="paged").validate()


def test_default_sizes():
    assert B.default_sizes(on_cuda=True, paper=False) == B.PAPER_SIZES
    assert B.default_sizes(on_cuda=False, paper=True, context=256) == B.PAPER_SIZES
    small = B.default_sizes(on_cuda=False, paper=False, context=48)
    assert small["prefill_len"] == 48 and small["gen_prompt"] + small["gen_tokens"] <= 48


def test_cli_bench_cpu_defaults_finish_fast(folders):
    """No sizes given on CPU: the small default workload, cut to the tiny model's context; an ETA is shown."""
    import time

    start = time.perf_counter()
    res = CliRunner().invoke(main, ["bench", folders["dense"], folders["pruned"], "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert time.perf_counter() - start < 120
    assert "dynamic cache" in res.stdout and "s left" in res.stderr

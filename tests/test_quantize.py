"""`sleb.quantize` and `sleb quantize`: plain reload, smaller weights, the reload check, CLI paths."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("bitsandbytes")

from sleb import bench as B  # noqa: E402
from sleb import sizes  # noqa: E402
from sleb import quantize as Q  # noqa: E402
from sleb.cli import main  # noqa: E402
from sleb.errors import SlebError  # noqa: E402
from sleb.sizes import forward_flops_per_token  # noqa: E402
from tiny_models import save_tiny, tiny_tokenizer  # noqa: E402

Q.quiet_bitsandbytes()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    source = save_tiny(root / "fp32", layers=3)
    results = {m: Q.quantize(source, root / m, m, device="cpu") for m in ("int8", "int4")}
    return root, source, results


def _plain_load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()


@pytest.mark.parametrize("method, layer, factor", [("int8", "Linear8bitLt", 3.5), ("int4", "Linear4bit", 6.0)])
def test_checkpoint_reloads_plainly_and_is_smaller(quantized, method, layer, factor):
    root, source, results = quantized
    result, folder = results[method], root / method
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    model = _plain_load(folder)
    linears = [m for m in model.model.modules() if type(m).__name__ == layer]
    assert len(linears) == result.quantized_layers == 3 * 7
    assert result.linear_bytes_before / result.linear_bytes_after > factor
    fp32 = _plain_load(source)
    assert sizes.weight_bytes(model) == result.weight_bytes < sizes.weight_bytes(fp32) == result.weight_bytes_before
    # same logical shapes: the FLOP model sees the same network, so the ideal speedup over the source is 1
    assert forward_flops_per_token(model, 64) == forward_flops_per_token(fp32, 64)
    assert result.reload_max_logit_diff == 0.0
    report = json.loads((folder / "sleb_report.json").read_text())
    assert report["quantization"]["method"] == method
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        q, f = model(input_ids=ids).logits, fp32(input_ids=ids).logits
    assert torch.isfinite(q).all() and not torch.equal(q, f)  # quantized, and still a working model
    assert (q - f).abs().max() < 0.1 * f.abs().max() + 0.05


def test_reload_check_catches_a_different_checkpoint(quantized):
    root, _, _ = quantized
    other = save_tiny(root / "other-fp32", layers=3, seed=1)
    Q.quantize(other, root / "other-int8", "int8", device="cpu")
    model = _plain_load(root / "int8")
    with pytest.raises(SlebError, match="differ from the in-memory model"):
        Q.verify_reload(model, tiny_tokenizer(), root / "other-int8", tolerance=1e-4)


def test_failed_check_leaves_nothing_and_overwrite_rules(quantized, monkeypatch):
    root, source, _ = quantized
    with pytest.raises(SlebError, match="already exists"):
        Q.quantize(source, root / "int8", "int8", device="cpu")

    def mismatch(*args, **kwargs):
        raise SlebError("logits differ")

    monkeypatch.setattr(Q, "verify_reload", mismatch)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(SlebError, match="logits differ"):
        Q.quantize(source, root / "bad", "int4", device="cpu")
    assert sorted(p.name for p in root.iterdir()) == before  # no output, no temp folder


def test_bad_requests(quantized):
    root, source, _ = quantized
    with pytest.raises(SlebError, match="unknown quantization method"):
        Q.quantize(source, root / "x", "int3")
    with pytest.raises(SlebError, match="already quantized"):
        Q.quantize(str(root / "int8"), root / "x", "int4", device="cpu")


def test_cli_quantize_then_bench(quantized, tmp_path):
    _, source, _ = quantized
    out = tmp_path / "q4"
    res = CliRunner().invoke(main, ["quantize", source, "-o", str(out), "--method", "int4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "saved to" in res.stdout and (out / "model.safetensors").is_file()
    again = CliRunner().invoke(main, ["quantize", source, "-o", str(out), "--method", "int4", "--device", "cpu"])
    assert again.exit_code == 1 and again.stderr.strip().startswith("Error:") and "--overwrite" in again.stderr
    res = CliRunner().invoke(main, ["bench", source, str(out), "--prefill-len", "16", "--gen-batch", "2",
                                    "--gen-prompt", "4", "--gen-tokens", "4", "--repeats", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "bitsandbytes nf4" in res.stdout


@pytest.fixture(scope="module")
def pruned_smollm2(tmp_path_factory):
    """The offline model with 6 of its 30 blocks removed (what SLEB removed in benchmarks/speed.py), saved."""
    import sleb

    folder = tmp_path_factory.mktemp("smollm2") / "pruned"
    model, tok = sleb.load("smollm2-135m", dtype="float32", device="cpu")
    sleb.remove_blocks(model, [12, 4, 19, 18, 17, 7])
    sleb.save(model, tok, folder, verify=False)
    dense_ppl = sleb.perplexity(model, tok, "gensim-lee", seqlen=128, max_windows=2, progress=False).ppl
    return folder, sizes.weight_bytes(model), dense_ppl


@pytest.mark.slow
@pytest.mark.parametrize("method, factor, share, name", [("int8", 3.5, 0.6, "bitsandbytes int8"),
                                                         ("int4", 7.0, 0.45, "bitsandbytes nf4")])
def test_pruned_smollm2(pruned_smollm2, tmp_path, method, factor, share, name):
    """The offline model, 6 blocks removed, int8 and NF4: a causal decoder for the probe (int8's outlier columns
    once made it look bidirectional, #29), plain reload, smaller by the method's factor, sane perplexity."""
    import sleb

    folder, dense_bytes, dense_ppl = pruned_smollm2
    result = Q.quantize(str(folder), tmp_path / method, method, device="cpu")
    assert result.linear_bytes_before / result.linear_bytes_after > factor  # fp32 -> ~8 or ~4.1 bits per weight
    assert result.weight_bytes < share * dense_bytes  # the tied fp32 embedding stays
    quantized, qtok = sleb.load(str(tmp_path / method), device="cpu")  # the probe again, on the int8 kernels too
    assert sizes.quantization_of(quantized) == name
    ppl = sleb.perplexity(quantized, qtok, "gensim-lee", seqlen=128, max_windows=2, progress=False).ppl
    assert math.isfinite(ppl) and ppl < 2 * dense_ppl


def test_int8_outliers_do_not_fail_the_causal_probe(tmp_path):
    """LLM.int8() keeps in 16 bit the columns where any token of the input exceeds its threshold, so later
    tokens move a causal model's earlier logits by the rounding: the probe runs on the source (#29)."""
    from transformers import AutoModelForCausalLM

    import sleb

    source = save_tiny(tmp_path / "fp32", layers=2)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():  # activations of rms ~3 at the linear layers: a few entries per token pass 6.0
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(3.0)
    model.save_pretrained(source)
    int8 = Q.quantize(source, tmp_path / "int8", "int8", device="cpu")
    assert int8.reload_max_logit_diff == 0.0
    # the quantized model does what the old probe refused: its first positions depend on later tokens
    quantized = _plain_load(tmp_path / "int8")
    first = torch.arange(3, 19)[None]
    second = first.clone()
    second[:, 8:] += 40
    with torch.no_grad():
        a, b = (quantized(input_ids=ids).logits[:, :8] for ids in (first, second))
    assert not torch.allclose(a, b, rtol=0, atol=1e-4)
    # ...and `sleb.load` (eval, bench) probes the quantized checkpoint in one batch, where the columns are shared
    loaded, _ = sleb.load(str(tmp_path / "int8"), device="cpu")
    assert sizes.quantization_of(loaded) == "bitsandbytes int8"


def test_causal_probe_runs_on_the_source(quantized, monkeypatch, tmp_path):
    import bitsandbytes as bnb

    from sleb import arch

    _, source, _ = quantized
    probed = []
    real = arch.check_causal

    def spy(model, name="the model"):
        probed.append(any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules()))
        return real(model, name)

    monkeypatch.setattr(arch, "check_causal", spy)
    Q.quantize(source, tmp_path / "int8", "int8", device="cpu")
    assert probed == [False]


def test_quantize_a_decilm_folder(tmp_path):
    """#29: the reload check of a quantized DeciLM folder asked `[y/N]` on the terminal and failed with a raw
    ValueError; without --trust-remote-code the folder is refused in one line before anything loads."""
    from transformers import AutoModelForCausalLM

    from sleb.decilm import save_decilm
    from sleb.units import model_branches, remove_units
    from tiny_models import tiny_config, tiny_model

    model = tiny_model(tiny_config(layers=3, intermediate=256))
    branches = model_branches(model)
    remove_units(model, [2], "sublayer")  # layer 1 without attention
    folder = save_decilm(model, tiny_tokenizer(), tmp_path / "decilm", None, branches)
    args = ["quantize", str(folder), "-o", str(tmp_path / "q"), "--method", "int4", "--device", "cpu"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "pass --trust-remote-code" in refused.output
    assert not (tmp_path / "q").exists()
    result = CliRunner().invoke(main, [*args, "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert "[y/N]" not in result.output and (tmp_path / "q" / "modeling_decilm.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True)
    assert type(reloaded).__name__ == "DeciLMForCausalLM" and sizes.quantization_of(reloaded) == "bitsandbytes nf4"

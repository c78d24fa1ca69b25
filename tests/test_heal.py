"""Healing: the loss is the stated KL, only the chosen parameters train, the best state is kept, the output
is a plain checkpoint, and bad settings or interrupts leave nothing behind."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import sleb
from sleb.arch import find_blocks
from sleb.cli import main
from sleb.config import Healing
from sleb.errors import BadInput, SlebWarning
from sleb.heal import TeacherClock, distillation_loss, heal, removed_neighbours, split_windows, teacher_targets

from tiny_models import FAMILIES, family_model, random_windows


@pytest.mark.spec
def test_loss_is_the_kl_divergence_over_the_top_k_and_one_bucket_for_the_rest():
    g = torch.Generator().manual_seed(0)
    teacher_logits, student_logits = torch.randn(2, 7, 50, generator=g) * 3, torch.randn(2, 7, 50, generator=g) * 3
    t = torch.log_softmax(teacher_logits[:, :-1], -1)
    s = torch.log_softmax(student_logits[:, :-1], -1)
    # All tokens kept: the exact KL(teacher || student).
    full = teacher_targets_of(teacher_logits, 50)
    exact = (t.exp() * (t - s)).sum(-1).mean()
    assert distillation_loss(student_logits, *full).item() == pytest.approx(exact.item(), rel=1e-5)
    # k of them: the KL of the (k + 1)-outcome distributions, computed independently here.
    k = 5
    top = teacher_targets_of(teacher_logits, k)
    idx = top[1].long()
    pt, ps = t.exp().gather(-1, idx), s.exp().gather(-1, idx)
    pt = torch.cat([pt, 1 - pt.sum(-1, keepdim=True)], -1)
    ps = torch.cat([ps, 1 - ps.sum(-1, keepdim=True)], -1)
    expected = (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert distillation_loss(student_logits, *top).item() == pytest.approx(expected.item(), rel=1e-4)
    assert distillation_loss(teacher_logits, *top).item() == pytest.approx(0.0, abs=1e-6)


def teacher_targets_of(logits, k):
    top = torch.log_softmax(logits[:, :-1].float(), -1).topk(k, dim=-1)
    return top.values, top.indices.to(torch.int32)


def test_teacher_targets_are_the_models_top_k_log_probs():
    model = family_model("llama", layers=3)
    windows = random_windows(3, 12)
    targets = teacher_targets(model, windows, 8, batch_size=2, progress=False)
    with torch.no_grad():
        expected = teacher_targets_of(model(input_ids=windows).logits, 8)
    assert targets.logprobs.shape == (3, 11, 8) and targets.tokens.dtype == torch.int32
    torch.testing.assert_close(targets.logprobs, expected[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(targets.tokens, expected[1])


def test_neighbours_are_the_kept_blocks_on_each_side_of_every_removed_run():
    # 12 blocks, runs [3, 4] and [9]: kept 0 1 2 5 6 7 8 10 11; old 2, 5, 8, 10 are new 2, 3, 6, 7.
    assert removed_neighbours([4, 9, 3], 12) == [2, 3, 6, 7]
    assert removed_neighbours([0], 4) == [0]  # the first block: only the one after it
    assert removed_neighbours([3], 4) == [2]


def test_near_a_branch_unit_are_the_block_that_lost_it_and_the_kept_blocks_around_each_touched_run():
    # 6 blocks; unit 2b is block b's attention, 2b + 1 its MLP.
    assert removed_neighbours([6], 6, "sublayer") == [2, 3, 4]  # 3.attn: block 3 keeps its MLP
    assert removed_neighbours([6, 8], 6, "attention") == [2, 3, 4, 5]  # 3.attn, 4.attn: one touched run 3-4
    assert removed_neighbours([6, 7], 6, "sublayer") == [2, 3]  # block 3 whole: as a removed block
    # Block 3 whole and 4.mlp: kept 0 1 2 4 5; near are old 2, 4 (lost its MLP) and 5, new 2, 3 and 4.
    assert removed_neighbours([6, 7, 9], 6, "sublayer") == [2, 3, 4]
    assert removed_neighbours([0], 6, "attention") == [0, 1]  # 0.attn: block 0 itself and block 1


def test_split_keeps_the_heldout_slice_apart_and_refuses_a_text_too_short():
    windows = torch.arange(40).reshape(10, 4)
    train, held = split_windows(windows, 100, 3, seed=0)
    assert held.shape[0] == 3 and train.shape[0] == 7
    assert not ({tuple(r) for r in train.tolist()} & {tuple(r) for r in held.tolist()})
    assert torch.equal(split_windows(windows, 100, 3, seed=0)[1], held)
    with pytest.raises(sleb.BadInput, match="held out and at least one to train on"):
        split_windows(windows, 5, 10, seed=0)


def _pruned_pair(removed=(2, 3), layers=6):
    dense = family_model("llama", layers=layers)
    windows = random_windows(24, 16, seed=1)
    train, held = split_windows(windows, 20, 4, seed=0)
    targets = (teacher_targets(dense, train, 16, progress=False), teacher_targets(dense, held, 16, progress=False))
    pruned = copy.deepcopy(dense)
    sleb.remove_blocks(pruned, list(removed))
    return dense, pruned, train, held, targets


@pytest.mark.parametrize("params", ["neighbours", "lora", "tail"])
def test_heal_trains_only_its_parameters_lowers_heldout_ppl_and_keeps_a_plain_model(params):
    removed = [2, 3]
    _, pruned, train, held, targets = _pruned_pair(removed)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    settings = Healing(params, steps=30, batch_size=4, eval_every=5, patience=100, last_blocks=1,
                       lr=1e-2 if params == "lora" else 3e-3)
    near = removed_neighbours(removed, 6)  # new indices 1 and 2
    record = heal(pruned, train, held, *targets, settings, near=near, seed=0, progress=False)
    after = pruned.state_dict()
    assert set(after) == set(before)  # LoRA merged away: the same tensors as a plain pruned model
    assert all(after[k].shape == before[k].shape for k in before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    blocks = find_blocks(pruned).modules
    names = {id(m): n for n, m in pruned.named_modules()}
    allowed = {"neighbours": [names[id(blocks[i])] for i in near],
               "lora": [names[id(blocks[i])] for i in near],
               "tail": [names[id(blocks[-1])], "model.norm", "lm_head", "model.embed_tokens"]}[params]
    assert all(any(k.startswith(prefix + ".") for prefix in allowed) for k in changed), sorted(changed)
    assert record.heldout_kl_after < record.heldout_kl_before
    assert record.heldout_kl_after == pytest.approx(min(c["heldout_kl"] for c in record.curve))
    # The model left behind is the best state: its held-out scores are the recorded best's.
    from sleb.heal import heldout_scores

    kl, ppl = heldout_scores(pruned, held, targets[1], 4)
    assert kl == pytest.approx(record.heldout_kl_after, rel=1e-4)
    assert ppl == pytest.approx(record.heldout_ppl_after, rel=1e-4)
    assert record.trained_parameters > 0 and record.steps == 30 and record.stopped_by == "steps"
    assert not any(p.requires_grad for p in pruned.parameters())


def test_same_seed_same_weights_and_the_untrained_state_is_kept_when_training_only_hurts():
    runs = []
    for _ in range(2):
        _, pruned, train, held, targets = _pruned_pair()
        heal(pruned, train, held, *targets, Healing("neighbours", steps=6, eval_every=3), near=[1, 2], seed=3,
             progress=False)
        runs.append(pruned.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # A learning rate that only hurts: the untrained model is the best state, and it is what is left.
    _, pruned, train, held, targets = _pruned_pair()
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    with pytest.warns(SlebWarning, match="none lowered the held-out KL"):
        record = heal(pruned, train, held, *targets, Healing("neighbours", steps=6, eval_every=3, lr=50.0),
                      near=[1, 2], seed=0, progress=False)
    assert record.best_step == 0 and record.heldout_kl_after == record.heldout_kl_before
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())


def test_minutes_budget_stops_on_time():
    _, pruned, train, held, targets = _pruned_pair()
    started = time.perf_counter()
    record = heal(pruned, train, held, *targets, Healing("neighbours", minutes=0.02, eval_every=1000), near=[1, 2],
                  progress=False)
    assert record.stopped_by == "minutes" and record.steps >= 1
    assert time.perf_counter() - started < 0.02 * 60 + 5


def test_the_teacher_pass_counts_towards_the_minutes_and_a_heal_with_no_time_left_trains_nothing_and_says_so():
    _, pruned, train, held, targets = _pruned_pair()
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    with pytest.warns(SlebWarning, match="trained 0 steps") as seen:
        record = heal(pruned, train, held, *targets, Healing("neighbours", minutes=0.01), near=[1, 2],
                      teacher_seconds=1.0, progress=False)
    assert len([w for w in seen if issubclass(w.category, SlebWarning)]) == 1
    assert record.steps == 0 and record.best_step == 0 and record.stopped_by == "minutes"
    assert record.seconds >= 1.0  # the teacher's second is on the heal's clock
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())


class _FakeTime:
    """A `time` module whose perf_counter reads out the given times, one a call."""

    def __init__(self, times):
        self.times = iter(times)

    def perf_counter(self):
        return next(self.times)


def test_teacher_clock_stops_a_pass_that_cannot_fit_but_not_for_a_cold_first_batch(monkeypatch):
    import sleb.heal

    # A slow pass: 10 s a window, 20 windows, a 60 s budget: refused after the second batch, not at the end.
    monkeypatch.setattr(sleb.heal, "time", _FakeTime([0, 10, 20, 30]))
    clock = TeacherClock(1.0, 20)
    clock.tick(1)
    with pytest.raises(BadInput, match=r"--heal-minutes 1 is too short.*at least 200 s of its 60 s \(timed on 2\)"):
        clock.tick(1)
    # A cold first batch (10 s), then 0.1 s a window: the projection from the fastest window fits.
    monkeypatch.setattr(sleb.heal, "time", _FakeTime([0, 10, *(10 + 0.1 * i for i in range(1, 20))]))
    clock = TeacherClock(1.0, 20)
    for _ in range(20):
        clock.tick(1)
    # A first batch that overran the budget by itself decides alone; no budget, no check.
    monkeypatch.setattr(sleb.heal, "time", _FakeTime([0, 61]))
    with pytest.raises(BadInput, match="timed on 1"):
        TeacherClock(1.0, 20).tick(1)
    monkeypatch.setattr(sleb.heal, "time", _FakeTime([0, 1e6, 2e6]))
    clock = TeacherClock(None, 20)
    clock.tick(1), clock.tick(1)


def test_cli_refuses_a_teacher_pass_longer_than_the_minutes_in_one_line_and_writes_nothing(tiny_folder, tmp_path,
                                                                                            monkeypatch):
    import itertools

    import sleb.heal

    monkeypatch.setattr(sleb.heal, "time", _FakeTime(itertools.count(0, 10)))  # every reading 10 s on
    folder, text = tiny_folder
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["prune", str(folder), "-o", str(out), "--remove", "2", "--calib", str(text),
                                       "--nsamples", "2", "--seqlen", "12", "--heal", "--heal-minutes", "0.5",
                                       "--heal-windows", "8", "--heal-heldout-windows", "2"])
    assert result.exit_code != 0
    assert "Error: --heal-minutes 0.5 is too short: the dense model's pass over the 10 healing windows" in result.output
    assert not out.exists()


def test_cli_warns_once_and_does_not_say_healed_when_the_untrained_state_is_kept(tiny_folder, tmp_path):
    # lr 1e-30: every update is lost to rounding, so no step can improve on the untrained state.
    folder, text = tiny_folder
    heldout = tmp_path / "held.txt"
    heldout.write_text(" ".join(f"A river flood closed {i} roads near the valley." for i in range(200)))
    result = CliRunner().invoke(main, ["prune", str(folder), "-o", str(tmp_path / "out"), "--remove", "2", "--calib",
                                       str(text), "--nsamples", "2", "--seqlen", "12", "--eval", str(heldout),
                                       "--heal", "neighbours", "--heal-steps", "4", "--heal-lr", "1e-30",
                                       "--heal-windows", "8", "--heal-heldout-windows", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len([line for line in lines if line.startswith("Warning:")]) == 1, result.output
    assert "none lowered the held-out KL" in result.output
    assert "(healed;" not in result.output and not any(line.startswith("healed") for line in lines), result.output
    report = json.loads((tmp_path / "out" / "sleb_report.json").read_text())
    assert report["healing"]["best_step"] == 0
    from sleb.report import healing_lines

    assert "the model is not healed" in " ".join(healing_lines(report["healing"]))


def test_cli_heals_saves_a_plain_checkpoint_and_records_the_curve(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, text = tiny_folder
    plain, healed = tmp_path / "plain", tmp_path / "healed"
    common = [str(folder), "--remove", "2", "--calib", str(text), "--nsamples", "2", "--seqlen", "12"]
    assert CliRunner().invoke(main, ["prune", *common, "-o", str(plain)]).exit_code == 0
    result = CliRunner().invoke(main, ["prune", *common, "-o", str(healed), "--heal", "--heal-steps", "4",
                                       "--heal-windows", "8", "--heal-heldout-windows", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((healed / "sleb_report.json").read_text())
    entry = report["healing"]
    assert entry["params"] == "lora" and entry["steps"] == 4 and entry["windows"] == 8 and entry["seqlen"] == 12
    assert entry["curve"][0]["step"] == 0 and entry["curve"][-1]["step"] == 4
    assert report["config"]["heal"]["params"] == "lora"
    a, b = AutoModelForCausalLM.from_pretrained(plain), AutoModelForCausalLM.from_pretrained(healed)
    assert a.config.num_hidden_layers == b.config.num_hidden_layers == 4
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    assert report["reload_max_logit_diff"] is not None
    shown = CliRunner().invoke(main, ["report", str(healed), "--no-generate"])
    assert shown.exit_code == 0, shown.output
    assert "## Healing" in (healed / "report.md").read_text() and (healed / "healing_curve.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--heal", "--heal-minutes", "-1"], "--heal-minutes must be a positive number"),
    (["--heal"], "--heal needs a budget"),
    (["--heal", "maps", "--heal-steps", "2"], "give --compensate too"),
    (["--unit", "sublayer", "--heal", "maps", "--heal-steps", "2"], "give --compensate too"),
    (["--heal", "--heal-steps", "0"], "--heal-steps must be a whole number"),
    (["--heal", "--heal-steps", "2", "--offload-dir", "OFF"], "does not work with --offload-dir"),
])
def test_bad_heal_settings_are_refused_in_one_line_before_loading(tiny_folder, tmp_path, monkeypatch, extra, message):
    import sleb.loading

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(sleb.loading, "load", no_load)
    folder, text = tiny_folder
    extra = [str(tmp_path / "off") if a == "OFF" else a for a in extra]
    result = CliRunner().invoke(main, ["prune", str(folder), "-o", str(tmp_path / "out"), "--remove", "1",
                                       "--calib", str(text), *extra])
    assert result.exit_code != 0 and message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, flag", [(["--heal", "--heal-steps", "1"], "--heal"),
                                         (["--compensate", "linear"], "--compensate"),
                                         (["--unit", "attention", "--compensate", "linear"], "--compensate")])
def test_changing_weights_of_a_gguf_copy_is_refused_before_loading(tmp_path, monkeypatch, flags, flag):
    """A .gguf output from a .gguf model copies the kept tensors byte for byte: weights changed in memory
    (healing, compensation folds) would be lost, so both are refused before anything loads."""
    import sleb.loading
    from sleb.loading import resolve

    monkeypatch.setattr(sleb.loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    folder, name = resolve("smollm2-135m")
    result = CliRunner().invoke(main, ["prune", os.path.join(folder, name), "-o", str(tmp_path / "x.gguf"), "--remove",
                                       "1", "--calib", "gensim-wiki", *flags])
    assert result.exit_code != 0 and f"{flag} changes weights" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_no_text_left_for_the_heldout_slice_is_one_line_before_loading(tiny_folder, tmp_path, monkeypatch):
    import sleb.loading

    monkeypatch.setattr(sleb.loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    folder, text = tiny_folder
    result = CliRunner().invoke(main, ["prune", str(folder), "-o", str(tmp_path / "out"), "--remove", "1", "--calib",
                                       str(text), "--nsamples", "2", "--seqlen", "12", "--heal", "--heal-steps", "2",
                                       "--heal-heldout-windows", "100000"])
    assert result.exit_code != 0 and "held out and at least one to train on" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny-llama", "calib.txt"])


@pytest.mark.parametrize("extra, flag", [(["--heal-seqlen", "100000"], "--heal-seqlen 100000"),
                                         (["--seqlen", "100000"], "--seqlen 100000")])
def test_a_window_longer_than_the_context_names_the_flag_that_gave_it(tiny_folder, tmp_path, monkeypatch, extra, flag):
    import sleb.loading

    monkeypatch.setattr(sleb.loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    folder, text = tiny_folder
    result = CliRunner().invoke(main, ["prune", str(folder), "-o", str(tmp_path / "out"), "--remove", "1", "--calib",
                                       str(text), "--nsamples", "2", "--seqlen", "12", "--heal", "--heal-steps", "2",
                                       *extra])
    assert result.exit_code != 0 and f"Error: {flag} is longer than" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_heal_leaves_no_output_and_no_stray_files(tiny_folder, tmp_path, sig):
    folder, text = tiny_folder
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sleb", "prune", str(folder), "-o", str(out), "--remove", "2",
                             "--calib", str(text), "--nsamples", "2", "--seqlen", "12", "--heal", "neighbours",
                             "--heal-minutes", "5", "--heal-windows", "16", "--heal-heldout-windows", "2"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = ""
    while "heal (neighbours)" not in seen and "healing on" not in seen:
        line = proc.stderr.readline()
        assert line, f"ended before healing: {seen}"
        seen += line
    time.sleep(1.0)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny-llama", "calib.txt"])


def _heal_weights(params, checkpointing, steps=4):
    removed = [2, 3]
    _, pruned, train, held, targets = _pruned_pair(removed)
    settings = Healing(params, steps=steps, batch_size=4, eval_every=2, patience=100, lr=1e-2,
                       checkpointing=checkpointing)
    record = heal(pruned, train, held, *targets, settings, near=removed_neighbours(removed, 6), seed=0, progress=False)
    return pruned, record


@pytest.mark.parametrize("params", ["lora", "neighbours"])
def test_checkpointed_and_plain_heals_give_the_same_weights(params):
    (plain, plain_record), (ckpt, ckpt_record) = _heal_weights(params, False), _heal_weights(params, True)
    assert plain_record.checkpointing is False and ckpt_record.checkpointing is True
    assert plain_record.best_step > 0 and ckpt_record.best_step == plain_record.best_step  # something trained
    a, b = plain.state_dict(), ckpt.state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # The blocks' own forward is back: no checkpoint wrapper is left on the model.
    assert not any("forward" in block.__dict__ for block in find_blocks(ckpt).modules)


def test_checkpointing_recomputes_the_blocks_and_keeps_fewer_activations():
    from torch.utils.checkpoint import checkpoint as _  # noqa: F401  (the mechanism counted below)

    from sleb.heal import checkpointed_blocks, final_hidden

    model = family_model("llama", layers=4)
    ids = random_windows(2, 16)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in find_blocks(model).modules[1].parameters():
        p.requires_grad_(True)
    calls = []
    # A pre-hook: the recomputation stops as soon as it has what the backward pass needs (torch's early stop).
    handle = find_blocks(model).modules[3].mlp.register_forward_pre_hook(lambda *a: calls.append(1))

    def saved_bytes(checkpointing):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if checkpointing:
                with checkpointed_blocks(model, 1):
                    out = final_hidden(model, ids).sum()
                    out.backward()
            else:
                final_hidden(model, ids).sum().backward()
        return total[0]

    plain = saved_bytes(False)
    assert len(calls) == 1
    calls.clear()
    checkpointed = saved_bytes(True)
    handle.remove()
    assert len(calls) == 2  # the forward, and the recomputation in the backward pass
    assert checkpointed < plain / 2, (checkpointed, plain)


def test_chunked_kl_equals_the_kl_of_the_full_logits_and_its_gradient():
    from sleb.heal import chunked_distillation_loss, final_hidden, head_logits

    model = family_model("llama", layers=2)
    ids = random_windows(3, 13)
    g = torch.Generator().manual_seed(0)
    teacher = teacher_targets_of(torch.randn(3, 13, model.config.vocab_size, generator=g) * 3, 7)
    head = model.get_output_embeddings().weight

    def loss_and_grad(chunk):
        head.grad = None
        if chunk is None:
            loss = distillation_loss(model(input_ids=ids).logits, *teacher)
        else:
            loss = chunked_distillation_loss(model, final_hidden(model, ids), *teacher, chunk=chunk)
        loss.backward()
        return loss.detach(), head.grad.clone()

    full, full_grad = loss_and_grad(None)
    for chunk in (1, 5, 36, 1000):  # 36 = all 3 x 12 positions at once; 5 does not divide them
        loss, grad = loss_and_grad(chunk)
        torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(head_logits(model, final_hidden(model, ids)), model(input_ids=ids).logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_chunked_head_gives_every_familys_own_logits(family):
    from sleb.heal import check_head

    model = family_model(family, layers=2)
    check_head(model, random_windows(2, 10))  # raises SlebError when the logits differ


def test_a_head_whose_logits_sleb_does_not_know_is_stopped_before_the_teacher_pass():
    from sleb.errors import SlebError

    model = family_model("llama", layers=2)
    model.config.final_logit_softcapping = None
    original = model.forward

    def doubled(*args, **kwargs):  # a family that scales its logits in a way head_logits does not know
        out = original(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    with pytest.raises(SlebError, match="does not give LlamaForCausalLM's logits"):
        teacher_targets(model, random_windows(2, 10), 4, progress=False)


def test_heal_checkpointing_flag_reaches_the_run_file_and_needs_heal(tiny_folder, tmp_path):
    folder, text = tiny_folder
    common = [str(folder), "--remove", "2", "--calib", str(text), "--nsamples", "2", "--seqlen", "12"]
    alone = CliRunner().invoke(main, ["prune", *common, "-o", str(tmp_path / "a"), "--no-heal-checkpointing"])
    assert alone.exit_code != 0 and "--heal-checkpointing applies only with --heal" in alone.output
    assert not (tmp_path / "a").exists()
    for flag, expected in (("--no-heal-checkpointing", False), ("--heal-checkpointing", True)):
        out = tmp_path / flag.strip("-")
        result = CliRunner().invoke(main, ["prune", *common, "-o", str(out), "--heal", "--heal-steps", "2",
                                           "--heal-windows", "8", "--heal-heldout-windows", "2", flag])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "sleb_report.json").read_text())
        assert report["healing"]["checkpointing"] is expected and report["config"]["heal"]["checkpointing"] is expected
        assert report["healing"]["autocast"] is None  # CPU: the model's float32, no autocast


def test_progress_through_a_pipe_is_plain_lines(tiny_folder, tmp_path):
    """Through a pipe (CI, `| tee log`) every bar prints whole lines: no carriage return, none over 200."""
    folder, text = tiny_folder
    # Short names, as a user types them: sleb's lines quote the paths they are given (pytest's are long).
    for name, target in (("m", folder), ("calib.txt", text)):
        if (tmp_path / name).resolve() != target.resolve():
            (tmp_path / name).symlink_to(target)
    proc = subprocess.run([sys.executable, "-m", "sleb", "prune", "m", "-o", "out", "--remove",
                           "2", "--calib", "calib.txt", "--nsamples", "4", "--seqlen", "12", "--heal", "--heal-steps",
                           "3", "--heal-windows", "8", "--heal-heldout-windows", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "400"})  # bytes: text mode would turn '\r' into '\n'
    log = (proc.stderr + proc.stdout).decode()
    assert proc.returncode == 0, log
    assert "\r" not in log
    assert max(len(line) for line in log.splitlines()) <= 200, max(log.splitlines(), key=len)
    # The bars are there, as plain lines: the search's and the heal's final states at least.
    assert any(line.startswith("SLEB step") and "100%" in line for line in log.splitlines()), log
    assert any(line.startswith("heal (lora)") for line in log.splitlines()), log


class _Killed(Exception):
    pass


@pytest.mark.parametrize("params", ["lora", "neighbours"])
def test_a_heal_stopped_after_some_scorings_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch,
                                                                                           params):
    import sleb.heal as heal_module

    settings = Healing(params, steps=9, batch_size=3, eval_every=2, patience=100, lr=1e-2)
    _, whole, train, held, targets = _pruned_pair()
    uninterrupted = heal(whole, train, held, *targets, settings, near=[1, 2], seed=0, progress=False)
    path = tmp_path / "ck.heal"
    write = heal_module._write_heal_state
    saved_steps = []

    def dies_after_two(path, identity, state):  # the process dies while training after its second scoring
        write(path, identity, state)
        saved_steps.append(state["step"])
        if len(saved_steps) == 2:
            raise _Killed

    monkeypatch.setattr(heal_module, "_write_heal_state", dies_after_two)
    _, first, *_ = _pruned_pair()
    with pytest.raises(_Killed):
        heal(first, train, held, *targets, settings, near=[1, 2], seed=0, progress=False, checkpoint=path)
    assert saved_steps == [2, 4]
    monkeypatch.setattr(heal_module, "_write_heal_state", write)
    _, resumed, *_ = _pruned_pair()
    told = []
    record = heal(resumed, train, held, *targets, settings, near=[1, 2], seed=0, progress=False, checkpoint=path,
                  on_status=told.append)
    assert told == [f"resuming the heal from {path}: step 4"] and record.resumed_from == 4
    assert record.steps == 9 and record.best_step == uninterrupted.best_step
    assert [c["heldout_kl"] for c in record.curve] == [c["heldout_kl"] for c in uninterrupted.curve]
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit on the CPU
    # A heal that had ended ends again at once, with the same weights.
    _, again, *_ = _pruned_pair()
    told = []
    record = heal(again, train, held, *targets, settings, near=[1, 2], seed=0, progress=False, checkpoint=path,
                  on_status=told.append)
    assert told == [f"resuming the heal from {path}: step 9 (it had ended: stopped by steps)"]
    assert all(torch.equal(a[k], v) for k, v in again.state_dict().items())


def test_a_heal_checkpoint_of_another_heal_model_or_text_is_refused_in_one_line(tmp_path):
    settings = Healing("lora", steps=2, batch_size=3, eval_every=1, patience=100)
    _, pruned, train, held, targets = _pruned_pair()
    path = tmp_path / "ck.heal"
    heal(pruned, train, held, *targets, settings, near=[1, 2], seed=0, progress=False, checkpoint=path,
         identity={"--heal-lr": None})
    cases = [({"--heal-lr": 0.5}, train, None, "belongs to another heal (--heal-lr None there vs 0.5 now)"),
             ({"--heal-lr": None}, train.flip(0), None, "on other windows"),
             ({"--heal-lr": None}, train, [1, 4], "of another model")]
    for identity, windows, removed, message in cases:
        _, other, *_ = _pruned_pair(removed or (2, 3))
        with pytest.raises(BadInput, match="heal checkpoint .*" + re.escape(message)) as err:
            heal(other, windows, held, *targets, settings, near=[1, 2], seed=0, progress=False, checkpoint=path,
                 identity=identity)
        assert "\n" not in str(err.value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BadInput, match="empty, corrupt or not a sleb heal checkpoint") as err:
        heal(_pruned_pair()[1], train, held, *targets, settings, near=[1, 2], seed=0, progress=False, checkpoint=path)
    assert "\n" not in str(err.value)


def test_heal_refuses_weights_that_accelerate_keeps_off_the_devices():
    from accelerate import cpu_offload

    from sleb.heal import check_trainable_placement

    model = family_model("llama", layers=2)
    check_trainable_placement(model)  # in memory: fine
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(BadInput, match="--heal trains weights in memory, and --device auto put some"):
        check_trainable_placement(model)


# Slows each training step (the numbers are untouched), so that a test can kill the heal midway.
_SLOW_STEPS = (
    "import runpy, time, sleb.heal as h\n"
    "forward = h._Student.forward\n"
    "def slow(self, *args):\n"
    "    time.sleep(0.2)\n"
    "    return forward(self, *args)\n"
    "h._Student.forward = slow\n"
    "runpy.run_module('sleb', run_name='__main__')\n")


@pytest.mark.spec
def test_a_heal_killed_after_some_scorings_resumes_from_its_checkpoint_and_ends_with_the_same_weights(tiny_folder,
                                                                                                     tmp_path):
    from safetensors.torch import load_file

    folder, text = tiny_folder
    (tmp_path / "slow.py").write_text(_SLOW_STEPS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [str(folder), "--remove", "2", "--calib", str(text), "--nsamples", "2", "--seqlen", "12", "--heal",
            "neighbours", "--heal-steps", "40", "--heal-eval-every", "4", "--heal-patience", "100", "--heal-windows",
            "16", "--heal-heldout-windows", "2", "--heal-batch-size", "3"]
    whole = subprocess.run([sys.executable, "-m", "sleb", "prune", *args, "-o", "whole"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    resumable = [*args, "-o", "resumed", "--checkpoint", "ck"]
    proc = subprocess.Popen([sys.executable, "slow.py", "prune", *resumable], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved, deadline = tmp_path / "ck.heal", time.monotonic() + 240
    step = 0
    while step == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if saved.exists():
            step = torch.load(saved, weights_only=True)["state"]["step"]
    assert proc.poll() is None and 0 < step < 40, "the heal ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "resumed").exists()
    rerun = subprocess.run([sys.executable, "-m", "sleb", "prune", *resumable], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed_from = torch.load(saved, weights_only=True)["state"]["step"]
    assert resumed_from == 40
    assert f"resuming the heal from ck.heal: step {step}" in rerun.stderr or \
        f"resuming the heal from ck.heal: step {step + 4}" in rerun.stderr, rerun.stderr  # (a save as it died)
    report = json.loads((tmp_path / "resumed" / "sleb_report.json").read_text())["healing"]
    assert report["resumed_from"] in (step, step + 4) and report["steps"] == 40 and report["curve"][0]["step"] == 0
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["tiny-llama", "calib.txt", "slow.py", "whole", "resumed", "ck", "ck.heal"])


def test_a_heal_checkpoint_of_other_heal_settings_is_refused_in_one_line_before_loading(tiny_folder, tmp_path,
                                                                                       monkeypatch):
    import sleb.loading

    folder, text = tiny_folder
    common = ["prune", str(folder), "--remove", "2", "--calib", str(text), "--nsamples", "2", "--seqlen", "12",
              "--heal", "--heal-steps", "2", "--heal-windows", "8", "--heal-heldout-windows", "2", "--checkpoint",
              str(tmp_path / "ck")]
    first = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "ck").is_file() and (tmp_path / "ck.heal").is_file()

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(sleb.loading, "load", no_load)
    result = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "b"), "--heal-lr", "0.5"])
    assert result.exit_code != 0
    assert result.output.strip() == (f"Error: heal checkpoint {tmp_path / 'ck.heal'} belongs to another heal "
                                     "(--heal-lr None there vs 0.5 now); use another --checkpoint file")
    assert not (tmp_path / "b").exists()


def test_checkpoint_keeps_the_heal_state_where_no_step_wise_search_runs():
    from sleb.config import Budget, Compensation, PruneConfig

    plain = PruneConfig("m", "out", Budget(remove=1), checkpoint="ck")
    assert plain.search_checkpoint == "ck" and plain.heal_checkpoint is None
    healed = replace_heal(plain, Healing("lora", steps=2))
    assert healed.search_checkpoint == "ck" and str(healed.heal_checkpoint) == "ck.heal"
    # With --from-report (no search) or --compensate-aware, --checkpoint holds only the heal's state ...
    for other in (dict(from_report="run"), dict(compensation=Compensation("linear", aware=True))):
        config = replace_heal(PruneConfig("m", "out", Budget(remove=1), checkpoint="ck", **other),
                              Healing("lora", steps=2))
        config._check_parents({"--checkpoint"})
        assert config.search_checkpoint is None and str(config.heal_checkpoint) == "ck.heal"
        # ... and without --heal it is refused as before.
        with pytest.raises(BadInput, match="--checkpoint"):
            PruneConfig("m", "out", Budget(remove=1), checkpoint="ck", **other)._check_parents({"--checkpoint"})


def replace_heal(config, heal_settings):
    from dataclasses import replace

    return replace(config, heal=heal_settings)


def test_the_report_says_when_a_heal_was_shared_between_ranks_or_resumed():
    from sleb.report import healing_lines

    entry = {"budget": {"steps": 40}, "top_k": 64, "windows": 16, "seqlen": 12, "text": "calib.txt",
             "params": "lora", "trained_parameters": 1000, "lr": 1e-3, "batch_size": 4, "steps": 40, "seconds": 9.0,
             "teacher_seconds": 1.0, "stopped_by": "steps", "best_step": 40, "heldout_windows": 2,
             "heldout_ppl_before": 10.0, "heldout_ppl_after": 9.0}
    plain = " ".join(healing_lines(entry))
    assert "torchrun" not in plain and "resumed" not in plain  # a run file from before these entries
    shared = " ".join(healing_lines({**entry, "world_size": 2, "resumed_from": 8}))
    assert "4 windows per step, split over 2 torchrun ranks)" in shared and "; resumed from step 8)" in shared


@pytest.mark.slow
def test_a_heal_of_the_real_model_resumed_from_its_checkpoint_ends_bit_for_bit_like_an_uninterrupted_one(
        smollm2, tmp_path, monkeypatch):
    import gc

    import sleb.heal as heal_module
    from sleb.data import consecutive_windows

    dense, tokenizer = smollm2
    train, held = split_windows(consecutive_windows(tokenizer, "gensim-wiki", "train", 64), 8, 2, seed=0)
    targets = (teacher_targets(dense, train, 16, progress=False), teacher_targets(dense, held, 16, progress=False))
    settings = Healing("lora", steps=6, batch_size=2, eval_every=2, patience=100)
    removed = [16, 17]
    near = removed_neighbours(removed, len(find_blocks(dense).modules))

    def healed(**kwargs):
        pruned = copy.deepcopy(dense)
        sleb.remove_blocks(pruned, removed)
        record = heal(pruned, train, held, *targets, settings, near=near, seed=0, progress=False, **kwargs)
        weights = {k: v.clone() for k, v in pruned.state_dict().items()}
        del pruned
        gc.collect()
        return weights, record

    whole, _ = healed()
    write = heal_module._write_heal_state

    def dies_after_the_first(path, identity, state):
        write(path, identity, state)
        raise _Killed

    monkeypatch.setattr(heal_module, "_write_heal_state", dies_after_the_first)
    with pytest.raises(_Killed):
        healed(checkpoint=tmp_path / "ck.heal")
    monkeypatch.setattr(heal_module, "_write_heal_state", write)
    resumed, record = healed(checkpoint=tmp_path / "ck.heal")
    assert record.resumed_from == 2 and record.steps == 6 and record.best_step > 0
    assert set(whole) == set(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)

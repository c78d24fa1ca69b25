"""Never destroy a user's files: every refusal is one line, exit != 0, and nothing that existed changes.

Each case runs a command in a scratch folder holding a tiny model, calibration text and an
unrelated file, and compares a snapshot of every file before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sleb.outputs import LOCK_PREFIX, OLD_PREFIX, TEMP_PREFIX, atomic_folder, clean_stale

from helpers import CALIB_WORDS, assert_refused, invoke, prune_args, snapshot
from tiny_models import save_tiny, tiny_config, tiny_model, tiny_tokenizer


@pytest.mark.parametrize(
    "out, words",
    [
        (".", ["current directory"]),
        ("..", ["contains the current directory"]),
        ("models/tiny", ["is the input"]),
        ("models", ["contains the input"]),
        ("models/tiny/pruned", ["lies inside the input"]),
        ("notes.txt/out", ["is a file"]),
        ("notes.txt", ["not a folder"]),
        ("/", ["filesystem root"]),
    ],
)
def test_outputs_that_would_destroy_files_are_refused(scratch, out, words):
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out=out), "--overwrite"), scratch, before, *words)


def test_existing_folder_not_from_sleb_is_kept_even_with_overwrite(scratch):
    (scratch / "mine").mkdir()
    (scratch / "mine" / "data.bin").write_bytes(b"precious")
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out="mine"), "--overwrite"), scratch, before, "not a sleb output")


def test_home_directory_is_refused(scratch, monkeypatch):
    monkeypatch.setenv("HOME", str(scratch / "models"))
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out="models"), "--overwrite"), scratch, before, "home directory")


def test_overwrite_replaces_only_a_complete_sleb_output(scratch):
    first = invoke(*prune_args(out="out"))
    assert first.exit_code == 0, first.output
    report = json.loads((scratch / "out" / "sleb_report.json").read_text())
    assert "model.safetensors" in report["files"]
    mode = (scratch / "out").stat().st_mode & 0o777
    assert mode == 0o777 & ~_umask(), oct(mode)  # normal permissions, not mkdtemp's 0700
    again = invoke(*prune_args(out="out"), "--overwrite", "--seed", "1")
    assert again.exit_code == 0, again.output
    assert json.loads((scratch / "out" / "sleb_report.json").read_text())["calibration"]["seed"] == 1
    # A file the user put into the output folder stops any replacement.
    (scratch / "out" / "my-notes.md").write_text("keep me")
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out="out"), "--overwrite"), scratch, before, "my-notes.md")
    assert not [p for p in scratch.iterdir() if p.name.startswith((TEMP_PREFIX, OLD_PREFIX))]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_quantize_onto_its_input_is_refused(scratch):
    before = snapshot(scratch)
    result = invoke("quantize", "models/tiny", "-o", "models/tiny", "--method", "int8", "--overwrite",
                    "--device", "cpu")
    assert_refused(result, scratch, before, "is the input")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "warp-drive"])
def test_missing_device_is_one_line(scratch, device):
    before = snapshot(scratch)
    args = prune_args()
    args[args.index("--device") + 1] = device
    assert_refused(invoke(*args), scratch, before, device)


def test_latin1_text_names_the_byte(scratch):
    (scratch / "latin.txt").write_bytes("Caf\xe9 au lait, na\xefve d\xe9j\xe0 vu. ".encode("latin-1") * 200)
    before = snapshot(scratch)
    args = prune_args()
    args[args.index("calib.txt")] = "latin.txt"
    assert_refused(invoke(*args), scratch, before, "not UTF-8", "offset 3", "iconv")
    result = invoke("eval", "models/tiny", "--ppl", "latin.txt", "--seqlen", "16", "--device", "cpu")
    assert_refused(result, scratch, before, "not UTF-8")


def test_encoder_model_is_refused(scratch):
    from transformers import AutoModelForCausalLM, BertConfig

    config = BertConfig(vocab_size=253, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(scratch / "models" / "bert")
    tiny_tokenizer().save_pretrained(scratch / "models" / "bert")
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(model="models/bert")), scratch, before, "not a causal decoder")


def test_nan_weights_stop_before_the_search(scratch):
    model = tiny_model(tiny_config(layers=5))
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(scratch / "models" / "nan")
    tiny_tokenizer().save_pretrained(scratch / "models" / "nan")
    before = snapshot(scratch)
    result = invoke(*prune_args(model="models/nan"))
    assert_refused(result, scratch, before, "calibration loss is nan", "window 0", "float32")
    assert "SLEB step" not in result.output


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_unreadable_weights(scratch, damage):
    weights = scratch / "models" / "tiny" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(b"")
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args()), scratch, before, "cannot read the weights", "model.safetensors")


@pytest.mark.parametrize("content", [b"", os.urandom(4096)])
def test_unreadable_gguf(scratch, content):
    (scratch / "bad.gguf").write_bytes(content)
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(model="bad.gguf")), scratch, before, "not a readable GGUF file")


def test_misleading_paths_get_plain_messages(scratch):
    (scratch / "models" / "empty").mkdir()
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(model="./models/nope")), scratch, before, "model folder not found")
    assert_refused(invoke(*prune_args(model="models/empty")), scratch, before, "no config.json")


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--early-barrier", "-1"], ["0 or more"]),
        (["--latter-barrier", "-1"], ["0 or more"]),
        (["--target-params", "nan"], ["finite"]),
        (["--max-ppl-increase", "inf"], ["finite"]),
    ],
)
def test_bad_numbers(scratch, extra, words):
    args = prune_args()
    args.remove("--remove")
    args.remove("1")
    if "barrier" in extra[0]:
        args += ["--remove", "1"]
    before = snapshot(scratch)
    assert_refused(invoke(*args, *extra), scratch, before, *words)


def test_corrupt_parquet(scratch):
    (scratch / "text.parquet").write_bytes(b"PAR1 not really parquet")
    before = snapshot(scratch)
    args = prune_args()
    args[args.index("calib.txt")] = "text.parquet"
    assert_refused(invoke(*args), scratch, before, "not a readable parquet file")


def test_checkpoints_of_other_searches_and_broken_ones_are_refused(scratch):
    save_tiny(scratch / "models" / "other", layers=5, seed=1)
    done = invoke(*prune_args(out="a"), "--checkpoint", "run.json")
    assert done.exit_code == 0, done.output
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(model="models/other", out="b"), "--checkpoint", "run.json"), scratch, before,
                   "another model")
    assert_refused(invoke(*prune_args(out="b"), "--seqlen", "12", "--checkpoint", "run.json"), scratch, before,
                   "another search", "seqlen")
    # Resuming the same search says so and gives the same answer.
    resumed = invoke(*prune_args(out="b"), "--checkpoint", "run.json")
    assert resumed.exit_code == 0 and "resuming the search from run.json" in resumed.output
    assert json.loads((scratch / "a" / "sleb_report.json").read_text())["removed"] == \
        json.loads((scratch / "b" / "sleb_report.json").read_text())["removed"]
    for content in ("", "{not json", json.dumps({"removed": [1]})):
        (scratch / "bad.json").write_text(content)
        before = snapshot(scratch)
        assert_refused(invoke(*prune_args(out="c"), "--checkpoint", "bad.json"), scratch, before, "bad.json",
                       "give another --checkpoint path")
        # The file is the user's: the refusal does not tell them to delete it.
        assert "delete" not in invoke(*prune_args(out="c"), "--checkpoint", "bad.json").output
    (scratch / "ckdir").mkdir()
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out="c"), "--checkpoint", "ckdir"), scratch, before, "is a folder")
    assert_refused(invoke(*prune_args(out="c"), "--checkpoint", "c/run.json"), scratch, before, "inside the output")


def test_folders_as_file_outputs(scratch):
    (scratch / "adir").mkdir()
    before = snapshot(scratch)
    assert_refused(invoke("eval", "models/tiny", "--ppl", "calib.txt", "--seqlen", "16", "--json", "adir"),
                   scratch, before, "is a folder")
    assert_refused(invoke("compare", "models/tiny", "-o", "notes.txt", "--calib", "calib.txt"), scratch, before,
                   "not a folder")
    assert not [p for p in scratch.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_unexpected_errors_are_one_line_unless_debug(scratch, monkeypatch):
    import sleb.loading

    def boom(*args, **kwargs):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(sleb.loading, "peek", boom)
    before = snapshot(scratch)
    result = invoke(*prune_args())
    assert_refused(result, scratch, before, "RuntimeError: something broke", "--debug")
    debug = invoke("--debug", *prune_args())
    assert isinstance(debug.exception, RuntimeError)


def test_leftovers_of_dead_writers_are_cleaned_and_orphans_put_back(tmp_path):
    """A temporary goes once its writer's lock is free; a live writer's (its lock held) stays."""
    import fcntl

    def leftover(token: str, target: str, *entries: str) -> Path:
        lock = tmp_path / f"{LOCK_PREFIX}{token}"
        lock.write_text(json.dumps({"target": target}))
        for name in entries:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
        os.utime(lock, (time.time() - 3600, time.time() - 3600))  # past the grace of a just-created lock
        return lock

    leftover("aaaaaaaaaaaa", "out", f"{TEMP_PREFIX}aaaaaaaaaaaa-out")  # killed while writing
    leftover("bbbbbbbbbbbb", "gone", f"{OLD_PREFIX}bbbbbbbbbbbb-gone")  # killed between moving aside and the swap
    live = leftover("cccccccccccc", "live", f"{TEMP_PREFIX}cccccccccccc-live")
    legacy = tmp_path / f"{TEMP_PREFIX}older-123-abcdef"  # an older sleb's, without a lock: kept for a day
    legacy.mkdir()
    with open(live, "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: conflicts like another process
        with atomic_folder(tmp_path / "new") as tmp:
            (tmp / "f").write_text("ok")
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["new", "gone", live.name, f"{TEMP_PREFIX}cccccccccccc-live", legacy.name])
    os.utime(legacy, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    assert {p.name for p in clean_stale(tmp_path)} == {live.name, f"{TEMP_PREFIX}cccccccccccc-live", legacy.name}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone", "new"]


def _age_locks(folder: Path) -> None:
    """Make lock files older than the grace a fresh lock gets (as if the rerun came a while later)."""
    for lock in folder.glob(f"{LOCK_PREFIX}*"):
        os.utime(lock, (time.time() - 3600, time.time() - 3600))


def test_sigkill_during_save_leaves_only_a_recognisable_temp_that_the_next_run_removes(scratch):
    """Kill a prune while it writes its checkpoint; the leftover is cleaned by the next run."""
    code = (
        "import os, signal, sleb.export as e\n"
        "real = e.verify_reload\n"
        "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
        "e.verify_reload = die\n"
        "from sleb.cli import main\n"
        f"main({prune_args(out='out')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=scratch, capture_output=True, text=True)
    assert proc.returncode == -9
    leftovers = [p.name for p in scratch.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert leftovers and not (scratch / "out").exists()
    _age_locks(scratch)
    result = invoke(*prune_args(out="out"))
    assert result.exit_code == 0, result.output
    assert not [p for p in scratch.iterdir() if p.name.startswith((TEMP_PREFIX, LOCK_PREFIX))]


def _small_tmpfs(path: Path, size: str, *options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    opts = ",".join((f"size={size}", *options))
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_full_or_read_only_filesystem_is_refused_before_the_search(scratch, kind):
    mount = scratch / "mnt"
    if not _small_tmpfs(mount, "1m", *(["ro"] if kind == "read-only" else [])):
        pytest.skip("needs root and tmpfs mounts")
    try:
        before = snapshot(scratch)
        result = invoke(*prune_args(out="mnt/out"))
        assert_refused(result, scratch, before, "needs about" if kind == "full" else "not writable")
        assert "SLEB step" not in result.output
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# -- bad input: refused in one line, before any model loads where the input says it all -------------
@pytest.fixture()
def no_load(monkeypatch):
    """Loading weights fails the test: a refusal seen with this fixture came before any model loaded."""
    import sleb.loading

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(sleb.loading, "load", load)


def _without_budget(args: list[str]) -> list[str]:
    i = args.index("--remove")
    return args[:i] + args[i + 2:]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--refine", "swap", "--refine-seconds", "-5"], ["--refine-seconds", "positive"]),
        (["--refine", "swap", "--refine-seconds", "0"], ["--refine-seconds"]),
        (["--refine", "swap", "--refine-seconds", "nan"], ["--refine-seconds"]),
        (["--refine", "swap", "--refine-seconds", "inf"], ["--refine-seconds"]),
        (["--compensate", "linear", "--compensate-ridge", "-1"], ["--compensate-ridge"]),
        (["--compensate", "linear", "--compensate-ridge", "nan"], ["--compensate-ridge", "finite"]),
        (["--racing", "--confidence", "0"], ["--confidence", "(0, 1]"]),
        (["--racing", "--confidence", "1.5"], ["--confidence"]),
        (["--racing", "--confidence", "nan"], ["--confidence"]),
        (["--racing", "--tolerance", "-0.1"], ["--tolerance"]),
        (["--racing", "--tolerance", "nan"], ["--tolerance"]),
        (["--seqlen", "1000"], ["--seqlen 1000", "context of 256"]),
    ],
)
def test_bad_numbers_are_refused_before_loading(scratch, no_load, extra, words):
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(), *extra), scratch, before, *words)


@pytest.mark.parametrize("budget", [["--target-params", "nan"], ["--target-speedup", "inf"],
                                    ["--max-ppl-increase", "0.5"], ["--ratio", "0.2", "--target-params", "0.5"]])
def test_budgets_are_checked_before_loading(scratch, no_load, budget):
    before = snapshot(scratch)
    result = invoke(*_without_budget(prune_args()), *budget)
    assert_refused(result, scratch, before, budget[0])


@pytest.mark.parametrize("option", ["--metrics", "--ratio", "--eval"])
def test_compare_refuses_an_empty_list(scratch, no_load, option):
    (scratch / "eval.txt").write_text(CALIB_WORDS)
    before = snapshot(scratch)
    args = {"--metrics": "sleb", "--ratio": "0.2", "--eval": "eval.txt", option: ","}
    result = invoke("compare", "models/tiny", "-o", "cmp", "--calib", "calib.txt", "--nsamples", "2", "--seqlen",
                    "16", "--device", "cpu", *[x for kv in args.items() for x in kv])
    assert_refused(result, scratch, before, option, "lists nothing")
    seqlen = invoke("compare", "models/tiny", "-o", "cmp", "--calib", "calib.txt", "--eval", "eval.txt",
                    "--seqlen", "1000", "--device", "cpu")
    assert_refused(seqlen, scratch, before, "--seqlen 1000", "context of 256")


def _run_file(scratch) -> dict:
    done = invoke(*prune_args(out="run"), "--remove", "2")
    assert done.exit_code == 0, done.output
    return json.loads((scratch / "run" / "sleb_report.json").read_text())


def test_from_report_fields_are_checked_strictly(scratch, request):
    report = _run_file(scratch)
    first, second = report["removed"]
    request.getfixturevalue("no_load")  # from here on
    bad = [
        ({"removed": [True, second]}, "removed"),  # JSON true is no block index, though Python takes it as 1
        ({"removed": [first, first]}, "removed"),
        ({"removed": [first, 5]}, "removed"),
        ({"removed": [first, -1]}, "removed"),
        ({"removed": [str(first), second]}, "removed"),
        ({"blocks_before": True}, "blocks_before"),
        ({"steps": [{**report["steps"][0], "removed": True}, report["steps"][1]]}, "steps[0].removed"),
        ({"steps": [{**report["steps"][0], "scores": {"9": 1.0}}, report["steps"][1]]}, "steps[0].scores"),
        ({"calibration_ppl_by_removed": [1.0, -2.0, 3.0]}, "calibration_ppl_by_removed"),
    ]
    for change, word in bad:
        (scratch / "bad.json").write_text(json.dumps({**report, **change}))
        before = snapshot(scratch)
        result = invoke("prune", "models/tiny", "-o", "out", "--from-report", "bad.json", "--remove", "2",
                        "--device", "cpu")
        assert_refused(result, scratch, before, "bad.json", word)
    # More removals than recorded: refused before loading too.
    before = snapshot(scratch)
    result = invoke("prune", "models/tiny", "-o", "out", "--from-report", "run", "--remove", "3", "--device", "cpu")
    assert_refused(result, scratch, before, "records 2 removals")


def test_quantize_refuses_an_encoder(scratch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BertConfig

    config = BertConfig(vocab_size=253, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(scratch / "models" / "bert")
    tiny_tokenizer().save_pretrained(scratch / "models" / "bert")
    before = snapshot(scratch)
    result = invoke("quantize", "models/bert", "-o", "q", "--method", "int8", "--device", "cpu")
    assert_refused(result, scratch, before, "not a causal decoder")
    assert not [p for p in scratch.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_text_specs_that_are_no_files_say_what_they_are(scratch, no_load):
    (scratch / "somedir").mkdir()
    (scratch / "dir.txt").mkdir()
    os.mkfifo(scratch / "fifo")
    os.mkfifo(scratch / "fifo.txt")
    try:
        before = snapshot(scratch)
        for spec, words in (("somedir", ["is a folder"]), ("dir.txt", ["is a folder"]),
                            ("fifo", ["not a regular file"]), ("fifo.txt", ["not a regular file"]),
                            ("/dev/zero", ["not a regular file"])):
            args = prune_args()
            args[args.index("calib.txt")] = spec
            assert_refused(invoke(*args), scratch, before, spec, *words)
            result = invoke("eval", "models/tiny", "--ppl", spec, "--seqlen", "16", "--device", "cpu")
            assert_refused(result, scratch, before, *words)
    finally:
        # Had anything opened a FIFO for reading, it would block; opening the writer ends lets it go.
        for fifo in ("fifo", "fifo.txt"):
            try:
                os.close(os.open(scratch / fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader: nothing was blocked


def test_text_extensions_in_any_case(scratch):
    from sleb.data import check_spec, documents

    (scratch / "CALIB.TXT").write_text(CALIB_WORDS)
    (scratch / "calib.JSONL").write_text(json.dumps({"text": CALIB_WORDS}) + "\n")
    for spec in ("CALIB.TXT", "calib.JSONL"):
        check_spec(spec)
        assert documents(spec, "train") == ([CALIB_WORDS], "\n\n")


def test_symlink_loop_as_model_is_a_local_path_problem(scratch, no_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it sent to the hub, it would fail there, not here
    os.symlink("loop2", scratch / "loop1")
    os.symlink("loop1", scratch / "loop2")
    os.symlink("nowhere", scratch / "dangling.txt")
    before = snapshot(scratch)
    for model in ("loop1", "./loop1"):
        assert_refused(invoke(*prune_args(model=model)), scratch, before, model, "symbolic link", "loop")
    args = prune_args()
    args[args.index("calib.txt")] = "dangling.txt"
    assert_refused(invoke(*args), scratch, before, "dangling.txt", "symbolic link")


def test_far_more_windows_than_the_text_holds(scratch):
    import warnings

    from sleb.data import calibration
    from sleb.errors import SlebWarning

    tokenizer = tiny_tokenizer()
    with pytest.warns(SlebWarning, match="overlap heavily"):
        calibration(tokenizer, "calib.txt", nsamples=200, seqlen=32)  # 6,400 tokens from 4,000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration(tokenizer, "calib.txt", nsamples=100, seqlen=32)  # 3,200 tokens: no warning
    before = snapshot(scratch)
    result = invoke(*prune_args(), "--nsamples", "1000000", "--seqlen", "32")
    assert_refused(result, scratch, before, "--nsamples 1000000", "distinct windows")


def test_the_cli_prints_sleb_warnings_as_one_line(scratch, monkeypatch):
    import sleb.pipeline

    def stop(*args, **kwargs):
        raise sleb.SlebError("stopped after the windows were drawn")

    monkeypatch.setattr(sleb.pipeline, "budgeted_search", stop)
    result = invoke(*prune_args(), "--nsamples", "300")  # 300 x 16 tokens from 4,000
    lines = [line for line in result.output.splitlines() if "overlap heavily" in line]
    assert len(lines) == 1 and lines[0].startswith("Warning: 300 calibration windows"), result.output
    assert "data.py" not in result.output


def test_disk_full_errors_become_one_line(tmp_path):
    import errno

    from sleb.errors import BadInput, raise_if_disk_full

    target = tmp_path / "out.gguf"
    for err in (OSError(errno.ENOSPC, "No space left on device"),
                OSError("1572864 requested and 686928 written"),  # numpy's short write (the GGUF writer)
                Exception("Error while serializing: I/O error: No space left on device (os error 28)")):
        with pytest.raises(BadInput, match=r"no space left on device while writing .*out.gguf \([\d.]+ MiB free\)"):
            raise_if_disk_full(err, target)
    raise_if_disk_full(OSError(errno.EACCES, "Permission denied"), target)  # not ours: the caller re-raises
    raise_if_disk_full(RuntimeError("unrelated"), target)


def test_disk_full_while_writing_outputs(scratch, request):
    """A disk that fills up during the write (no free-space check before a GGUF file or a --json) is one
    line naming the output and the free space, and no temporary file is left."""
    mount = scratch / "mnt"
    if not _small_tmpfs(mount, "256k"):
        pytest.skip("needs root and tmpfs mounts")
    try:
        # GGUF needs a byte-level BPE tokenizer; f16 weights of about 500 KB do not fit in 256 KB.
        save_tiny(scratch / "models" / "bpe", layers=5, tokenizer=request.getfixturevalue("tiny_tokenizer"))
        before = snapshot(scratch)
        gguf = invoke(*prune_args(model="models/bpe", out="mnt/out.gguf"))
        # A .gguf output's size is known once the model is loaded: refused then, before the search.
        assert_refused(gguf, scratch, before, "mnt/out.gguf needs about", "only 0.2 MiB")
        assert "SLEB step" not in gguf.output
        with open(mount / "filler", "wb", buffering=0) as f:  # fill the file system
            try:
                while f.write(b"x" * 4096):
                    pass
            except OSError:
                pass
        before = snapshot(scratch)
        result = invoke("eval", "models/tiny", "--ppl", "calib.txt", "--seqlen", "16", "--max-windows", "2",
                        "--device", "cpu", "--json", "mnt/eval.json")
        assert_refused(result, scratch, before, "no space left on device while writing mnt/eval.json")
        assert not [p for p in mount.iterdir() if p.name.startswith(TEMP_PREFIX)]
    finally:
        subprocess.run(["umount", str(mount)], check=False)

"""Never destroy a user's files: every refusal is one line, exit != 0, and nothing that existed changes.

Each case runs a command in a scratch folder holding a tiny model, calibration text and an
unrelated file, and compares a snapshot of every file before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sleb.cli import main
from sleb.outputs import LOCK_PREFIX, OLD_PREFIX, TEMP_PREFIX, atomic_folder, clean_stale

from tiny_models import save_tiny, tiny_config, tiny_model, tiny_tokenizer

CALIB_WORDS = " ".join(f"w{(i * 7) % 250}" for i in range(4000))


def snapshot(root: Path) -> dict[str, str]:
    """Every file, folder and link under root -> a digest of its content (folders: 'dir'; links: their target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"link to {os.readlink(path)}"
        else:
            found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture()
def scratch(tmp_path, monkeypatch):
    """A working folder: a tiny model, calibration text, an unrelated file; the cwd is this folder."""
    root = tmp_path / "work"
    root.mkdir()
    save_tiny(root / "models" / "tiny", layers=5)
    (root / "calib.txt").write_text(CALIB_WORDS)
    (root / "notes.txt").write_text("my notes")
    monkeypatch.chdir(root)
    return root


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def prune_args(model="models/tiny", out="out", *extra):
    return ["prune", model, "-o", out, "--remove", "1", "--calib", "calib.txt", "--nsamples", "2", "--seqlen", "16",
            "--device", "cpu", *extra]


def assert_refused(result, root: Path, before: dict, *words: str):
    assert result.exit_code not in (0, None), result.output
    err = (result.stderr or result.output).strip().splitlines()
    assert err and err[-1].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in err[-1], err[-1]
    after = snapshot(root)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


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
        assert_refused(invoke(*prune_args(out="c"), "--checkpoint", "bad.json"), scratch, before, "bad.json")
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

"""Every file any command writes goes through one policy (`sleb.outputs`): never inside an input,
never over a file sleb did not write, never through a link, atomically, and cleaned up after signals.

Same method as tests/test_safety.py: a scratch folder, a snapshot of every file before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sleb.outputs import LOCK_PREFIX, TEMP_PREFIX

from helpers import assert_refused, invoke, prune_args, snapshot

EVAL = ["--ppl", "calib.txt", "--seqlen", "16", "--max-windows", "2", "--device", "cpu"]
BENCH = ["--prefill-len", "8", "--gen-batch", "1", "--gen-prompt", "4", "--gen-tokens", "2", "--repeats", "1",
         "--device", "cpu"]
COMPARE = ["--metrics", "cosine", "--ratio", "0.2", "--calib", "calib.txt", "--eval", "held.txt", "--nsamples", "2",
           "--seqlen", "16", "--eval-windows", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def held_out_text(scratch):
    (scratch / "held.txt").write_text(" ".join(f"w{(i * 11) % 250}" for i in range(2000)))


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith((TEMP_PREFIX, LOCK_PREFIX, ".sleb-old-"))]


@pytest.fixture()
def run(scratch):
    """A finished `sleb prune` output in the scratch folder: out/."""
    done = invoke(*prune_args(out="out"))
    assert done.exit_code == 0, done.output
    return scratch / "out"


@pytest.mark.parametrize("command", [
    ["eval", "models/tiny", *EVAL, "--json", "models/tiny/config.json"],
    ["eval", "models/tiny", *EVAL, "--json", "models/tiny/new.json"],  # a new file inside the model folder
    ["bench", "models/tiny", *BENCH, "--json", "models/tiny/model.safetensors"],
    ["eval", "models/tiny", "models/tiny", *EVAL, "--markdown", "models/tiny/model.safetensors"],
    ["compare", "models/tiny", "-o", "models/tiny", *COMPARE],
    ["prune", "models/tiny", "-o", "models/tiny/x.gguf", "--remove", "1", "--calib", "calib.txt", "--nsamples", "2",
     "--seqlen", "16", "--device", "cpu"],
    [*prune_args(out="fresh"), "--checkpoint", "models/tiny/run.json"],
    ["eval", "models/tiny", *EVAL, "--json", "calib.txt", "--overwrite"],
])
def test_no_output_inside_an_input(scratch, command):
    before = snapshot(scratch)
    assert_refused(invoke(*command), scratch, before, "the input")
    assert not leftovers(scratch)


def test_report_and_compare_keep_the_users_files(scratch, run):
    (scratch / "mine").mkdir()
    (scratch / "mine" / "compare.md").write_text("my comparison")
    (scratch / "mine" / "report.md").write_text("my report")
    target = scratch / "elsewhere.png"
    target.write_bytes(b"my picture")
    (run / "scores_heatmap.png").symlink_to(target)
    before = snapshot(scratch)
    assert_refused(invoke("compare", "models/tiny", "-o", "mine", *COMPARE, "--overwrite"), scratch, before,
                   "compare.md", "sleb did not write it")
    assert_refused(invoke("report", "out", "-o", "mine", "--no-generate", "--overwrite"), scratch, before,
                   "report.md", "sleb did not write it")
    assert_refused(invoke("report", "out", "--no-generate", "--overwrite"), scratch, before, "symbolic link")
    assert not leftovers(scratch)


def test_reports_and_json_are_replaced_only_with_overwrite_and_only_if_sleb_wrote_them(scratch, run):
    first = invoke("report", "out", "--no-generate")
    assert first.exit_code == 0, first.output
    assert {"report.md", "scores_heatmap.png"} <= {p.name for p in run.iterdir()}
    before = snapshot(scratch)
    assert_refused(invoke("report", "out", "--no-generate"), scratch, before, "already exists", "--overwrite")
    again = invoke("report", "out", "--no-generate", "--overwrite")
    assert again.exit_code == 0, again.output
    wrote = invoke("eval", "out", *EVAL, "--json", "out/eval.json")
    assert wrote.exit_code == 0, wrote.output
    # A file sleb wrote and the user then edited is the user's.
    (run / "eval.json").write_text((run / "eval.json").read_text() + " ")
    before = snapshot(scratch)
    assert_refused(invoke("eval", "out", *EVAL, "--json", "out/eval.json", "--overwrite"), scratch, before,
                   "sleb did not write it")
    # And it stops the run folder's replacement: named, kept.
    assert_refused(invoke(*prune_args(out="out"), "--overwrite"), scratch, before, "eval.json")
    (run / "eval.json").unlink()
    # What sleb added later (report, plots) does not: it goes with the folder.
    replaced = invoke(*prune_args(out="out"), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (run / "report.md").exists()


@pytest.mark.parametrize("planted", [
    ("report.md", "my own report, same name"),
    ("results.json", json.dumps({"format": "sleb-eval/1", "mine": True})),
])
def test_names_and_json_fields_are_no_proof_of_authorship(scratch, run, planted):
    name, content = planted
    (run / name).write_text(content)
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out="out"), "--overwrite"), scratch, before, name)


def test_a_run_file_without_a_files_list_protects_the_whole_folder(scratch, run):
    report = json.loads((run / "sleb_report.json").read_text())
    del report["files"]  # the format of older sleb versions
    (run / "sleb_report.json").write_text(json.dumps(report))
    (run / "notes.txt").write_text("mine")
    (run / "experiments").mkdir()
    (run / "experiments" / "run7.csv").write_text("1,2")
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out="out"), "--overwrite"), scratch, before, "lists the files sleb wrote")


def _edit_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["my_note"] = "tuned by hand"
    (folder / "config.json").write_text(json.dumps(config))


def _replace_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(Path("models/tiny/model.safetensors").read_bytes())


@pytest.mark.parametrize("change, name", [(_edit_config, "config.json"), (_replace_weights, "model.safetensors")])
@pytest.mark.parametrize("copied", [True, False])
def test_overwrite_keeps_files_the_user_changed_in_a_sleb_output(scratch, run, change, name, copied):
    """A file the run file lists counts as sleb's only while its contents are what sleb recorded."""
    folder = run
    if copied:  # cp -r: new inodes and times, so sleb.ledger does not know the copy
        folder = scratch / "copy"
        shutil.copytree(run, folder)
    change(folder)
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out=folder.name), "--overwrite"), scratch, before, name, "changed since")
    assert not leftovers(scratch)


def test_overwrite_replaces_an_unchanged_copy_of_a_sleb_output(scratch, run):
    from sleb import ledger

    report = json.loads((run / "sleb_report.json").read_text())
    written = [name for name in report["files"] if name != "sleb_report.json"]
    assert report["file_sha256"] == {name: ledger.sha256(run / name) for name in written}
    assert all(ledger.wrote(run / name) for name in report["files"])  # in place: known without hashing
    shutil.copytree(run, scratch / "copy")
    assert not ledger.wrote(scratch / "copy" / "model.safetensors")  # a copy: its contents prove it
    again = invoke(*prune_args(out="copy"), "--overwrite", "--seed", "1")
    assert again.exit_code == 0, again.output
    assert json.loads((scratch / "copy" / "sleb_report.json").read_text())["calibration"]["seed"] == 1
    assert not leftovers(scratch)


def test_a_run_file_without_digests_cannot_prove_its_files_unchanged(scratch, run):
    report = json.loads((run / "sleb_report.json").read_text())
    del report["file_sha256"]  # the format of sleb versions before the digests
    (run / "sleb_report.json").write_text(json.dumps(report))
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out="out"), "--overwrite"), scratch, before, "older sleb",
                   "cannot be proven unchanged")


def test_outputs_follow_the_umask(scratch):
    """Every file gets what a plain open() gives it (0666 & ~umask), whoever wrote it (safetensors: 0600)."""
    old = os.umask(0o022)
    try:
        done = invoke(*prune_args(out="out"), "--checkpoint", "search.json")
        assert done.exit_code == 0, done.output
        report = invoke("report", "out", "--no-generate")
        assert report.exit_code == 0, report.output
    finally:
        os.umask(old)
    files = [p for p in [*(scratch / "out").iterdir(), scratch / "search.json"] if p.is_file()]
    assert {"model.safetensors", "config.json", "sleb_report.json", "report.md", "search.json"} <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    assert (scratch / "out").stat().st_mode & 0o777 == 0o755


def test_outputs_in_sleb_caches_and_links_are_refused(scratch, monkeypatch):
    monkeypatch.setenv("SLEB_CACHE", str(scratch / "cache"))
    (scratch / "cache").mkdir()
    (scratch / "dangling").symlink_to(scratch / "nowhere")
    before = snapshot(scratch)
    assert_refused(invoke(*prune_args(out="cache/pruned")), scratch, before, "sleb's model cache")
    assert_refused(invoke(*prune_args(out="dangling")), scratch, before, "symbolic link")
    assert_refused(invoke("eval", "models/tiny", *EVAL, "--json", "dangling"), scratch, before, "symbolic link")
    state = os.environ["SLEB_STATE"]
    assert_refused(invoke("eval", "models/tiny", *EVAL, "--json", f"{state}/x.json"), scratch, before,
                   "sleb's state folder")


def test_over_long_names(scratch, run):
    before = snapshot(scratch)
    deep = "/".join(f"d{i}" for i in range(20)) + "/" + "x" * 300
    assert_refused(invoke(*prune_args(out=deep)), scratch, before, "longer than 255 bytes")
    assert_refused(invoke("eval", "models/tiny", *EVAL, "--json", deep), scratch, before, "longer than 255 bytes")
    # A name one byte too long in a folder that exists: refused before anything looks at it (the kernel's
    # ENAMETOOLONG), for every kind of output.
    long = "x" * 256
    for command in ([*prune_args(out=long)], [*prune_args(out="c"), "--checkpoint", long],
                    ["eval", "models/tiny", *EVAL, "--json", long], ["eval", "models/tiny", *EVAL, "--markdown", long],
                    ["compare", "models/tiny", "-o", long, *COMPARE], ["report", "out", "-o", long, "--no-generate"]):
        assert_refused(invoke(*command), scratch, before, "longer than 255 bytes")
    # A .gguf output whose name fits, but not its run file's beside it.
    assert_refused(invoke(*prune_args(out="g" * 240 + ".gguf")), scratch, before, "at most 238 bytes")
    # A name that fits, though its temporary name with sleb's prefix would not: written, nothing left over.
    done = invoke(*prune_args(out="o" * 250))
    assert done.exit_code == 0, done.output
    assert (scratch / ("o" * 250) / "sleb_report.json").is_file() and not leftovers(scratch)


def _sleb_process(scratch: Path, args: list[str], patch: str = "") -> subprocess.Popen:
    code = textwrap.dedent(patch) + f"\nfrom sleb.cli import main\nmain({args!r})\n"
    return subprocess.Popen([sys.executable, "-c", code], cwd=scratch, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("stage", ["search", "save"])
def test_sigterm_cleans_up_and_exits_143(scratch, stage):
    """SIGTERM (timeout, docker stop, SLURM) during the search or the save: exit 143, nothing left behind."""
    module, name = {"search": ("sleb.pipeline", "budgeted_search"), "save": ("sleb.export", "verify_reload")}[stage]
    patch = f"""
        import time, pathlib, importlib
        mod = importlib.import_module({module!r})
        real = getattr(mod, {name!r})
        def slow(*a, **k):
            pathlib.Path("started").write_text("")
            time.sleep(60)
            return real(*a, **k)
        setattr(mod, {name!r}, slow)
        """
    before = snapshot(scratch)
    proc = _sleb_process(scratch, prune_args(out="out"), patch)
    deadline = time.time() + 120
    while not (scratch / "started").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (scratch / "started").exists(), proc.communicate()
    (scratch / "started").unlink()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "Error: stopped by SIGTERM; nothing was written (a --checkpoint keeps " \
                                           "finished steps)"
    assert snapshot(scratch) == before and not leftovers(scratch)


def test_offload_scratch_of_a_killed_run_is_cleaned_by_the_next(scratch):
    patch = """
        import os, signal, sleb.pipeline
        def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)
        sleb.pipeline.budgeted_search = die
        """
    proc = _sleb_process(scratch, [*prune_args(out="out"), "--offload-dir", "off"], patch)
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    assert [p.name for p in (scratch / "off").iterdir() if p.name.startswith(TEMP_PREFIX)]
    for lock in (scratch / "off").glob(f"{LOCK_PREFIX}*"):
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
    done = invoke(*prune_args(out="out"), "--offload-dir", "off")
    assert done.exit_code == 0, done.output
    assert list((scratch / "off").iterdir()) == []


WRITER = """
import sys, time
import sleb.outputs as o
o.LOCK_GRACE_S = 0  # judge locks at once: only the flock can save a live writer
with o.atomic_folder(sys.argv[1]) as tmp:
    (tmp / "weights").write_bytes(b"x" * 1000)
    time.sleep(float(sys.argv[2]))
print("done")
"""


def test_writers_in_other_pid_namespaces_do_not_delete_each_other(tmp_path):
    """A container (another PID namespace) sharing the folder must not take a live writer for a dead one."""
    tmp_path = tmp_path / "shared"
    tmp_path.mkdir()
    if subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -p (root or user namespaces)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = ["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c", WRITER]
    # The slow writer gets PID ~22 in its namespace, which does not exist in the other one: a PID
    # test there would take it for dead (as sleb did before the locks).
    deep = 'for i in $(seq 20); do /bin/true; done; "$0" -c "$1" "$2" "$3"; exit $?'
    slow = subprocess.Popen(["unshare", "-p", "-f", "--mount-proc", "sh", "-c", deep, sys.executable, WRITER,
                             str(tmp_path / "a"), "6"], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(f"{TEMP_PREFIX}*")) and time.time() < deadline:
        time.sleep(0.1)
    fast = subprocess.run([*command, str(tmp_path / "b"), "0"], env=env, capture_output=True, text=True)
    assert fast.returncode == 0, fast.stderr
    assert slow.wait(timeout=60) == 0
    assert (tmp_path / "a" / "weights").stat().st_size == 1000 and (tmp_path / "b" / "weights").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_model_cache_that_is_a_file_is_named(tmp_path, monkeypatch):
    import sleb
    from sleb.loading import _gguf_cache

    (tmp_path / "cache").write_text("not a folder")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("SLEB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(sleb.BadInput, match="model cache .* is a file"):
        _gguf_cache(str(tmp_path), "m.gguf")  # where a GGUF model would be converted to

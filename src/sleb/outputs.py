"""Where `sleb` writes, and how: the output-path policy and the atomic writers every command uses.

The policy (`check_output_folder`, `check_output_file`) runs before any model is loaded. An output
folder is refused, even with `--overwrite`, when it

* is, contains, or lies inside an input (the model, the calibration or evaluation text, a report);
* is or contains the current directory or the home directory, or is a filesystem root;
* already exists and is not a previous `sleb` output (no `sleb_report.json`), or is one that holds
  files `sleb` did not write (they are named, so the user can move them);
* cannot be created: its nearest existing ancestor is a file, is not writable, or lacks the free
  space the checkpoint needs (the message says how much).

Writers never leave a half-written output: `atomic_folder` builds the new folder beside the target
under a recognisable temporary name (`.sleb-tmp-...`) and swaps it in only once it is complete;
the old folder is moved aside (`.sleb-old-...`) for the instant of the swap and then deleted.
Leftovers of a killed run are recognised by those names and the dead process id in them, and
cleaned up (or, for a moved-aside output whose replacement never arrived, put back) by the next
writer in the same folder. Everything is created with the user's umask, like any other file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import BadInput, raise_if_disk_full
from .runfile import RUN_FILE

TEMP_PREFIX = ".sleb-tmp-"
OLD_PREFIX = ".sleb-old-"
# Files other commands add to an output folder (`sleb report`); JSON files whose "format" starts
# with "sleb-" (`sleb eval --json`, `sleb compare`) are recognised by content.
ADDED_BY_SLEB = ("report.md", "scores_heatmap.png", "calibration_ppl.png", "first_step_scores.png",
                 "compare.md", "compare.png")
# Beyond the weights, a little room for the tokenizer and the report.
SLACK_BYTES = 64 * 2**20


def resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _within(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies somewhere below it (both resolved)."""
    return inner == outer or outer in inner.parents


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _is_sleb_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("sleb-")


def foreign_files(folder: Path) -> list[str] | None:
    """Names in a previous output folder that `sleb` did not write; None when it is no `sleb` output.

    An empty folder counts as one with nothing foreign in it: replacing it loses nothing.
    """
    if not any(folder.iterdir()):
        return []
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        report = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not str(report.get("format", "")).startswith("sleb-"):
        return None
    written = report.get("files")
    if not isinstance(written, list):  # written before outputs listed their files: trust the marker
        return []
    allowed = set(written) | {RUN_FILE, *ADDED_BY_SLEB}
    return sorted(
        p.name for p in folder.iterdir()
        if p.name not in allowed and not (p.suffix == ".json" and _is_sleb_json(p))
    )


def _check_writable_parent(target: Path, label: str, need_bytes: int | None) -> None:
    anchor = _nearest_existing(target.parent)
    if not anchor.is_dir():
        raise BadInput(f"cannot create {label} {target}: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise BadInput(f"cannot create {label} {target}: {anchor} is not writable (permissions or a read-only filesystem)")
    probe = temp_path(anchor / "probe")
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise BadInput(f"cannot create {label} {target}: writing in {anchor} fails ({err.strerror or err})") from err
    if need_bytes:
        free = shutil.disk_usage(anchor).free
        if free < need_bytes:
            raise BadInput(f"{label} {target} needs about {_gib(need_bytes)} free in {anchor}; only {_gib(free)} is")


def check_output_folder(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    need_bytes: int | None = None,
    label: str = "output folder",
) -> Path:
    """Refuse an output folder the policy above forbids (BadInput, one line); returns it resolved.

    Args:
        inputs: local paths the command reads (files or folders; None and hub ids are skipped).
        need_bytes: the expected size of what will be written (checked against free space).
    """
    target = resolved(out)
    shown = str(out)
    if target == Path(target.anchor):
        raise BadInput(f"{label} {shown} is a filesystem root; choose a new folder")
    for place, name in ((Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home directory")):
        if _within(place, target):
            what = "is" if place == target else "contains"
            raise BadInput(f"{label} {shown} {what} {name}; choose a new folder")
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue
        source = resolved(item)
        if _within(source, target) or _within(target, source):
            relation = "is" if source == target else ("contains" if _within(source, target) else "lies inside")
            raise BadInput(f"{label} {shown} {relation} the input {item}; choose a folder outside it")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise BadInput(f"{label} {shown} exists and is not a folder")
        if not overwrite:
            raise BadInput(f"{shown} already exists; pass --overwrite to replace it")
        foreign = foreign_files(target)
        if foreign is None:
            raise BadInput(f"{shown} exists and is not a sleb output (no {RUN_FILE}); not replacing it even with "
                           "--overwrite: choose a new folder")
        if foreign:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BadInput(f"{shown} holds files sleb did not write ({listed}); move them or choose a new folder")
    _check_writable_parent(target, label, need_bytes + SLACK_BYTES if need_bytes else None)
    return target


def check_output_file(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                      label: str = "output file") -> Path:
    """Refuse a file output that is a folder, is one of the inputs, or cannot be created."""
    target = resolved(path)
    if target.is_dir():
        raise BadInput(f"{label} {path} is a folder; give a file path")
    for item in inputs:
        if item is not None and Path(item).expanduser().exists() and _within(target, resolved(item)) \
                and resolved(item).is_file():
            raise BadInput(f"{label} {path} is the input {item}; choose another file")
    _check_writable_parent(target, label, None)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _owner_pid(name: str, prefix: str) -> int | None:
    """The process id recorded in a temporary name `{prefix}{target}-{pid}-{random}`."""
    parts = name[len(prefix):].rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def clean_stale(folder: Path) -> list[Path]:
    """Delete temporary leftovers of dead `sleb` processes in `folder`; put back orphaned old outputs."""
    cleaned = []
    if not folder.is_dir():
        return cleaned
    for entry in folder.iterdir():
        for prefix in (TEMP_PREFIX, OLD_PREFIX):
            if not entry.name.startswith(prefix):
                continue
            pid = _owner_pid(entry.name, prefix)
            if pid is None or _pid_alive(pid):
                continue
            target = folder / entry.name[len(prefix):].rsplit("-", 2)[0]
            if prefix == OLD_PREFIX and not target.exists():
                os.replace(entry, target)  # the run died between moving the old output aside and the swap
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            cleaned.append(entry)
    return cleaned


def temp_path(target: Path, prefix: str = TEMP_PREFIX) -> Path:
    """A recognisable temporary name beside `target` (same filesystem, so os.replace is atomic)."""
    return target.parent / f"{prefix}{target.name}-{os.getpid()}-{secrets.token_hex(3)}"


@contextmanager
def atomic_folder(out: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out` that becomes `out` only if the block succeeds.

    On any error (or a signal) the temporary folder is deleted and an existing `out` is untouched.
    An existing `out` is replaced only with `replace=True` (callers check the policy first).
    """
    target = Path(out).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    tmp = temp_path(target)
    tmp.mkdir()  # default mode: the umask applies, as for any folder the user creates
    try:
        yield tmp
        if target.exists():
            if not replace:
                raise BadInput(f"{out} already exists; pass --overwrite to replace it")
            old = temp_path(target, OLD_PREFIX)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(err, out)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file by writing a temporary file beside it and renaming it into place."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise BadInput(f"{path} is a folder; give a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(err, path)
        raise
    return target

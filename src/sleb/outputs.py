"""Where `sleb` writes, and how: the one output policy every command's files go through, and the atomic writers.

The policy runs before any model is loaded. `check_output_folder` (a folder that replaces an
earlier one: `prune -o`, `quantize -o`) and `check_output_file` (one file: `--json`,
`--markdown`, `--checkpoint`, a `.gguf`, each file `report` and `compare` add to a folder) refuse

* a path that is, contains or lies inside an input (model folders and files, texts, run files),
  or sleb's own stores (the conversion cache, the record of written files);
* for folders: the current or home directory (or one containing them), a filesystem root;
* a symbolic link (sleb never writes through one), a name too long for the filesystem;
* an existing output, unless `--overwrite` is given *and* sleb wrote it: a folder must list its
  files with their SHA-256 in its run file (`write_run_record`), and each must still be what sleb
  wrote (unchanged in place per `sleb.ledger`, or the same contents: a copy); anything else in it
  is named and kept. A file must match its entry in `sleb.ledger` (the record of files sleb wrote,
  unchanged since);
* a place that cannot be written (a parent that is a file, no permission, a read-only
  filesystem, too little free space for what will be written).

Writers never leave a half-written output. Each builds its output beside the target under a
temporary name (`.sleb-tmp-<token>-<name>`) and renames it into place only once it is complete
(an existing folder is moved aside as `.sleb-old-<token>-<name>` for the instant of the swap).
While it works, the writer holds an `flock` on a lock file `.sleb-lock-<token>` beside them; the
kernel releases it when the process dies, however it dies, and in any PID namespace or
container. The next writer in that folder removes leftovers whose lock is free (putting back an
old output whose replacement never arrived), so a live writer's files are never touched.
Every file is given the mode a plain `open()` would give it under the user's umask (some writers,
such as safetensors', create theirs 0600).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import ledger
from .errors import BadInput, raise_if_disk_full
from .runfile import RUN_FILE

TEMP_PREFIX = ".sleb-tmp-"
OLD_PREFIX = ".sleb-old-"
LOCK_PREFIX = ".sleb-lock-"
# A lock file younger than this is never judged stale: it may be between its creation and its flock
# (microseconds; the margin covers clocks of network filesystems).
LOCK_GRACE_S = 10.0
# Temporaries without any lock file (from sleb versions before the locks) are removed after a day.
UNLOCKED_STALE_S = 24 * 3600.0
NAME_MAX = 255
# Beyond the weights, a little room for the tokenizer and the report.
SLACK_BYTES = 64 * 2**20


def cache_dir() -> Path:
    """Where converted models are kept: $SLEB_CACHE, else $XDG_CACHE_HOME/sleb, else ~/.cache/sleb."""
    if os.environ.get("SLEB_CACHE"):
        return Path(os.environ["SLEB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sleb"


def resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _unfollowed(path: str | os.PathLike) -> Path:
    """The absolute path with its folder resolved but its last part kept (a link stays a link)."""
    path = Path(path).expanduser()
    return path.parent.resolve() / path.name


def _within(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies somewhere below it (both resolved)."""
    return inner == outer or outer in inner.parents


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _sleb_stores() -> list[tuple[Path, str]]:
    return [(resolved(cache_dir()), "sleb's model cache"), (resolved(ledger.state_dir()), "sleb's state folder")]


def _check_name_lengths(path: str | os.PathLike, shown: str, label: str) -> None:
    """Refuse a name the filesystem cannot hold; first, since any look at such a path fails with ENAMETOOLONG."""
    for part in Path(path).expanduser().parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise BadInput(f"{label} {shown}: the name {part[:40]}... is longer than {NAME_MAX} bytes")


def _check_place(target: Path, shown: str, label: str, inputs: Iterable, *, folder: bool) -> None:
    """Refusals that do not depend on what exists at `target`: inputs, sleb's stores."""
    for item in inputs:
        if item is None or not (Path(item).expanduser().exists() or Path(item).expanduser().is_symlink()):
            continue
        source = resolved(item)
        if _within(target, source) and not (not folder and target.parent == source
                                              and target.name not in (_run_files(source) or {target.name})):
            relation = "is" if source == target else "lies inside"
            raise BadInput(f"{label} {shown} {relation} the input {item}; choose a path outside it")
        if folder and _within(source, target):
            raise BadInput(f"{label} {shown} contains the input {item}; choose a folder outside it")
    for store, name in _sleb_stores():
        if _within(target, store) or (folder and _within(store, target)):
            raise BadInput(f"{label} {shown} {'lies inside' if _within(target, store) else 'contains'} {name} "
                           f"({store}); choose another place")


def _check_writable_parent(target: Path, label: str, need_bytes: int | None) -> None:
    anchor = _nearest_existing(target.parent)
    if not anchor.is_dir():
        raise BadInput(f"cannot create {label} {target}: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise BadInput(f"cannot create {label} {target}: {anchor} is not writable (permissions or a read-only filesystem)")
    probe = anchor / f"{TEMP_PREFIX}{secrets.token_hex(6)}-probe"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise BadInput(f"cannot create {label} {target}: writing in {anchor} fails ({err.strerror or err})") from err
    if need_bytes:
        free = shutil.disk_usage(anchor).free
        if free < need_bytes:
            raise BadInput(f"{label} {target} needs about {_gib(need_bytes)} free in {anchor}; only {_gib(free)} is")


def _run_record(folder: Path) -> dict | None:
    """A sleb output folder's run file, when it lists the files sleb wrote; None for any other folder."""
    try:
        report = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("files"), list) \
            or not str(report.get("format", "")).startswith("sleb-"):
        return None
    return report


def _run_files(folder: Path) -> set[str] | None:
    """The files a sleb output folder's run file lists (itself included); None for any other folder.

    Beside those, a new file in a sleb output touches nothing the model is read from: that is
    how `sleb eval RUN --json RUN/eval.json` adds results that `sleb report RUN` shows. Inside
    any other input folder, sleb cannot know which files a loader reads, so it writes nothing.
    """
    report = _run_record(folder)
    if report is None:
        return None
    return {name for name in report["files"] if isinstance(name, str)} | {RUN_FILE}


def _digests(report: dict) -> dict | None:
    """The SHA-256 of each file a run file lists (None: a run file of an older sleb, without them)."""
    digests = report.get("file_sha256")
    return digests if isinstance(digests, dict) else None


def _unchanged(path: Path, digests: dict) -> bool:
    """Whether a file a run file lists is still what sleb wrote: unchanged in place (`sleb.ledger`, no
    hashing), or else with the recorded contents (a copy, another machine)."""
    if path.is_symlink() or not path.is_file():
        return False
    if ledger.wrote(path):
        return True
    recorded = digests.get(path.name)
    return isinstance(recorded, str) and ledger.sha256(path) == recorded


def foreign_files(folder: Path) -> list[str] | None:
    """Names in a previous output folder that `sleb` did not write, or changed since; None when it is no
    `sleb` output.

    Written by sleb: the files its run file lists with their SHA-256 (recorded when the folder was
    made) while their contents are still those, the run file itself (a sleb run file, as read),
    and files recorded in `sleb.ledger` and unchanged (added later: `sleb report`, `sleb eval
    --json`). A run file without a `files` list (older sleb) proves nothing, so that folder counts
    as the user's; a listed file without a digest counts as the user's unless the ledger says it is
    sleb's (see `check_output_folder` for such older folders). An empty folder has nothing foreign
    in it: replacing it loses nothing.
    """
    if not any(folder.iterdir()):
        return []
    report = _run_record(folder)
    if report is None:
        return None
    listed = _run_files(folder)
    digests = _digests(report) or {}

    def slebs(path: Path) -> bool:
        if path.name == RUN_FILE:
            return path.is_file() and not path.is_symlink()
        return _unchanged(path, digests) if path.name in listed else ledger.wrote(path)

    return sorted(p.name for p in folder.iterdir() if not slebs(p))


def write_run_record(folder: Path, record) -> Path:
    """Write a folder output's run file into its temporary `folder`, last: every folder writer goes
    through here. It lists every file there (`files`) with the SHA-256 of each (`file_sha256`), which is
    what lets `--overwrite` replace only files that are still what sleb wrote. `record`: a
    `sleb.runfile.RunRecord`."""
    written = sorted(p.name for p in folder.iterdir() if p.name != RUN_FILE)
    record.files = written + [RUN_FILE]
    record.file_sha256 = {name: ledger.sha256(folder / name) for name in written
                          if (folder / name).is_file() and not (folder / name).is_symlink()}
    return record.write(folder / RUN_FILE)


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
    shown = str(out)
    _check_name_lengths(out, shown, label)
    target = _unfollowed(out)
    if target.is_symlink():
        raise BadInput(f"{label} {shown} is a symbolic link; sleb does not write through links: give a real path")
    target = resolved(out)
    if target == Path(target.anchor):
        raise BadInput(f"{label} {shown} is a filesystem root; choose a new folder")
    for place, name in ((Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home directory")):
        if _within(place, target):
            what = "is" if place == target else "contains"
            raise BadInput(f"{label} {shown} {what} {name}; choose a new folder")
    _check_place(target, shown, label, inputs, folder=True)
    if target.exists():
        if not target.is_dir():
            raise BadInput(f"{label} {shown} exists and is not a folder")
        if not overwrite:
            raise BadInput(f"{shown} already exists; pass --overwrite to replace it")
        report = _run_record(target)
        if report is not None and _digests(report) is None and any(target.iterdir()):
            raise BadInput(f"{shown} was written by an older sleb whose {RUN_FILE} records no SHA-256 of its files, "
                           "so they cannot be proven unchanged; not replacing it even with --overwrite: "
                           "remove it yourself or choose a new folder")
        foreign = foreign_files(target)
        if foreign is None:
            raise BadInput(f"{shown} exists and is not a sleb output whose {RUN_FILE} lists the files sleb wrote; "
                           "not replacing it even with --overwrite: choose a new folder")
        if foreign:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BadInput(f"{shown} holds files sleb did not write or that changed since ({listed}); "
                           "move them or choose a new folder")
    _check_writable_parent(target, label, need_bytes + SLACK_BYTES if need_bytes else None)
    return target


def check_output_file(
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    need_bytes: int | None = None,
    label: str = "output file",
    resumable: bool = False,
) -> Path:
    """Refuse a file output the policy above forbids (BadInput, one line); returns its absolute path.

    Args:
        overwrite: replace an existing file, if sleb wrote it (`sleb.ledger`) and it is unchanged.
        resumable: an existing file is read and replaced by design (a search checkpoint, whose
            own format and identity are checked when it is read); it must still be a plain file.
    """
    shown = str(path)
    _check_name_lengths(path, shown, label)
    target = _unfollowed(path)
    if target.is_symlink():
        raise BadInput(f"{label} {shown} is a symbolic link; sleb does not write through links: give a real path")
    if target.is_dir():
        raise BadInput(f"{label} {shown} is a folder; give a file path")
    _check_place(target, shown, label, inputs, folder=False)
    if target.exists():
        if not target.is_file():
            raise BadInput(f"{label} {shown} exists and is not a regular file")
        if not resumable and not overwrite:
            raise BadInput(f"{label} {shown} already exists; pass --overwrite to replace it")
        if not resumable and not ledger.wrote(target):
            raise BadInput(f"{label} {shown} exists and sleb did not write it (or it changed since); not replacing "
                           "it even with --overwrite: choose another name")
    _check_writable_parent(target, label, need_bytes + SLACK_BYTES if need_bytes else None)
    return target


def check_output_files(folder: str | os.PathLike, names: Iterable[str], *, inputs=(), overwrite: bool = False,
                       label: str = "-o") -> Path:
    """For commands that add named files to a folder (never replace it): each file goes through the policy."""
    _check_name_lengths(folder, str(folder), label)
    folder_path = _unfollowed(folder)
    if folder_path.is_symlink() or (folder_path.exists() and not folder_path.is_dir()):
        raise BadInput(f"{label} {folder} exists and is not a folder")
    for name in names:
        check_output_file(folder_path / name, inputs=inputs, overwrite=overwrite, label=f"{label} {folder}:")
    return folder_path


# ---- temporaries, their locks, and cleaning up after killed runs ----

class _Claim:
    """A lock file `.sleb-lock-<token>` held (flock) while the writer's temporaries exist."""

    def __init__(self, folder: Path, target: str):
        self.token = secrets.token_hex(6)
        self.path = folder / f"{LOCK_PREFIX}{self.token}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            # What a plain open() gives a new file here (the umask, a default ACL): every output gets it.
            self.mode = os.fstat(self.fd).st_mode & 0o777
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            os.write(self.fd, json.dumps({"target": target, "host": socket.gethostname(), "pid": os.getpid()}).encode())
        except BaseException:
            self.release()
            raise

    def name(self, prefix: str, target: str) -> str:
        """`{prefix}{token}-{target}`, the target's name shortened in the middle to fit NAME_MAX."""
        head = f"{prefix}{self.token}-"
        room = NAME_MAX - len(os.fsencode(head))
        if len(os.fsencode(target)) > room:
            target = target[: room // 2 - 8] + "~" + target[-(room // 2 - 8):]
        return head + target

    def release(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)

    def give_mode(self, path: Path) -> None:
        """Give the files at or under `path` a plain open()'s mode: some writers (safetensors') create theirs
        0600, and the output should follow the user's umask like any other file."""
        files = [path] if not path.is_dir() else [Path(d) / f for d, _, names in os.walk(path) for f in names]
        for file in files:
            st = os.lstat(file)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != self.mode:
                os.chmod(file, self.mode)


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _settle(folder: Path, entry: Path, target: str | None) -> None:
    """Remove a dead writer's temporary; an old output whose replacement never arrived goes back."""
    if entry.name.startswith(OLD_PREFIX) and target and not (folder / target).exists():
        os.replace(entry, folder / target)
    else:
        _remove(entry)


def _legacy_target(name: str, prefix: str) -> str | None:
    """The target in a temporary name of sleb versions before the locks: `{prefix}{target}-{pid}-{random}`."""
    parts = name[len(prefix):].rsplit("-", 2)
    return parts[0] if len(parts) == 3 and parts[1].isdigit() else None


def clean_stale(folder: Path) -> list[Path]:
    """Remove temporaries of dead `sleb` writers in `folder` (their lock is free); put back orphaned old outputs.

    A writer that is alive holds its lock, in whatever PID namespace or container it runs, so
    its files are left alone. Returns what was cleaned.
    """
    cleaned: list[Path] = []
    if not folder.is_dir():
        return cleaned
    entries = [e for e in folder.iterdir() if e.name.startswith((TEMP_PREFIX, OLD_PREFIX))]
    tokens = {}
    for lock in folder.glob(f"{LOCK_PREFIX}*"):
        token = lock.name[len(LOCK_PREFIX):]
        tokens[token] = lock
        if _age(lock) < LOCK_GRACE_S:
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:  # another user's, or gone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its writer is alive
            os.close(fd)
            continue
        try:
            try:
                target = json.loads(os.read(fd, 65536) or b"{}").get("target")
            except ValueError:
                target = None
            for entry in entries:
                if entry.name.startswith((f"{TEMP_PREFIX}{token}-", f"{OLD_PREFIX}{token}-")):
                    _settle(folder, entry, target)
                    cleaned.append(entry)
            lock.unlink(missing_ok=True)
            cleaned.append(lock)
        finally:
            os.close(fd)
    for entry in entries:
        if entry in cleaned or not (entry.exists() or entry.is_symlink()):
            continue
        prefix = TEMP_PREFIX if entry.name.startswith(TEMP_PREFIX) else OLD_PREFIX
        token = entry.name[len(prefix):].split("-", 1)[0]
        if token in tokens or _age(entry) < UNLOCKED_STALE_S:
            continue
        _settle(folder, entry, _legacy_target(entry.name, prefix))
        cleaned.append(entry)
    return cleaned


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first), so a failure can take them back."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except BaseException:
        _remove_parents(created)
        raise
    return created


def _remove_parents(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            break


@contextmanager
def _claimed(target: Path, shown: str | os.PathLike) -> Iterator[tuple[_Claim, list[Path]]]:
    """Parents created, stale leftovers cleaned, a lock held beside `target`; all undone on failure."""
    created = _make_parents(target.parent)
    claim = None
    try:
        clean_stale(target.parent)
        claim = _Claim(target.parent, target.name)
        yield claim, created
    except BaseException as err:
        if claim is not None:
            claim.release()
            claim = None
        _remove_parents(created)
        raise_if_disk_full(err, shown)
        raise
    finally:
        if claim is not None:
            claim.release()


@contextmanager
def atomic_folder(out: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out` that becomes `out` only if the block succeeds.

    On any error (or a signal) the temporary folder is deleted and an existing `out` is untouched.
    An existing `out` is replaced only with `replace=True` (callers check the policy first).
    """
    target = _unfollowed(out)
    with _claimed(target, out) as (claim, _):
        tmp = target.parent / claim.name(TEMP_PREFIX, target.name)
        tmp.mkdir()  # default mode: the umask applies, as for any folder the user creates
        try:
            yield tmp
            claim.give_mode(tmp)
            if target.exists() or target.is_symlink():
                if not replace:
                    raise BadInput(f"{out} already exists; pass --overwrite to replace it")
                old = target.parent / claim.name(OLD_PREFIX, target.name)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_disk_full(err, out)  # one line naming the free space, now that the temporary is gone
            raise
    listed = _run_files(target)
    if listed:  # in place (the record's key is the final path): unchanged, a file is then sleb's without hashing
        ledger.record(target / name for name in sorted(listed))


@contextmanager
def atomic_files(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield temporary paths (same names' endings) beside `targets`; on success each is renamed onto its
    target, in order, and recorded in `sleb.ledger`. On failure nothing of them remains."""
    paths = [_unfollowed(t) for t in targets]
    if any(p.parent != paths[0].parent for p in paths):
        raise ValueError("atomic_files: targets must share a folder")
    with _claimed(paths[0], targets[0]) as (claim, _):
        temps = [p.parent / claim.name(TEMP_PREFIX, p.name) for p in paths]
        try:
            yield temps
            for tmp, target in zip(temps, paths):
                claim.give_mode(tmp)
                os.replace(tmp, target)
        except BaseException as err:
            for tmp in temps:
                _remove(tmp)
            raise_if_disk_full(err, targets[0])
            raise
    ledger.record(paths)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have `write(tmp)` write a file beside `path`, then rename it into place (and record it as sleb's)."""
    target = _unfollowed(path)
    if target.is_dir():
        raise BadInput(f"{path} is a folder; give a file path")
    with atomic_files(path) as (tmp,):
        write(tmp)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file through a temporary file beside it (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class Scratch:
    """A temporary folder of sleb's inside `parent` (e.g. accelerate's offload files), locked like any
    temporary: removed by `close()`, or by the next sleb run there if this process dies."""

    def __init__(self, parent: str | os.PathLike, name: str):
        folder = _unfollowed(parent)
        self._created = _make_parents(folder)
        try:
            clean_stale(folder)
            self._claim = _Claim(folder, name)
            self.path = folder / self._claim.name(TEMP_PREFIX, name)
            self.path.mkdir()
        except BaseException:
            _remove_parents(self._created)
            raise

    def close(self) -> None:
        if self._claim is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self._claim.release()
            self._claim = None

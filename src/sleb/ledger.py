"""The record of files `sleb` wrote: what makes an existing file safe to replace.

A file's name or contents prove nothing about who wrote it (a user may call their notes
`report.md`, or keep a JSON with `"format": "sleb-..."`). So every single file a command writes
(`--json`, `--markdown`, reports, plots, checkpoints, GGUF files) is recorded here once it is in
place, with its size, times, inode and (up to `DIGEST_LIMIT`) a SHA-256 of its contents. An
existing output is replaced only when its record still matches: sleb wrote it and nobody has
changed it since. A file written on another machine, or edited, counts as the user's.

The record lives outside every output: `$SLEB_STATE`, else `$XDG_STATE_HOME/sleb`, else
`~/.local/state/sleb`, in `written.json`, guarded by an `flock` so concurrent runs do not lose
each other's entries. Entries whose file is gone or changed are dropped whenever it is written.
Folder outputs (`sleb prune -o`, `sleb quantize -o`) also list their files with a SHA-256 of each
in their run file, which goes with the folder (a copy, another machine); their record here only
spares re-hashing a file that is unchanged in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

LEDGER = "written.json"
# Larger files (GGUF models) are identified by size, times and inode alone: hashing gigabytes
# on every overwrite check would cost more than it proves.
DIGEST_LIMIT = 64 * 2**20
STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "inode", "device")


def state_dir() -> Path:
    """$SLEB_STATE, else $XDG_STATE_HOME/sleb, else ~/.local/state/sleb."""
    if os.environ.get("SLEB_STATE"):
        return Path(os.environ["SLEB_STATE"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sleb"


def key(path: str | os.PathLike) -> str:
    """The record's key: the absolute path, its folder resolved, its last part not (a link is not its target)."""
    path = Path(path).expanduser()
    return str(path.parent.resolve() / path.name)


def identity(path: str | os.PathLike, digest: bool = True) -> dict | None:
    """What must stay the same for a recorded file to still be the one sleb wrote (None: no regular file).

    Any write, rename, chmod or copy over the file changes its ctime; the digest also catches a
    clock set back. `digest=False` gives only the stat fields (cheap, for pruning the record).
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    found = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
             "device": st.st_dev}
    if digest and st.st_size <= DIGEST_LIMIT:
        found["sha256"] = sha256(path)
    return found


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's contents (hex), read in pieces (model files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _locked() -> Iterator[Path]:
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / (LEDGER + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder / LEDGER


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(paths: Iterable[str | os.PathLike]) -> None:
    """Record files sleb has just put in place. Best effort: a failure only means they count as the user's."""
    try:
        with _locked() as ledger:
            entries = {k: v for k, v in _read(ledger).items()  # drop files that are gone or changed
                       if isinstance(v, dict) and identity(k, digest=False) == {f: v.get(f) for f in STAT_FIELDS}}
            for path in paths:
                found = identity(path)
                if found is not None:
                    entries[key(path)] = found
            tmp = ledger.with_name(f".{LEDGER}.{os.getpid()}")
            tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
            os.replace(tmp, ledger)
    except OSError as err:
        warnings.warn(f"could not record the files sleb wrote in {state_dir()} ({err.strerror or err}); "
                      "they will count as yours and not be replaced", stacklevel=2)


def wrote(path: str | os.PathLike) -> bool:
    """Whether sleb wrote the file at `path` and it is unchanged since."""
    entry = _read(state_dir() / LEDGER).get(key(path))
    return entry is not None and identity(path) == entry

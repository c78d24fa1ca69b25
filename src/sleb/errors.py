"""The exceptions `sleb` raises for users; the CLI prints any of them as one line and exits 1.

* `BadInput`: what the user asked for cannot be done as asked (an argument, a path, a file's
  contents, a model that is not a causal decoder). Nothing was written.
* `CheckFailed`: a check on the work itself failed (a saved checkpoint reloads with other logits,
  the dense model's loss is not finite). Nothing was written.

Both are `SlebError`, which library users can catch as one type. `SlebWarning` is for runs that
go ahead but probably not as meant (the CLI prints it as one `Warning: ...` line).
"""

import errno
import os
import re
import shutil


def one_line(err: BaseException) -> str:
    """An exception's message on one line (its type's name where it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


class SlebError(Exception):
    """A user-facing error: bad input or a check that failed. The message is one clear line."""


class BadInput(SlebError, ValueError):
    """The input (arguments, paths, files, model) cannot be used as given."""


class UsageError(BadInput):
    """Settings that cannot go together (or `flag`'s value out of its range): the CLI reports it as
    click reports a usage error (exit 2), like the flags it checks itself; `reason` is the message
    without the flag's name."""

    def __init__(self, reason: str, flag: str | None = None):
        super().__init__(f"{flag} {reason}" if flag else reason)
        self.reason, self.flag = reason, flag


class CheckFailed(SlebError):
    """A check on the result failed; nothing was written."""


class SlebWarning(UserWarning):
    """A run goes ahead, but probably not as the user meant (e.g. calibration windows that mostly repeat)."""


def missing_path(path, what: str) -> BadInput:
    """The one line for a local path that is not there. A symbolic link that leads nowhere (a loop, a
    missing target) is said as such: `exists()` is False for it too, and "not found" (or a hub lookup) misleads."""
    if os.path.islink(path):
        return BadInput(f"{path} is a symbolic link that leads nowhere (a loop, or its target is missing)")
    return BadInput(f"{what} not found: {path}")


# How a full disk or quota shows when the errno is lost: safetensors' Rust error text, numpy's short write
# (`tofile`, which the GGUF writer uses: "1572864 requested and 686928 written").
_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b|\d+ requested and \d+ written")


def raise_if_disk_full(err: BaseException, path) -> None:
    """Re-raise `err`, met while writing `path`, as one BadInput line if it means the disk (or quota) is full.

    Writers call this from their `except` after removing their temporary files, so the free space
    named is what the filesystem has without them. Any other error is left to the caller to re-raise.
    """
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    if not (full or _DISK_FULL.search(str(err))):
        return
    place = os.path.abspath(path)
    while not os.path.exists(place) and os.path.dirname(place) != place:
        place = os.path.dirname(place)
    try:
        free = f"{shutil.disk_usage(place).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    raise BadInput(f"no space left on device while writing {path} ({free})") from err

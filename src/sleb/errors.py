"""The exceptions `sleb` raises for users; the CLI prints any of them as one line and exits 1.

* `BadInput`: what the user asked for cannot be done as asked (an argument, a path, a file's
  contents, a model that is not a causal decoder). Nothing was written.
* `CheckFailed`: a check on the work itself failed (a saved checkpoint reloads with other logits,
  the dense model's loss is not finite). Nothing was written.

Both are `SlebError`, which library users can catch as one type. `SlebWarning` is for runs that
go ahead but probably not as meant (the CLI prints it as one `Warning: ...` line).
"""

import os


class SlebError(Exception):
    """A user-facing error: bad input or a check that failed. The message is one clear line."""


class BadInput(SlebError, ValueError):
    """The input (arguments, paths, files, model) cannot be used as given."""


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


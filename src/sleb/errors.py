"""The exceptions `sleb` raises for users; the CLI prints any of them as one line and exits 1.

* `BadInput`: what the user asked for cannot be done as asked (an argument, a path, a file's
  contents, a model that is not a causal decoder). Nothing was written.
* `CheckFailed`: a check on the work itself failed (a saved checkpoint reloads with other logits,
  the dense model's loss is not finite). Nothing was written.

Both are `SlebError`, which library users can catch as one type.
"""


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

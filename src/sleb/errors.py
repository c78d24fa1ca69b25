"""The one exception type `sleb` raises for bad input; the CLI prints it as a single line."""


class SlebError(Exception):
    """A user-facing error: bad input or a check that failed. The message is one clear line."""

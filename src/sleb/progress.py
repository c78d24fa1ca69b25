"""Progress bars, one way for every stage: tqdm's redrawn bar on a terminal; plain lines when stderr is not one.

Through a pipe (CI, `sleb prune ... 2>&1 | tee log`) a carriage-return bar is noise: every redraw lands in
the log. There `progress_bar` prints one whole line (no '\\r', at most `MAX_LINE` characters) at most every
`PLAIN_INTERVAL` seconds, with the count, the elapsed time and the ETA, and the final state when it ends.
In a notebook tqdm's widget stays.
"""

from __future__ import annotations

import sys

from tqdm import std
from tqdm.auto import tqdm

PLAIN_INTERVAL = 5.0  # seconds between plain lines: a log a step that takes seconds can still be read
MAX_LINE = 200
# No bar: its width means nothing in a log. With a total: percentage, count, elapsed < ETA, rate, postfix.
_PLAIN_FORMAT = "{desc}{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_PLAIN_FORMAT_NO_TOTAL = "{desc}{n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines, each written once."""

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, text: str) -> None:
        for part in text.replace("\r", "\n").split("\n"):
            line = part.rstrip()[:MAX_LINE]
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line

    def flush(self) -> None:
        self.stream.flush()


def _terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _notebook() -> bool:
    # tqdm.auto's class is tqdm.asyncio's outside a notebook, and derives from tqdm.notebook's inside one.
    return any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)


def progress_bar(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)` on a terminal (or in a notebook); plain lines on stderr otherwise."""
    stream = sys.stderr
    if kwargs.get("disable") or _notebook() or _terminal(stream):
        return tqdm(iterable, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    if kwargs.get("desc"):  # as `set_description` spells it, so the line reads alike before and after
        kwargs["desc"] = f"{kwargs['desc']}: "
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    kwargs.update(file=_Lines(stream), mininterval=PLAIN_INTERVAL, maxinterval=max(PLAIN_INTERVAL, 10.0),
                  bar_format=_PLAIN_FORMAT if total else _PLAIN_FORMAT_NO_TOTAL, leave=True, ascii=True)
    return std.tqdm(iterable, **kwargs)


def quiet_library_bars() -> None:
    """When stderr is not a terminal, turn off the bars transformers and huggingface_hub draw themselves
    (loading and writing weights, downloads): they cannot take `progress_bar`'s plain lines, and their
    carriage returns would land in the log. The command line calls this once, before any work."""
    if _terminal(sys.stderr):
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()

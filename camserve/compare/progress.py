"""A progress bar for the per-input loops of a comparison (minutes over a thousand images).

tqdm draws it on stderr (done / total, rate, time left), only when stderr is a terminal:
logs of CI runs and tests, and a redirected stderr, stay free of carriage returns. Without
tqdm installed (it comes with the ``compare`` extra) the loops simply run without one.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO


class QuietBar:
    """What :func:`bar` returns when no bar is drawn: the calls of a tqdm bar, doing nothing."""

    def update(self, n: int = 1) -> None:
        """Nothing to count without a bar."""

    def close(self) -> None:
        """Nothing to clear without a bar."""

    def __enter__(self) -> "QuietBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, pytest's capture)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(total: int, desc: str, *, unit: str = "img", stream: TextIO | None = None) -> Any:
    """A tqdm bar over ``total`` steps on ``stream`` (default stderr) when it is a terminal,
    else a :class:`QuietBar`; use as a context manager and call ``update()`` per step."""
    stream = sys.stderr if stream is None else stream
    if not is_terminal(stream):
        return QuietBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return QuietBar()
    return tqdm(total=total, desc=desc, unit=unit, file=stream, mininterval=0.5, smoothing=0.1, **screen(stream))


def screen(stream: Any) -> dict[str, Any]:
    """tqdm's size arguments: follow the terminal's width, except where it reports 0 columns or
    0 rows (a bare pseudo-terminal, e.g. under ``script`` or some CI runners): tqdm would then
    draw nothing, so a fixed 80 x 24 is used instead."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's buffer)
        return {"dynamic_ncols": True}
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 80, "nrows": 24}

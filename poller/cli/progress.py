"""A progress line for long runs on a terminal: organizations read of those known, errors so far.

Only on a terminal: logs and cron output stay free of carriage returns. The line is redrawn in
place at most ten times a second and ends with a newline once the listing is complete and every
organization in it is read.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from poller.cekura.client import ProgressObserver

BAR_WIDTH = 24
REDRAW_EVERY = 0.1  # seconds


class TerminalProgress:
    def __init__(self, stream: TextIO, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._last_drawn = float("-inf")

    def __call__(self, done: int, total: int, failed: int, listing: bool) -> None:
        if total == 0:
            return
        finished = done >= total and not listing
        now = self._clock()
        if not finished and now - self._last_drawn < REDRAW_EVERY:
            return
        self._last_drawn = now
        # \r and "erase to end of line": the new text fully replaces the old, even if shorter.
        self._stream.write("\r\x1b[K" + progress_line(done, total, failed, listing))
        if finished:
            self._stream.write("\n")
        self._stream.flush()


def progress_line(done: int, total: int, failed: int, listing: bool = False) -> str:
    """``listing``: organizations are still being listed, so the total is "at least" (a +)."""
    filled = BAR_WIDTH * done // total if total else 0
    bar = "█" * filled + "░" * (BAR_WIDTH - filled)
    errors = f"{failed:,} error" + ("" if failed == 1 else "s")
    more = "+" if listing else ""
    return f"organizations {bar} {done:,}/{total:,}{more}  {errors}"


def terminal_progress(stream: TextIO | None = None) -> ProgressObserver | None:
    """A progress observer for the API client, or None when ``stream`` is not a terminal."""
    stream = stream or sys.stderr
    return TerminalProgress(stream) if stream.isatty() else None

"""Reaching a thread blocked on a socket when a stop is requested.

A thread waiting for a server's answer cannot look at an Event; breaking its connection from
another thread is the one way to end the wait at once. The fetch and delivery both do that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# How often the watcher looks whether a stop was requested.
CANCEL_POLL_SECONDS = 0.2


@contextmanager
def on_cancel(
    cancel: threading.Event | None, action: Callable[[], None], *, grace: float = 0.0
) -> Iterator[None]:
    """While the block runs, a set ``cancel`` calls ``action`` once the block has had ``grace``
    more seconds to finish by itself."""
    if cancel is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not cancel.wait(CANCEL_POLL_SECONDS):
            if done.is_set():
                return
        if not done.wait(grace):
            action()

    watcher = threading.Thread(target=watch, name="cancel-watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()

"""The long-running worker: on the fixed schedule a cycle at start and every interval (with
jitter), never two at once; on the adaptive schedule a loop of work-queue steps.

Stopping: the first SIGTERM/SIGINT stops scheduling and asks the running cycle to stop at its
next safe point (a fetch breaks off its requests in flight and its waits at once; persisting
finishes its transaction; delivery stops between emails and breaks off a send still under way
after a few seconds: nothing half-written, the rows it held go back to pending); the process
then exits 0. A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

log = structlog.get_logger(__name__)
T = TypeVar("T")


def run_daemon(
    cycle: Callable[[threading.Event], object],
    *,
    interval: float,
    jitter: float,
    stop: threading.Event | None = None,
    install_signal_handlers: bool = True,
) -> None:
    """Run ``cycle(cancel)`` now and every ``interval`` seconds until ``stop`` is set."""
    stop = stop or threading.Event()
    cancel = threading.Event()

    def guarded_cycle() -> None:
        try:
            cycle(cancel)
        except Exception as exc:  # noqa: BLE001 - a daemon must outlive one bad cycle
            # Without this the scheduler would log a bare traceback and carry on; say what
            # failed in our own event so alerting on `cycle.crashed` works.
            log.exception("cycle.crashed", error=str(exc))

    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        timezone=UTC,
    )
    scheduler.add_job(
        guarded_cycle,
        IntervalTrigger(seconds=interval, jitter=jitter or None, timezone=UTC),
        id="cycle",
        next_run_time=datetime.now(UTC),
        max_instances=1,  # never two cycles at once
        coalesce=True,  # a cycle that overran its interval is followed by one, not a burst
        misfire_grace_time=None,
    )

    if install_signal_handlers:
        stop_on_signals(stop, cancel)
    log.info("daemon.started", interval=interval, jitter=jitter, pid=os.getpid())
    scheduler.start()
    try:
        wait_responsive_to_signals(stop.wait)
    finally:
        cancel.set()
        scheduler.shutdown(wait=True)
        log.info("daemon.stopped")


# After a step that crashed (the database unreachable, say): wait before trying again, so
# the log shows one line every few seconds, not a loop as fast as the failure.
CRASH_PAUSE_SECONDS = 5.0


def run_worker_loop(step: Callable[[threading.Event], float], *, name: str) -> None:
    """Call ``step(cancel)`` until SIGTERM/SIGINT; it returns how many seconds to wait before
    the next call (0: there is more work). The adaptive schedule's daemon: its work comes due
    organization by organization, not on an interval, so a loop replaces the scheduler."""
    stop = threading.Event()
    cancel = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                pause = step(cancel)
            except Exception as exc:  # noqa: BLE001 - a daemon must outlive one bad step
                log.exception("step.crashed", error=str(exc))
                pause = CRASH_PAUSE_SECONDS
            if pause > 0:
                stop.wait(pause)

    stop_on_signals(stop, cancel)
    log.info("daemon.started", schedule="adaptive", worker=name, pid=os.getpid())
    in_worker_thread(loop)
    log.info("daemon.stopped")


# The kernel may hand a signal to any thread, and Python runs its handler only when the main
# thread next runs bytecode: a main thread blocked without a timeout would never see it.
SIGNAL_POLL_SECONDS = 0.5


def wait_responsive_to_signals(wait: Callable[[float], bool]) -> None:
    """Call ``wait(timeout)`` until it returns True, so signal handlers run in between."""
    while not wait(SIGNAL_POLL_SECONDS):
        pass


def in_worker_thread(function: Callable[[], T]) -> T:
    """``function()`` in a thread of its own while the main thread stays free to run signal
    handlers (see SIGNAL_POLL_SECONDS); its result, or its exception re-raised."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(function())
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            failure.append(error)

    def finished(timeout: float) -> bool:
        worker.join(timeout)
        return not worker.is_alive()

    worker = threading.Thread(target=run, name="cycle")
    worker.start()
    wait_responsive_to_signals(finished)
    if failure:
        raise failure[0]
    return outcome[0]


def stop_on_signals(
    stop: threading.Event, cancel: threading.Event, *, forced_status: int = 0
) -> None:
    """The first SIGTERM/SIGINT sets ``cancel`` and ``stop``; a second exits at once with
    ``forced_status``."""

    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            log.warning("daemon.forced_exit", signal=signal.Signals(signum).name)
            # Cold stop: claimed emails are retried by any poller once their lease expires.
            os._exit(forced_status)
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        cancel.set()
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)

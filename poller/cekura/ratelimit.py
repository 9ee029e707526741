"""One request-rate budget shared by every API worker thread: a cap, and back-pressure on 429.

- The cap (``max_requests_per_second``, 0 = none) is a token bucket holding a tenth of a
  second's worth of requests: short bursts are smoothed instead of hitting the API at once.
- A 429 from the API pauses *every* worker until its Retry-After (or the backoff) has passed,
  not only the worker that got it: the others would otherwise keep hammering a server that
  just said "too many", and each collect their own 429. The rate is then halved (from the
  cap, or from the rate actually observed when there is no cap) and grows back by half every
  second without another 429, so the poller settles just under the API's real limit.
  429s answering requests already in flight during a pause extend the pause but do not halve
  the rate again: they are echoes of the same overload.

Waiting is done by scheduling: ``delay()`` reserves the caller's slot under a lock and returns
how long to sleep; the caller sleeps outside the lock, so one slow sleeper never blocks others.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

# The bucket holds this fraction of a second's worth of requests (at least one).
BURST_SECONDS = 0.1
# After a 429: rate x BACKOFF_FACTOR, then x RECOVERY_FACTOR per RECOVERY_STEP seconds of calm.
BACKOFF_FACTOR = 0.5
RECOVERY_FACTOR = 1.5
RECOVERY_STEP = 1.0
# Never slow below this, however many 429s: a cycle must still finish.
MIN_RATE = 1.0
# Observed throughput is counted over windows of this many seconds.
WINDOW_SECONDS = 1.0


class RequestRateLimiter:
    """Thread-safe; ``max_per_second`` 0 or None means no cap (429 back-pressure still applies)."""

    def __init__(
        self,
        max_per_second: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cap = max_per_second if max_per_second else None
        self._clock = clock
        self._lock = threading.Lock()
        self._rate = self._cap  # None: unlimited right now
        self._recover_to: float | None = None  # unlimited again above this rate
        self._next_free = 0.0  # theoretical arrival time of the next request (GCRA)
        self._pause_until = 0.0
        self._last_adjust = 0.0
        self._window_start = clock()
        self._window_count = 0
        self._previous_window_rate = 0.0

    @property
    def rate(self) -> float | None:
        """The rate currently enforced (None: unlimited)."""
        with self._lock:
            return self._rate

    def delay(self) -> float:
        """Reserve a slot for one request; the caller sleeps the returned seconds, then sends."""
        with self._lock:
            now = self._clock()
            self._recover(now)
            start = max(now, self._pause_until)
            if self._rate is not None:
                interval = 1.0 / self._rate
                tolerance = (max(1.0, self._rate * BURST_SECONDS) - 1.0) * interval
                arrival = max(self._next_free, start)
                start = max(start, arrival - tolerance)
                self._next_free = arrival + interval
            self._count(start)
            return start - now

    def throttled(self, pause: float) -> None:
        """The API answered 429: every worker waits ``pause`` seconds, then goes slower."""
        with self._lock:
            now = self._clock()
            already_paused = now < self._pause_until
            self._pause_until = max(self._pause_until, now + max(0.0, pause))
            if already_paused:
                return
            observed = self._rate if self._rate is not None else self._observed_rate(now)
            if self._cap is None and self._recover_to is None:
                self._recover_to = observed
            self._rate = max(MIN_RATE, observed * BACKOFF_FACTOR)
            self._last_adjust = self._pause_until
            rate = self._rate
        log.warning("api.throttled", pause=round(pause, 3), requests_per_second=round(rate, 1))

    def _recover(self, now: float) -> None:
        if self._rate is None or self._rate == self._cap or now < self._pause_until:
            return
        steps = math.floor((now - self._last_adjust) / RECOVERY_STEP)
        if steps <= 0:
            return
        self._last_adjust += steps * RECOVERY_STEP
        self._rate *= RECOVERY_FACTOR**steps
        ceiling = self._cap if self._cap is not None else self._recover_to
        if ceiling is not None and self._rate >= ceiling:
            self._rate, self._recover_to = self._cap, None
            log.info("api.rate_recovered", requests_per_second=self._cap)

    def _count(self, when: float) -> None:
        if when - self._window_start >= WINDOW_SECONDS:
            elapsed = when - self._window_start
            self._previous_window_rate = self._window_count / elapsed
            self._window_start, self._window_count = when, 0
        self._window_count += 1

    def _observed_rate(self, now: float) -> float:
        # A window that just started says little: the last complete one counts as well.
        current = self._window_count / max(WINDOW_SECONDS, now - self._window_start)
        return max(current, self._previous_window_rate, MIN_RATE)

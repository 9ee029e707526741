"""Is the poller doing its job? One verdict, shared by `/healthz` and `poller health`.

Healthy means: a successful cycle finished less than ``max_age`` seconds ago, and no email is
held back by a problem that is not about its recipients (SMTP server unreachable, login or
sender refused, a setting the email cannot be built with): such a problem holds back every
alert until someone fixes it, so it must show. An admin's address being refused does not
count: it costs that admin's copy only (``email.recipient_refused`` / ``email.failed`` log
events, ``poller status``).

Overrun (the last successful cycle took longer than the interval): a breach then waits up to
that cycle's duration, not the interval, to be seen. Still healthy, with "overrun" in the
reason, while it took at most twice the interval; unhealthy beyond that, as a staleness limit
of twice the interval would soon say anyway. See "Sizing" in docs/operations.md.

On the adaptive schedule the "cycle" is the listing, and reads overdue by more than
``max_read_interval`` make it unhealthy too (``judge_reads``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from poller.engine.model import QueueStats


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str  # one line for people: why healthy or not

    @property
    def status_line(self) -> str:
        return f"{'healthy' if self.healthy else 'unhealthy'}: {self.reason}"


def is_successful(outcome: str | None, orgs_read: int, orgs_failed: int) -> bool:
    """The same rule as the SQL in ``Store.last_successful_run``, for a cycle seen in memory."""
    if outcome == "ok":
        return True
    return outcome == "partial" and (orgs_read > 0 or orgs_failed == 0)


def judge(
    last_success: datetime | None,
    *,
    now: datetime,
    max_age: float,
    running_since: datetime | None = None,
    held: tuple[int, str | None] = (0, None),
    cycle_seconds: float | None = None,
    interval: float | None = None,
) -> Verdict:
    """``running_since``: a process that started less than ``max_age`` ago gets time to finish
    its first cycle before it is called unhealthy (the daemon passes its start time).
    ``held``: ``Store.held_back()``, emails waiting on a problem not about their recipients.
    ``cycle_seconds``: how long the last successful cycle took, compared with ``interval``."""
    if last_success is not None:
        age = (now - last_success).total_seconds()
        when = f"{_seconds(age)} ago (at {last_success:%Y-%m-%d %H:%M:%S} UTC)"
        if age <= max_age and held[0]:
            return Verdict(
                False,
                f"{held[0]} email(s) held back by a problem that is not about their recipients: "
                f"{held[1]}; see the email.held and email.retry log events",
            )
        if age <= max_age and cycle_seconds is not None and interval is not None:
            took = f"it took {_seconds(cycle_seconds)}"
            sizing = "see Sizing in docs/operations.md"
            if cycle_seconds > 2 * interval:
                return Verdict(
                    False,
                    f"last successful cycle {when}, overrun: {took}, more than twice the "
                    f"{_seconds(interval)} interval; {sizing}",
                )
            if cycle_seconds > interval:
                return Verdict(
                    True,
                    f"last successful cycle {when}, overrun: {took}, longer than the "
                    f"{_seconds(interval)} interval; {sizing}",
                )
        if age <= max_age:
            return Verdict(True, f"last successful cycle {when}")
        return Verdict(
            False,
            f"last successful cycle {when}, longer than {_seconds(max_age)}; "
            "see the cycle.finished, cycle.list_failed and api.error log events",
        )
    if running_since is not None:
        started = (now - running_since).total_seconds()
        if started <= max_age:
            return Verdict(True, f"starting: no cycle finished yet (up {_seconds(started)})")
        return Verdict(
            False,
            f"no successful cycle in {_seconds(started)} since the start; "
            "see the cycle.list_failed and api.error log events",
        )
    return Verdict(False, "no successful cycle recorded in the database yet")


def judge_reads(verdict: Verdict, stats: QueueStats | None, max_read_interval: float) -> Verdict:
    """The adaptive schedule's extra rule: unhealthy while an org's read is overdue by more
    than ``max_read_interval`` (the replicas cannot keep up, or none is running). ``verdict``
    is ``judge``'s, whose "cycle" is then the listing."""
    if not verdict.healthy or stats is None:
        return verdict
    lag = stats.oldest_overdue_seconds
    if lag > max_read_interval:
        return Verdict(
            False,
            f"reads behind: {stats.overdue} organization(s) overdue, the oldest by "
            f"{_seconds(lag)}, more than max_read_interval ({_seconds(max_read_interval)}); "
            "add replicas or raise max_requests_per_second (Sizing in docs/operations.md)",
        )
    return Verdict(True, f"{verdict.reason}; reads on time ({stats.overdue} overdue)")


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"

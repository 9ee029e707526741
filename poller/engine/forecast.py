"""Burn rate, runway and threshold advice from a balance history (pure: no I/O, no clock).

A history is a list of ``Point`` (time, balance) in time order whose last point is the
latest observation. Between two points the balance is taken to have stayed where the earlier
point left it, so a window that starts between two points starts from the earlier one's
balance (carried forward).

- **Usage** in a window is the sum of every *decrease* between consecutive points. Every
  increase is a top-up (or a refund): it is added to ``topped_up`` and never offsets usage,
  so buying credits does not make an organization look idle.
- **Burn rate** = usage / the window's covered length, in credits per day.
- **Runway** = balance / burn rate (days); ``runs_out_at`` = the latest observation + runway.
  A balance at or below zero has a runway of zero: it has run out already. A runway beyond
  ``HORIZON`` (10 years) has no date: it is "more than 10 years" (``beyond_horizon``).

An estimate is only *meaningful* with enough history: the window covers at least
``MIN_SPAN`` (6 h), holds at least ``MIN_POINTS`` (3) points, and usage is positive.
Otherwise the rate is ``None`` and nothing is promised. The runway uses the 24-hour rate
(recent usage) and falls back to the 7-day rate when the last day alone is not meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal

DAY = timedelta(days=1)
WEEK = timedelta(days=7)
MIN_SPAN = timedelta(hours=6)
MIN_POINTS = 3
SECONDS_PER_DAY = Decimal(86400)
# The API accepts thresholds with at most 8 digits before the decimal point.
MAX_THRESHOLD = Decimal("99999999")
# A week of history says nothing about a decade ahead, and a near-idle org with a large
# balance would otherwise get a date past datetime's year 9999 (an OverflowError).
HORIZON_YEARS = 10
HORIZON_DAYS = Decimal(3653)  # ten years, leap days included
BEYOND_HORIZON = f"more than {HORIZON_YEARS} years"


@dataclass(frozen=True, slots=True)
class Point:
    at: datetime
    balance: Decimal


@dataclass(frozen=True)
class Window:
    """What one window of the history says: usage, top-ups, and the rate if meaningful."""

    length: timedelta
    start: datetime  # where the covered part begins (the window start, or the first point)
    end: datetime
    points: int  # points inside the window, counting a carried-forward start as one
    used: Decimal
    topped_up: Decimal
    topups: int

    @property
    def covered(self) -> timedelta:
        return self.end - self.start

    @property
    def meaningful(self) -> bool:
        return self.covered >= MIN_SPAN and self.points >= MIN_POINTS and self.used > 0

    @property
    def rate(self) -> Decimal | None:
        """Credits per day, or None when the window says too little to extrapolate."""
        if not self.meaningful:
            return None
        return self.used * SECONDS_PER_DAY / Decimal(self.covered.total_seconds())


@dataclass(frozen=True)
class Forecast:
    balance: Decimal
    as_of: datetime
    day: Window
    week: Window

    @property
    def rate(self) -> Decimal | None:
        """The rate the runway uses: the last 24 h, else the last 7 days, else none."""
        return self.day.rate if self.day.rate is not None else self.week.rate

    @property
    def typical_rate(self) -> Decimal | None:
        """Typical daily usage for threshold advice: the week, else the last day."""
        return self.week.rate if self.week.rate is not None else self.day.rate

    @property
    def runway_days(self) -> Decimal | None:
        rate = self.rate
        if rate is None:
            return None
        return max(Decimal(0), self.balance) / rate

    @property
    def beyond_horizon(self) -> bool:
        """An estimate says the credits last longer than HORIZON_DAYS: no date is given."""
        days = self.runway_days
        return days is not None and days > HORIZON_DAYS

    @property
    def runs_out_at(self) -> datetime | None:
        """The estimated run-out; None without an estimate or beyond the horizon."""
        days = self.runway_days
        if days is None or days > HORIZON_DAYS:
            return None
        return self.as_of + timedelta(seconds=float(days * SECONDS_PER_DAY))


def window(points: Sequence[Point], length: timedelta) -> Window:
    """Usage and top-ups over the ``length`` before the last point (see the module docstring)."""
    if not points:
        raise ValueError("a window needs at least one point")
    end = points[-1].at
    start = end - length
    inside = [point for point in points if point.at > start]
    earlier = [point for point in points if point.at <= start]
    if earlier:
        # The balance at the window start is the last one seen before it.
        inside.insert(0, Point(start, earlier[-1].balance))
    used = topped_up = Decimal(0)
    topups = 0
    for before, after in zip(inside, inside[1:], strict=False):
        change = after.balance - before.balance
        if change < 0:
            used -= change
        elif change > 0:
            topped_up += change
            topups += 1
    return Window(
        length=length,
        start=inside[0].at,
        end=end,
        points=len(inside),
        used=used,
        topped_up=topped_up,
        topups=topups,
    )


def forecast(points: Sequence[Point]) -> Forecast:
    """Burn rates over the last day and week, and the runway they imply, as of the last point."""
    ordered = sorted(points, key=lambda point: point.at)
    if not ordered:
        raise ValueError("a forecast needs at least one point")
    latest = ordered[-1]
    return Forecast(
        balance=latest.balance,
        as_of=latest.at,
        day=window(ordered, DAY),
        week=window(ordered, WEEK),
    )


def covered_days(threshold: Decimal, rate: Decimal) -> Decimal:
    """How many days of usage at ``rate`` the threshold stands for."""
    return threshold / rate


def suggest_threshold(rate: Decimal, days: Decimal) -> Decimal:
    """A threshold worth ``days`` of usage, rounded up to two significant digits.

    ``rate * days`` of 2,345.6 gives 2,400; of 7.31 gives 7.4; never more than the API accepts.
    """
    if rate <= 0 or days <= 0:
        raise ValueError("a suggestion needs a positive rate and a positive number of days")
    exact = rate * days
    step = Decimal(1).scaleb(exact.adjusted() - 1)
    step = max(step, Decimal("0.01"))
    rounded = (exact / step).to_integral_value(rounding=ROUND_CEILING) * step
    return min(rounded, MAX_THRESHOLD).quantize(Decimal("0.01"))


def needs_advice(threshold: Decimal, rate: Decimal | None, days: Decimal) -> bool:
    """Whether the threshold leaves less than ``days`` of usage to react in."""
    return rate is not None and rate > 0 and threshold < rate * days

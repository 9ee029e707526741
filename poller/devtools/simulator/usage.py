"""The simulator's usage model: organizations burn credits in wall-clock time, and the exact
moment each balance falls below its threshold is known (docs/simulator.md, "Usage model").

Each organization's burn is a timeline of constant-rate segments (active, burst, idle), drawn
lazily from random generators seeded by (seed, org id, segment number), so the same seed gives
the same timelines whatever is asked and when. Everything after the draw is integer
arithmetic: time in microseconds since the Unix epoch, balances in 1e-18 credits, rates in
1e-18 credits per microsecond. A balance at any time, and the first microsecond at which it is
below a threshold, are then computed exactly from the segments, with no ticking thread.

Not thread-safe: SimulatedApi calls it with its lock held.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

_UNITS_PER_CENT = 10**16
_UNITS_PER_CREDIT = 100 * _UNITS_PER_CENT
MAX_SCALE = 100_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_DAY = 86_400.0

# Distribution parameters, in model time (credits per model day; see docs/simulator.md).
_BASE_MEDIAN = 100.0  # most organizations: lognormal around 100 credits a day...
_BASE_SIGMA = 1.0  # ...80% of them between about 28 and 360 a day
_TAIL_SHARE = 0.05  # the heavy tail: 5% of organizations burn Pareto-distributed rates
_TAIL_MINIMUM = 1_000.0  # from 1,000 a day...
_TAIL_ALPHA = 1.1  # ...8% of those above 10,000 a day...
_TAIL_CAP = 100_000.0  # ...and none above 100,000
_ACTIVE_MEAN = 6 * 3600.0  # active periods: exponential, 6 h on average,
_ACTIVE_JITTER = 0.3  # at the base rate times a lognormal factor (sigma 0.3)
_BURST_CHANCE = 0.15  # after an active period: a burst,
_BURST_MEAN = 20 * 60.0  # exponential, 20 min on average,
_BURST_FACTOR = (5.0, 20.0)  # at 5 to 20 times the base rate
_IDLE_CHANCE = 0.05  # or idle days (rate 0),
_IDLE_DAYS = (1.0, 3.0)  # lasting 1 to 3 days
_FIRST_IDLE = 0.28  # the share of time idle in the long run, for the first segment
_MIN_SEGMENT = 60.0  # active periods and bursts last a minute to two days
_MAX_SEGMENT = 2 * _DAY


def micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch, exactly."""
    return (moment - _EPOCH) // _MICROSECOND


def moment_of(micros_since_epoch: int) -> datetime:
    return _EPOCH + micros_since_epoch * _MICROSECOND


def precise_timestamp(moment: datetime) -> str:
    """ISO 8601 UTC with microseconds even when they are zero."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Crossing:
    """A balance falling below its threshold: by usage (``cause`` "usage") or at once, by a
    balance set below it or a threshold raised above it ("change")."""

    org_id: int
    at: datetime
    threshold: Decimal
    notify_low_credits: bool | None  # None: the field is left out of the API's answers
    cause: str

    def to_json(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "at": precise_timestamp(self.at),
            "threshold": str(self.threshold),
            "notify_low_credits": self.notify_low_credits,
            "cause": self.cause,
        }


class _Burn:
    """One organization: its timeline drawn so far and the balance burning since its anchor."""

    __slots__ = (
        "org_id",
        "starts",  # segment start times (µs); starts[0] is the origin until trimmed
        "cums",  # units used on the timeline before each segment
        "rates",  # units per µs in each segment
        "horizon",  # end of the last segment drawn
        "horizon_cum",
        "drawn",  # segments drawn so far: the next one's generator is seeded with it
        "next_kind",
        "base",  # credits per model day, None until the first draw
        "anchor_at",  # the balance was anchor_units at anchor_at (µs)
        "anchor_cum",
        "anchor_units",
        "threshold",
        "threshold_units",
        "notify",
        "crossing",  # first µs below the threshold, once found
    )

    def __init__(self, org_id: int, origin: int) -> None:
        self.org_id = org_id
        self.starts = [origin]
        self.cums = [0]
        self.rates: list[int] = []
        self.horizon = origin
        self.horizon_cum = 0
        self.drawn = 0
        self.next_kind = "active"
        self.base: float | None = None
        self.anchor_at = origin
        self.anchor_cum = 0
        self.anchor_units = 0
        self.threshold = Decimal(0)
        self.threshold_units = 0
        self.notify: bool | None = None
        self.crossing: int | None = None


class UsageModel:
    """Every organization's burn, from ``start`` on; ``scale`` compresses time (1: a model day
    lasts a day; 1440: a minute)."""

    def __init__(self, seed: int, scale: float, start: datetime) -> None:
        if not 0 < scale <= MAX_SCALE:
            raise ValueError(f"usage scale must be > 0 and <= {MAX_SCALE}")
        self.seed = seed
        self.scale = scale
        self.start = start
        self._origin = micros(start)
        self._burns: dict[int, _Burn] = {}
        self._settled: list[Crossing] = []

    def track(
        self,
        org_id: int,
        at: int,
        threshold: Decimal,
        notify: bool | None,
        balance: Decimal | None = None,
    ) -> None:
        """Burn from ``balance`` (None: the model's balance at ``at``, in µs) against
        ``threshold`` from ``at`` on. A crossing under the previous settings up to ``at`` is
        kept, and so is the jump of a balance set below, or a threshold raised above, it."""
        burn = self._burns.get(org_id)
        if burn is None:
            burn = self._burns[org_id] = _Burn(org_id, self._origin)
            was_below = True  # a new organization has crossed nothing
            units = 0
        else:
            at = max(at, burn.anchor_at)  # a clock set back must not undo what was burnt
            self._settle(burn, at)
            units = self._units(burn, at)
            was_below = units < burn.threshold_units
        if balance is not None:
            units = _units_of(balance)
        burn.anchor_at = at
        burn.anchor_cum = self._cum(burn, at)
        burn.anchor_units = units
        burn.threshold, burn.threshold_units = threshold, _units_of(threshold)
        burn.notify = notify
        burn.crossing = None
        _trim(burn)
        if not was_below and units < burn.threshold_units:
            self._settled.append(Crossing(org_id, moment_of(at), threshold, notify, "change"))

    def forget(self, org_id: int, at: int) -> None:
        """Stop tracking an organization (removed); its crossings up to ``at`` are kept."""
        if (burn := self._burns.pop(org_id, None)) is not None:
            self._settle(burn, at)

    def cents(self, org_id: int, at: int) -> int:
        """The balance served at ``at`` (µs), in cents.

        Rounded down (ROUND_FLOOR): thresholds are whole cents, so the served balance is below
        a threshold exactly when the exact balance is. The crossing computed from the exact
        balance is then the first microsecond at which a client can read a balance below the
        threshold; rounding to nearest would show it below up to half a cent earlier.
        """
        return self._units(self._burns[org_id], at) // _UNITS_PER_CENT

    def crossings(self, until: int) -> list[Crossing]:
        """Every crossing at or before ``until`` (µs), oldest first."""
        found = [crossing for crossing in self._settled if micros(crossing.at) <= until]
        for burn in self._burns.values():
            at = self._crossing(burn, until)
            if at is not None and at <= until:
                found.append(_usage_crossing(burn, at))
        found.sort(key=lambda crossing: (crossing.at, crossing.org_id))
        return found

    # ---- internals ----------------------------------------------------------------------

    def _settle(self, burn: _Burn, at: int) -> None:
        crossed = self._crossing(burn, at)
        if crossed is not None and crossed <= at:
            self._settled.append(_usage_crossing(burn, crossed))

    def _units(self, burn: _Burn, at: int) -> int:
        used = self._cum(burn, max(at, burn.anchor_at)) - burn.anchor_cum
        # Usage stops when the credits run out; a balance already below zero stays put.
        return max(burn.anchor_units - used, min(burn.anchor_units, 0))

    def _cum(self, burn: _Burn, at: int) -> int:
        """Units used on the timeline before ``at``."""
        if at <= burn.starts[0]:
            return burn.cums[0]
        self._extend(burn, at)
        index = bisect_right(burn.starts, at) - 1
        return burn.cums[index] + burn.rates[index] * (at - burn.starts[index])

    def _crossing(self, burn: _Burn, until: int) -> int | None:
        """The first µs with the balance below the threshold, if the timeline drawn up to
        ``until`` reaches it; else None."""
        if burn.crossing is not None:
            return burn.crossing
        # Usage stops at zero, so a threshold at or below zero is never crossed.
        if burn.threshold_units <= 0 or burn.anchor_units < burn.threshold_units:
            return None
        # Below the threshold once cum(t) - anchor_cum > anchor_units - threshold_units.
        limit = burn.anchor_cum + burn.anchor_units - burn.threshold_units
        self._extend(burn, until)
        if burn.horizon_cum <= limit:
            return None
        index = bisect_right(burn.cums, limit) - 1  # the segment in which cum passes limit
        # Its rate is > 0 since cum grows in it; the first whole µs strictly past the limit.
        start, rate = burn.starts[index], burn.rates[index]
        burn.crossing = start + (limit - burn.cums[index]) // rate + 1
        return burn.crossing

    def _extend(self, burn: _Burn, until: int) -> None:
        """Draw segments until the timeline goes past ``until``."""
        while burn.horizon <= until:
            seconds, per_day = self._draw(burn)
            length = max(1, round(seconds * 1e6 / self.scale))
            rate = round(per_day * self.scale * _UNITS_PER_CREDIT / (_DAY * 1e6))
            if burn.drawn:
                burn.starts.append(burn.horizon)
                burn.cums.append(burn.horizon_cum)
            burn.rates.append(rate)
            burn.horizon += length
            burn.horizon_cum += rate * length
            burn.drawn += 1

    def _draw(self, burn: _Burn) -> tuple[float, float]:
        """The next segment in model time: (seconds, credits per day)."""
        if burn.base is None:
            rng = random.Random(f"usage/{self.seed}/{burn.org_id}")
            if rng.random() < _TAIL_SHARE:
                burn.base = min(_TAIL_CAP, _TAIL_MINIMUM * rng.paretovariate(_TAIL_ALPHA))
            else:
                burn.base = rng.lognormvariate(math.log(_BASE_MEDIAN), _BASE_SIGMA)
            burn.next_kind = "idle" if rng.random() < _FIRST_IDLE else "active"
        rng = random.Random(f"usage/{self.seed}/{burn.org_id}/{burn.drawn}")
        kind, burn.next_kind = burn.next_kind, "active"
        if kind == "idle":
            seconds, per_day = rng.uniform(*_IDLE_DAYS) * _DAY, 0.0
        elif kind == "burst":
            seconds = _clamp(rng.expovariate(1 / _BURST_MEAN))
            per_day = burn.base * rng.uniform(*_BURST_FACTOR)
        else:
            seconds = _clamp(rng.expovariate(1 / _ACTIVE_MEAN))
            per_day = burn.base * rng.lognormvariate(0.0, _ACTIVE_JITTER)
            roll = rng.random()
            if roll < _BURST_CHANCE:
                burn.next_kind = "burst"
            elif roll < _BURST_CHANCE + _IDLE_CHANCE:
                burn.next_kind = "idle"
        if burn.drawn == 0:
            seconds *= rng.random()  # organizations start at random points of a segment
        return seconds, per_day


def _units_of(amount: Decimal) -> int:
    return int(amount * 100) * _UNITS_PER_CENT


def _usage_crossing(burn: _Burn, at: int) -> Crossing:
    return Crossing(burn.org_id, moment_of(at), burn.threshold, burn.notify, "usage")


def _trim(burn: _Burn) -> None:
    # Segments wholly before the anchor are never read again.
    index = bisect_right(burn.starts, burn.anchor_at) - 1
    if 0 < index < len(burn.rates):
        del burn.starts[:index], burn.cums[:index], burn.rates[:index]


def _clamp(seconds: float) -> float:
    return min(max(seconds, _MIN_SEGMENT), _MAX_SEGMENT)

"""When each organization must next be read, on the adaptive schedule. Pure: no I/O, no clock.

An armed organization that can alert is read again after

    clamp(headroom / (burn_safety × peak_burn), min_read_interval, max_read_interval)

seconds: the time its fastest burn so far would take to use up a ``burn_safety``-th of the
credits left above its threshold. Burning no faster than that, it is still above its threshold
at the next read, with two thirds of the headroom left (at the default safety of 3): the reads
come closer as it nears the threshold, down to ``min_read_interval``, which then bounds the
delay of the alert. One 50 credits above its threshold that burns 100 an hour is next read in
10 min; one 48,000 above that burns 200 a day, in an hour. The other cases follow rules of
their own (``next_read``); docs/operations.md explains them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from poller.config.settings import Settings
from poller.engine.model import BurnRecord, Organization

# Fewer burn observations than this and an org's own peak is not trusted alone: a new org,
# or one just read twice, has not shown how fast it can burn. The fleet's floor stands in.
MIN_BURN_SAMPLES = 3
# Credits per second assumed of every org at the least (1 a day): never divide by zero, and
# an org that has never burned still gets read at max_read_interval.
LEAST_BURN = 1 / 86400
HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class ReadTiming:
    """The settings the schedule reads."""

    min_interval: float
    max_interval: float
    safety: float
    # The fixed schedule's ``interval`` within min..max: how often an alerted org is read (a
    # top-up re-arms it as soon as today), and the longest wait of an org with little history.
    fixed_interval: float

    @classmethod
    def of(cls, settings: Settings) -> ReadTiming:
        return cls(
            min_interval=settings.min_read_interval,
            max_interval=settings.max_read_interval,
            safety=settings.burn_safety,
            fixed_interval=_clamp(
                settings.interval, settings.min_read_interval, settings.max_read_interval
            ),
        )


@dataclass(frozen=True, slots=True)
class NextRead:
    delay: float  # seconds from the read
    reason: str  # one line for `poller status`


def observe(record: BurnRecord, balance: Decimal, at: datetime) -> BurnRecord:
    """The record after a read of ``balance`` at ``at``. A rise (a top-up) is no burn; a read
    no later than the last one (clocks of two replicas) only moves the balance."""
    if record.read_at is None or record.balance is None:
        return BurnRecord(at, balance, record.peak, record.samples)
    seconds = (at - record.read_at).total_seconds()
    if seconds <= 0:
        return BurnRecord(record.read_at, balance, record.peak, record.samples)
    rate = float(record.balance - balance) / seconds
    return BurnRecord(at, balance, max(record.peak, rate), record.samples + 1)


def planning_burn(record: BurnRecord, fleet_burn: float | None) -> float:
    """The burn the schedule plans with: the org's peak, raised to the fleet's floor while
    the org has little history, never below LEAST_BURN."""
    burn = max(record.peak, LEAST_BURN)
    if record.samples < MIN_BURN_SAMPLES and fleet_burn is not None:
        burn = max(burn, fleet_burn)
    return burn


def risk_delay(headroom: float, burn: float, timing: ReadTiming) -> float:
    """Seconds until the next read of an armed org that can alert (the module's formula)."""
    if headroom <= 0:
        return timing.min_interval
    return _clamp(headroom / (timing.safety * burn), timing.min_interval, timing.max_interval)


def next_read(
    *,
    alerted: bool,
    enabled: bool,
    headroom: Decimal,
    record: BurnRecord,
    fleet_burn: float | None,
    timing: ReadTiming,
) -> NextRead:
    """When to read an org again after a successful read, and why, for people.

    ``headroom``: balance minus threshold. Alerted: every ``fixed_interval`` for the top-up
    that re-arms it (reminders ride on these reads). Alerts off: ``max_read_interval``; the
    listing makes it due at once when they are turned on. Fewer than MIN_BURN_SAMPLES
    intervals seen: at most ``fixed_interval`` (the fixed schedule's), so a cold start is
    not blind for ``max_read_interval``.
    """
    if alerted:
        return NextRead(
            timing.fixed_interval,
            f"alerted: read every {duration(timing.fixed_interval)} to see a top-up",
        )
    if not enabled:
        return NextRead(
            timing.max_interval,
            f"alerts off: read every {duration(timing.max_interval)} (at once when turned on)",
        )
    burn = planning_burn(record, fleet_burn)
    delay = risk_delay(float(headroom), burn, timing)
    if headroom <= 0:
        return NextRead(delay, f"at or below threshold: read every {duration(delay)}")
    if record.samples < MIN_BURN_SAMPLES and delay > timing.fixed_interval:
        # Too little history to plan with (a cold start has no fleet burn either): read as
        # often as the fixed schedule until the org has shown how fast it burns.
        return NextRead(
            timing.fixed_interval,
            f"new: read every {duration(timing.fixed_interval)} until its burn is known "
            f"({record.samples} of {MIN_BURN_SAMPLES} reads apart)",
        )
    raw = float(headroom) / (timing.safety * burn)
    source = "peak burn" if burn == record.peak else "fleet burn" if burn != LEAST_BURN else "burn"
    why = (
        f"headroom {_amount(headroom)} at {source} {_amount(burn * HOUR)}/h "
        f"×{timing.safety:g} → {duration(raw)}"
    )
    if raw > timing.max_interval:
        why += f", capped at {duration(timing.max_interval)}"
    elif raw < timing.min_interval:
        why += f", raised to {duration(timing.min_interval)}"
    return NextRead(delay, why)


def read_failed(timing: ReadTiming) -> NextRead:
    """An org whose read failed is tried again at the soonest allowed."""
    return NextRead(timing.min_interval, "the last read failed: retry")


def settings_fingerprint(org: Organization) -> str:
    """The listed settings whose change makes an org due at once (alerts on, threshold)."""
    return f"{int(org.notify_low_credits)}:{org.low_credits_threshold.normalize():f}"


def duration(seconds: float) -> str:
    """``17 h``, ``45 min``, ``1.5 d``, ``30 s``: a delay for people."""
    unit, value = "s", seconds
    for name, size in (("d", 86400.0), ("h", HOUR), ("min", 60.0)):
        if seconds >= size:
            unit, value = name, seconds / size
            break
    return f"{value:.0f} {unit}" if value >= 10 or value == round(value) else f"{value:.1f} {unit}"


def _amount(value: Decimal | float) -> str:
    number = float(value)
    return f"{number:,.0f}" if abs(number) >= 10 else f"{number:,.2g}"


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)

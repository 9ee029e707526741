"""The adaptive schedule's rule (poller.engine.schedule): its bounds and monotony for any input,
and the reasons people read in `poller status`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poller.config.settings import Settings
from poller.engine.model import NO_READS, BurnRecord
from poller.engine.schedule import (
    LEAST_BURN,
    MIN_BURN_SAMPLES,
    ReadTiming,
    duration,
    next_read,
    observe,
    planning_burn,
    read_failed,
    risk_delay,
)

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
TIMING = ReadTiming(min_interval=30, max_interval=3600, safety=3, fixed_interval=300)

headrooms = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)
burns = st.floats(min_value=LEAST_BURN, max_value=1e9, allow_nan=False)
timings = st.builds(
    # As ReadTiming.of builds it: the fixed interval within min..max.
    lambda low, span, safety, share: ReadTiming(low, low + span, safety, low + share * span),
    st.floats(min_value=1, max_value=86400),
    st.floats(min_value=0, max_value=7 * 86400),
    st.floats(min_value=1, max_value=1000),
    st.floats(min_value=0, max_value=1),
)


@given(headrooms, burns, timings)
def test_a_read_is_never_sooner_than_the_minimum_nor_later_than_the_maximum(
    headroom: float, burn: float, timing: ReadTiming
) -> None:
    delay = risk_delay(headroom, burn, timing)
    assert timing.min_interval <= delay <= timing.max_interval


@given(headrooms, headrooms, burns, timings)
def test_more_headroom_never_means_an_earlier_read(
    a: float, b: float, burn: float, timing: ReadTiming
) -> None:
    low, high = sorted((a, b))
    assert risk_delay(low, burn, timing) <= risk_delay(high, burn, timing)


@given(headrooms, burns, burns, timings)
def test_a_faster_burn_never_means_a_later_read(
    headroom: float, a: float, b: float, timing: ReadTiming
) -> None:
    slow, fast = sorted((a, b))
    assert risk_delay(headroom, fast, timing) <= risk_delay(headroom, slow, timing)


@given(
    st.decimals(min_value=-(10**9), max_value=10**9, places=2),
    st.booleans(),
    st.booleans(),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.integers(min_value=0, max_value=100),
    st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False),
    timings,
)
def test_every_case_of_next_read_stays_within_the_bounds(
    headroom: Decimal,
    alerted: bool,
    enabled: bool,
    peak: float,
    samples: int,
    fleet: float | None,
    timing: ReadTiming,
) -> None:
    record = BurnRecord(T0, Decimal(100), peak, samples)
    when = next_read(
        alerted=alerted,
        enabled=enabled,
        headroom=headroom,
        record=record,
        fleet_burn=fleet,
        timing=timing,
    )
    assert timing.min_interval <= when.delay <= timing.max_interval
    if samples < MIN_BURN_SAMPLES:
        assert when.delay <= timing.fixed_interval or not enabled
    assert when.reason and "\n" not in when.reason


def test_the_issue_examples() -> None:
    # 50 credits above its threshold, burning 100 an hour: a third of its 30 minutes left.
    near = BurnRecord(T0, Decimal(1050), 100 / 3600, MIN_BURN_SAMPLES)
    when = next_read(
        alerted=False,
        enabled=True,
        headroom=Decimal(50),
        record=near,
        fleet_burn=None,
        timing=TIMING,
    )
    assert when.delay == 600
    assert when.reason == "headroom 50 at peak burn 100/h ×3 → 10 min"
    # 1 credit above: the minimum.
    when = next_read(
        alerted=False,
        enabled=True,
        headroom=Decimal(1),
        record=near,
        fleet_burn=None,
        timing=TIMING,
    )
    assert when.delay == 30
    assert when.reason == "headroom 1 at peak burn 100/h ×3 → 12 s, raised to 30 s"
    # 48,000 above at a peak of 900 an hour: 17.8 hours, capped at the maximum.
    far = BurnRecord(T0, Decimal(49000), 900 / 3600, 10)
    when = next_read(
        alerted=False,
        enabled=True,
        headroom=Decimal(48000),
        record=far,
        fleet_burn=None,
        timing=TIMING,
    )
    assert when.delay == 3600
    assert when.reason == "headroom 48,000 at peak burn 900/h ×3 → 18 h, capped at 1 h"


def test_little_history_plans_with_the_fleets_burn() -> None:
    young = BurnRecord(T0, Decimal(2000), 1 / 3600, MIN_BURN_SAMPLES - 1)
    assert planning_burn(young, fleet_burn=1.0) == 1.0
    seasoned = BurnRecord(T0, Decimal(2000), 1 / 3600, MIN_BURN_SAMPLES)
    assert planning_burn(seasoned, fleet_burn=1.0) == 1 / 3600
    assert planning_burn(NO_READS, fleet_burn=None) == LEAST_BURN
    when = next_read(
        alerted=False,
        enabled=True,
        headroom=Decimal(600),
        record=young,
        fleet_burn=1.0,
        timing=TIMING,
    )
    assert when.delay == pytest.approx(600 / 3)
    assert "fleet burn 3,600/h" in when.reason


def test_little_history_and_no_fleet_burn_reads_as_often_as_the_fixed_schedule() -> None:
    # A cold start: nobody has a burn yet. Waiting max_read_interval would be blind that long.
    young = BurnRecord(T0, Decimal(50000), 0.0, 1)
    when = next_read(
        alerted=False,
        enabled=True,
        headroom=Decimal(49000),
        record=young,
        fleet_burn=None,
        timing=TIMING,
    )
    assert when.delay == 300
    assert when.reason == "new: read every 5 min until its burn is known (1 of 3 reads apart)"


def test_alerted_disabled_and_failed_orgs_follow_their_own_rules() -> None:
    common = {"headroom": Decimal(10), "record": NO_READS, "fleet_burn": None, "timing": TIMING}
    alerted = next_read(alerted=True, enabled=True, **common)  # type: ignore[arg-type]
    assert (alerted.delay, alerted.reason) == (300, "alerted: read every 5 min to see a top-up")
    off = next_read(alerted=False, enabled=False, **common)  # type: ignore[arg-type]
    assert off.delay == 3600 and off.reason.startswith("alerts off")
    assert read_failed(TIMING).delay == 30


def test_the_fixed_interval_is_the_fixed_interval_within_the_bounds() -> None:
    assert ReadTiming.of(Settings(interval=300)).fixed_interval == 300
    assert ReadTiming.of(Settings(interval=5)).fixed_interval == 30
    assert ReadTiming.of(Settings(interval=7200)).fixed_interval == 3600


def test_the_peak_is_the_fastest_fall_between_two_reads() -> None:
    record = observe(NO_READS, Decimal(1000), T0)
    assert record == BurnRecord(T0, Decimal(1000), 0.0, 0)
    record = observe(record, Decimal(900), T0 + timedelta(seconds=100))  # 1 credit/s
    assert (record.peak, record.samples) == (1.0, 1)
    record = observe(record, Decimal(880), T0 + timedelta(seconds=200))  # slower
    assert (record.peak, record.samples) == (1.0, 2)
    record = observe(record, Decimal(5000), T0 + timedelta(seconds=300))  # a top-up
    assert (record.peak, record.samples, record.balance) == (1.0, 3, Decimal(5000))
    # Another replica's clock behind ours: the balance moves, no rate from a negative span.
    assert observe(record, Decimal(4000), T0).peak == 1.0


@given(
    st.lists(
        st.tuples(st.integers(min_value=1, max_value=10**6), st.integers(-(10**6), 10**6)),
        max_size=20,
    )
)
def test_the_peak_never_falls_and_counts_every_interval(steps: list[tuple[int, int]]) -> None:
    record = observe(NO_READS, Decimal(0), T0)
    at, balance = T0, Decimal(0)
    for seconds, change in steps:
        at, balance = at + timedelta(seconds=seconds), balance + change
        after = observe(record, balance, at)
        assert after.peak >= record.peak
        assert after.peak >= float(-change) / seconds - 1e-9
        record = after
    assert record.samples == len(steps)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5, "5 s"), (30, "30 s"), (90, "1.5 min"), (600, "10 min"), (3600, "1 h"), (64000, "18 h")],
)
def test_durations_read_naturally(seconds: float, text: str) -> None:
    assert duration(seconds) == text

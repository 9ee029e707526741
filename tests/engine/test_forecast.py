"""Burn rate, runway and threshold advice: tables over synthetic histories, and properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.engine.forecast import (
    HORIZON_DAYS,
    Point,
    forecast,
    needs_advice,
    suggest_threshold,
    window,
)
from poller.engine.notices import forecast_fields
from poller.mail import AlertContent, forecast_line

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def series(*steps: tuple[float, str]) -> list[Point]:
    """(hours after T0, balance) pairs."""
    return [Point(T0 + timedelta(hours=hours), Decimal(balance)) for hours, balance in steps]


def steady(hours: int, start: int, per_hour: int, every: int = 1) -> list[Point]:
    return [
        Point(T0 + timedelta(hours=h), Decimal(start - per_hour * h))
        for h in range(0, hours + 1, every)
    ]


@pytest.mark.parametrize(
    ("points", "rate_24h", "rate_7d"),
    [
        # 100 credits an hour for two days: 2,400 a day over both windows.
        (steady(48, 10_000, 100), Decimal(2400), Decimal(2400)),
        # Irregular polling gaps change nothing about a steady burn.
        (
            series((0, "1000"), (0.5, "950"), (7, "300"), (7.25, "275"), (10, "0")),
            Decimal(2400),
            Decimal(2400),
        ),
        # A top-up is not negative usage; what was used in the half hour around it is
        # unknown and counts as nothing: 950 credits in 10 hours.
        (
            series((0, "1000"), (5, "500"), (5.5, "5450"), (10, "5000")),
            Decimal(2280),
            Decimal(2280),
        ),
        # A refund (small increase) is excluded the same way.
        (series((0, "1000"), (4, "600"), (6, "425"), (8, "200")), Decimal(2400), Decimal(2400)),
        # Balances below zero keep burning: usage is the fall, wherever it happens.
        (series((0, "100"), (3, "-200"), (6, "-500"), (9, "-800")), Decimal(2400), Decimal(2400)),
        # Only the last day counts for the 24-hour rate; the balance at its start carries over.
        (
            series((0, "10000"), (24, "7600"), (40, "7600"), (48, "7400")),
            Decimal(200),
            Decimal(1300),
        ),
    ],
)
def test_burn_rates_over_a_day_and_a_week(points, rate_24h, rate_7d) -> None:
    prediction = forecast(points)
    assert prediction.day.rate == rate_24h
    assert prediction.week.rate == rate_7d


@pytest.mark.parametrize(
    ("points", "why"),
    [
        (series((0, "1000")), "one point"),
        (series((0, "1000"), (8, "500")), "two points"),
        (series((0, "1000"), (2, "900"), (5.9, "800")), "less than six hours"),
        (series((0, "1000"), (4, "1000"), (8, "1000")), "no usage"),
        (series((0, "1000"), (4, "2000"), (8, "3000")), "only top-ups"),
    ],
)
def test_there_is_no_estimate_without_enough_history(points, why) -> None:
    prediction = forecast(points)
    assert prediction.rate is None, why
    assert prediction.runway_days is None and prediction.runs_out_at is None


def test_the_runway_is_the_balance_over_the_recent_rate() -> None:
    prediction = forecast(steady(24, 10_000, 100))  # 7,600 left at 2,400 a day
    assert prediction.runway_days == Decimal(7600) / Decimal(2400)
    assert prediction.runs_out_at == T0 + timedelta(hours=24 + 76)


def test_a_balance_at_or_below_zero_has_run_out_already() -> None:
    prediction = forecast(series((0, "100"), (4, "-50"), (8, "-200")))
    assert prediction.runway_days == 0
    assert prediction.runs_out_at == prediction.as_of


def test_the_runway_falls_back_to_the_week_when_the_last_day_says_too_little() -> None:
    # Busy two days ago, then one point in the last day: the day alone is not meaningful.
    points = series((0, "10000"), (6, "9400"), (12, "8800"), (48, "8790"))
    prediction = forecast(points)
    assert prediction.day.rate is None  # the balance at its start and one point
    assert prediction.rate == prediction.week.rate == Decimal(605)


def test_a_window_counts_top_ups_separately() -> None:
    w = window(
        series((0, "1000"), (1, "900"), (2, "3900"), (3, "3800"), (4, "3850")), timedelta(days=1)
    )
    assert (w.used, w.topped_up, w.topups, w.points) == (Decimal(200), Decimal(3050), 2, 5)


@pytest.mark.parametrize(
    ("rate", "days", "suggested"),
    [
        (Decimal("781.87"), Decimal(3), Decimal("2400.00")),  # 2,345.61 rounded up
        (Decimal("2.4366"), Decimal(3), Decimal("7.40")),
        (Decimal("1000"), Decimal(3), Decimal("3000.00")),
        (Decimal("0.001"), Decimal(3), Decimal("0.01")),
        (Decimal("1E9"), Decimal(3), Decimal("99999999.00")),  # the API's maximum
    ],
)
def test_a_suggested_threshold_is_rounded_up_to_two_significant_digits(
    rate, days, suggested
) -> None:
    assert suggest_threshold(rate, days) == suggested


def test_a_threshold_needs_advice_only_when_it_covers_less_than_the_days() -> None:
    assert needs_advice(Decimal(1000), Decimal(500), Decimal(3))
    assert not needs_advice(Decimal(1500), Decimal(500), Decimal(3))
    assert not needs_advice(Decimal(10), None, Decimal(3))


amounts = st.decimals(min_value=-10_000, max_value=10_000, places=2)
gaps = st.integers(min_value=60, max_value=6 * 3600)


@st.composite
def histories(draw) -> list[Point]:
    balances = draw(st.lists(amounts, min_size=1, max_size=40))
    moment = T0
    points = []
    for balance in balances:
        moment += timedelta(seconds=draw(gaps))
        points.append(Point(moment, balance))
    return points


@given(histories())
def test_usage_minus_top_ups_is_the_net_fall_of_the_balance(points) -> None:
    w = window(points, timedelta(days=365))
    assert w.used - w.topped_up == points[0].balance - points[-1].balance
    assert w.used >= 0 and w.topped_up >= 0


@given(
    histories(),
    st.decimals(min_value="0.01", max_value=100_000, places=2),
    st.integers(min_value=0, max_value=39),
)
def test_a_top_up_never_raises_the_burn_rate(points, amount, where) -> None:
    where = min(where, len(points) - 1)
    topped = points[:where] + [Point(p.at, p.balance + amount) for p in points[where:]]
    before, after = forecast(points), forecast(topped)
    assert after.day.used <= before.day.used
    assert after.week.used <= before.week.used


@given(histories())
def test_an_estimate_is_positive_and_agrees_with_its_runway(points) -> None:
    prediction = forecast(points)
    if prediction.rate is None:
        return
    assert prediction.rate > 0
    assert prediction.runway_days is not None
    assert prediction.beyond_horizon or prediction.runs_out_at is not None
    if prediction.balance > 0:
        assert abs(prediction.runway_days * prediction.rate - prediction.balance) < Decimal("1e-6")


@given(
    st.decimals(min_value="0.01", max_value=10_000_000, places=4),
    st.decimals(min_value="0.5", max_value=30, places=1),
)
def test_a_suggestion_always_covers_the_days_and_is_a_valid_api_amount(rate, days) -> None:
    suggested = suggest_threshold(rate, days)
    assert suggested >= min(rate * days, Decimal("99999999"))
    assert suggested == suggested.quantize(Decimal("0.01"))
    assert suggested <= Decimal("99999999")


# Near-idle and huge balances alike: amounts up to the 10**18 parsing allows, with fractions
# of a cent, polled for seconds or days, as of any time up to the year 9000.
any_amounts = st.decimals(min_value=-(10**17), max_value=10**17, places=6)


@st.composite
def any_histories(draw) -> list[Point]:
    moment = draw(
        st.datetimes(
            min_value=datetime(2000, 1, 1), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
        )
    )
    points = []
    for balance in draw(st.lists(any_amounts, min_size=1, max_size=12)):
        moment += timedelta(seconds=draw(st.integers(min_value=1, max_value=3 * 86400)))
        points.append(Point(moment, balance))
    return points


@settings(max_examples=300)
@given(any_histories())
def test_any_history_runs_out_within_the_horizon_beyond_it_or_not_at_all(points) -> None:
    prediction = forecast(points)
    runs_out_at = prediction.runs_out_at  # never an OverflowError
    if prediction.rate is None:
        assert runs_out_at is None and not prediction.beyond_horizon
    elif prediction.beyond_horizon:
        assert runs_out_at is None and prediction.runway_days > HORIZON_DAYS
    else:
        assert runs_out_at is not None
        assert prediction.as_of <= runs_out_at <= prediction.as_of + timedelta(days=3653)
    # The email's sentence about it renders too, whatever the estimate.
    content = AlertContent(
        org_id=1,
        org_name="Org",
        breach_number=1,
        balance=prediction.balance,
        threshold=Decimal(1000),
        detected_at=prediction.as_of,
        billing_url="https://x.example/b",
        auto_refill=False,
        **forecast_fields(prediction),
    )
    line = forecast_line(content)
    if prediction.beyond_horizon and prediction.balance > 0:
        assert line is not None and line.endswith("your credits will last more than 10 years.")

"""The simulator's usage model in process: reproducible burns, crossings exact to the
microsecond for what a client can read, and restarts when a balance or threshold is set. Its
HTTP endpoints are tested with the others in test_simulator.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.devtools.simulator import MAX_SCALE, Crossing, SimulatedApi
from tests.fixtures.api import FixedClock

MICROSECOND = timedelta(microseconds=1)


def fleet(clock: FixedClock, usage_seed: int = 7, scale: float = 20_000) -> SimulatedApi:
    api = SimulatedApi.generate(200, seed=3, clock=clock)
    api.enable_usage(seed=usage_seed, scale=scale)
    return api


def one_org(
    clock: FixedClock, balance: str, threshold: str, *, seed: int = 1, scale: float = 10_000
) -> tuple[SimulatedApi, int]:
    api = SimulatedApi(clock=clock)
    org_id = api.add_org("Burner", credits_remaining=balance, low_credits_threshold=threshold)
    api.enable_usage(seed=seed, scale=scale)
    return api, org_id


def served(api: SimulatedApi, org_id: int) -> Decimal:
    return Decimal(api.billing(org_id)["credits_remaining"])


def crossings_of(api: SimulatedApi, org_id: int) -> list[Crossing]:
    return [crossing for crossing in api.crossings() if crossing.org_id == org_id]


def test_the_same_seed_gives_the_same_crossings_however_often_it_is_asked() -> None:
    often, once = FixedClock(), FixedClock()
    frequent, rare = fleet(often), fleet(once)
    for _ in range(60):
        often.advance(1)
        frequent.crossings()
        frequent.billing(frequent.org_ids()[0])
    once.advance(60)
    got = [crossing.to_json() for crossing in rare.crossings()]
    assert got == [crossing.to_json() for crossing in frequent.crossings()]
    assert len(got) > 10
    assert got != [crossing.to_json() for crossing in fleet(FixedClock(), 8).crossings()]


def test_crossings_are_sorted_and_each_org_crosses_once_without_changes() -> None:
    clock = FixedClock()
    api = fleet(clock)
    clock.advance(300)
    crossings = api.crossings()
    assert [crossing.at for crossing in crossings] == sorted(crossing.at for crossing in crossings)
    assert len({crossing.org_id for crossing in crossings}) == len(crossings)
    assert {crossing.cause for crossing in crossings} == {"usage"}
    for crossing in crossings[:20]:
        threshold = Decimal(api.organization(crossing.org_id).get("low_credits_threshold", 1000))
        assert crossing.threshold == threshold
        clock.now = crossing.at
        assert served(api, crossing.org_id) < threshold


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    org_id=st.integers(1, 10**6),
    scale=st.floats(10, MAX_SCALE),
    threshold_cents=st.integers(1, 10**7),
    headroom_cents=st.integers(0, 10**7),
    samples=st.lists(st.floats(0, 1), max_size=30),
)
def test_the_crossing_is_the_first_microsecond_a_client_reads_below_the_threshold(
    seed: int,
    org_id: int,
    scale: float,
    threshold_cents: int,
    headroom_cents: int,
    samples: list[float],
) -> None:
    clock = FixedClock()
    start = clock.now
    api = SimulatedApi(clock=clock)
    threshold = Decimal(threshold_cents).scaleb(-2)
    balance = threshold + Decimal(headroom_cents).scaleb(-2)
    api.add_org("Org", org_id=org_id, credits_remaining=balance, low_credits_threshold=threshold)
    api.enable_usage(seed=seed, scale=scale)
    end = start + timedelta(days=60) / scale  # 60 model days
    clock.now = end
    crossings = api.crossings()
    if crossings:
        (crossing,) = crossings
        assert (crossing.org_id, crossing.threshold, crossing.cause) == (org_id, threshold, "usage")
        assert start < crossing.at <= end
        clock.now = crossing.at - MICROSECOND
        assert served(api, org_id) >= threshold
        clock.now = crossing.at
        assert served(api, org_id) < threshold
    else:
        assert served(api, org_id) >= threshold
    # Never more credits later, and what is used is what was burnt.
    previous = balance
    for fraction in sorted(samples):
        clock.now = start + (end - start) * fraction
        billing = api.billing(org_id)
        now = Decimal(billing["credits_remaining"])
        assert Decimal(0) <= now <= previous
        assert Decimal(billing["credits_used"]) == balance - now
        previous = now


def test_a_balance_set_restarts_the_burn_from_it() -> None:
    clock = FixedClock()
    api, org_id = one_org(clock, "5000.00", "1000.00")
    clock.advance(3600)
    (first,) = crossings_of(api, org_id)
    clock.now = first.at + timedelta(seconds=60)
    api.set_balance(org_id, "3000.00")
    assert served(api, org_id) == Decimal("3000.00")
    clock.advance(3600)
    old, new = crossings_of(api, org_id)
    assert old == first  # kept, though nobody read the balance in between
    assert new.at > first.at + timedelta(seconds=60)
    clock.now = new.at - MICROSECOND
    assert served(api, org_id) >= Decimal("1000.00")


def test_a_crossing_not_yet_read_is_judged_by_the_settings_in_force_when_it_happened() -> None:
    clock = FixedClock()
    api, org_id = one_org(clock, "5000.00", "1000.00")
    clock.advance(3600)
    (crossing,) = crossings_of(api, org_id)
    clock.now = crossing.at + timedelta(seconds=1)
    api.update_org(org_id, notify_low_credits=False, low_credits_threshold="100.00")
    assert crossings_of(api, org_id) == [crossing]
    assert (crossing.threshold, crossing.notify_low_credits) == (Decimal("1000.00"), True)
    clock.advance(3600)
    later = crossings_of(api, org_id)[1]
    assert (later.threshold, later.notify_low_credits) == (Decimal("100.00"), False)


def test_a_jump_below_the_threshold_is_a_crossing_at_that_moment() -> None:
    clock = FixedClock()
    api, org_id = one_org(clock, "5000.00", "1000.00", scale=1)
    clock.advance(10)
    api.set_balance(org_id, "999.99")
    clock.advance(10)
    api.set_balance(org_id, "2000.00")
    api.patch(org_id, {"low_credits_threshold": "2500.00"})
    jumps = crossings_of(api, org_id)
    assert [(c.cause, c.threshold) for c in jumps] == [
        ("change", Decimal("1000.00")),
        ("change", Decimal("2500.00")),
    ]
    assert jumps[0].at == jumps[1].at - timedelta(seconds=10)


def test_with_the_model_off_balances_stand_still_and_nothing_crosses() -> None:
    clock = FixedClock()
    api = SimulatedApi.generate(20, seed=3, clock=clock)
    before = {org_id: api.billing(org_id) for org_id in api.org_ids()}
    clock.advance(86400 * 365)
    assert {org_id: api.billing(org_id) for org_id in api.org_ids()} == before
    assert api.crossings() == []


def test_turning_the_model_off_freezes_balances_and_keeps_the_crossings() -> None:
    clock = FixedClock()
    api = fleet(clock)
    clock.advance(120)
    crossings = api.crossings()
    api.disable_usage()
    frozen = {org_id: api.balance(org_id) for org_id in api.org_ids()}
    clock.advance(3600)
    assert {org_id: api.balance(org_id) for org_id in api.org_ids()} == frozen
    assert api.crossings() == crossings and api.usage() is None
    api.enable_usage(seed=7, scale=20_000)
    assert api.crossings() == []
    assert {org_id: api.balance(org_id) for org_id in api.org_ids()} == frozen


def test_a_removed_org_keeps_its_crossing_and_an_added_one_burns_from_when_it_was_added() -> None:
    clock = FixedClock()
    api, org_id = one_org(clock, "1000.00", "1000.00")
    clock.advance(3600)
    (crossing,) = crossings_of(api, org_id)
    api.remove_org(org_id)
    assert api.crossings() == [crossing]
    added = api.add_org("Late", credits_remaining="50.00", low_credits_threshold="10.00")
    assert served(api, added) == Decimal("50.00")
    clock.advance(86400)
    assert served(api, added) < Decimal("50.00")


def test_a_start_in_the_future_holds_the_burn_until_then() -> None:
    clock = FixedClock()
    api = SimulatedApi(clock=clock)
    org_id = api.add_org("Org", credits_remaining="5000.00")
    api.enable_usage(seed=1, scale=1000, start=clock.now + timedelta(seconds=30))
    clock.advance(30)
    assert served(api, org_id) == Decimal("5000.00")
    clock.advance(3600)
    assert served(api, org_id) < Decimal("5000.00")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seed": "1", "scale": 1}, "usage seed must be an integer"),
        ({"seed": 1, "scale": True}, "usage scale must be a number"),
        ({"seed": 1, "scale": 0}, "usage scale must be > 0"),
        ({"seed": 1, "scale": MAX_SCALE * 2}, "usage scale must be > 0"),
        ({"seed": 1, "scale": float("nan")}, "usage scale must be > 0"),
        ({"seed": 1, "scale": 1000, "start": "past"}, "usage start must be at most 30 model"),
    ],
)
def test_bad_usage_settings_are_refused_with_one_line(
    options: dict[str, object], message: str
) -> None:
    clock = FixedClock()
    api = SimulatedApi(clock=clock)
    if options.get("start") == "past":
        options = {**options, "start": clock.now - timedelta(days=31) / 1000}
    with pytest.raises(ValueError, match=message):
        api.enable_usage(**options)  # type: ignore[arg-type]
    assert api.usage() is None


def test_reads_and_changes_from_many_threads_keep_every_balance_consistent() -> None:
    api = SimulatedApi.generate(50, seed=3)  # the real clock
    api.enable_usage(seed=1, scale=MAX_SCALE)
    org_ids = api.org_ids()

    def work(worker: int) -> None:
        for step in range(300):
            org_id = org_ids[(worker * 7 + step) % len(org_ids)]
            if step % 50 == 0:
                api.set_balance(org_id, "1500.00")
            billing = api.billing(org_id)
            assert Decimal(billing["credits_remaining"]) >= 0
            if step % 100 == 0:
                api.crossings()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    crossings = api.crossings()
    assert [crossing.at for crossing in crossings] == sorted(crossing.at for crossing in crossings)

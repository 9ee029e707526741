"""The adaptive schedule's work queue against real SQLite files and real PostgreSQL databases."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, text, update

from poller.engine.model import (
    NO_READS,
    AlertState,
    BurnRecord,
    CycleWrites,
    ListingSync,
    Member,
    NoticeChange,
    NoticeState,
    ObservedOrg,
    Organization,
    QueueStats,
    Reschedule,
    StateChange,
    StoredState,
)
from poller.store import (
    NEW_ORGANIZATION,
    SETTINGS_CHANGED,
    DatabaseError,
    Store,
    open_database,
)
from poller.store.queue import organization_from_dict, organization_to_dict
from poller.store.schema import read_schedule

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
Result = TypeVar("Result")


def org(
    org_id: int, *, name: str | None = None, threshold: str = "100", **fields: object
) -> Organization:
    values: dict[str, object] = {
        "id": org_id,
        "name": name or f"Org {org_id}",
        "notify_low_credits": True,
        "low_credits_threshold": Decimal(threshold),
        "send_emails_enabled": True,
        "auto_refill": False,
        "members": (
            Member(10 * org_id, 20 * org_id, "Ann", f"ann{org_id}@x.example", "admin", None),
        ),
    }
    return Organization(**(values | fields))


def listed(store: Store, *org_ids: int, now: datetime = NOW) -> ListingSync:
    return store.sync_listing([org(org_id) for org_id in org_ids], now, complete=True)


def set_due(store: Store, org_id: int, due_at: datetime) -> None:
    with store.engine.begin() as connection:
        connection.execute(
            update(read_schedule).where(read_schedule.c.org_id == org_id).values(due_at=due_at)
        )


def claimed_ids(store: Store, worker: str, limit: int = 100, now: datetime = NOW) -> list[int]:
    return [due.organization.id for due in store.claim_due_reads(worker, now, limit, LEASE)]


def later(org_id: int, minutes: float = 30, record: BurnRecord = NO_READS) -> Reschedule:
    return Reschedule(org_id, NOW + timedelta(minutes=minutes), f"in {minutes} min", record)


# --- the organization codec ---------------------------------------------------------------------

finite_decimals = st.decimals(allow_nan=False, allow_infinity=False)
members = st.builds(
    Member,
    membership_id=st.integers(),
    user_id=st.integers(),
    name=st.text(),
    email=st.text(),
    role=st.text(),
    email_notify_enabled=st.none() | st.booleans(),
)
organizations = st.builds(
    Organization,
    id=st.integers(min_value=1, max_value=2**63 - 1),
    name=st.text(),
    notify_low_credits=st.booleans(),
    low_credits_threshold=finite_decimals,
    send_emails_enabled=st.booleans(),
    auto_refill=st.booleans(),
    members=st.lists(members, max_size=4).map(tuple),
)


@given(organizations)
def test_an_organization_round_trips_through_its_stored_form(organization: Organization) -> None:
    back = organization_from_dict(organization_to_dict(organization))
    assert back == organization
    # Exactly, not just numerically: 1E+3 stays 1E+3, 1.50 stays 1.50.
    assert str(back.low_credits_threshold) == str(organization.low_credits_threshold)


def test_a_claimed_read_hands_back_the_organization_as_listed(store: Store) -> None:
    odd = org(
        7,
        name="Zoë \x00 \udc80 日本 \u202e",
        threshold="1.50E+3",
        auto_refill=True,
        members=(
            Member(1, 2, "Ann", "ann@x.example", "admin", None),
            Member(3, 4, "Bob", "bob@x.example", "member", False),
        ),
    )
    store.sync_listing([odd], NOW, complete=True)
    [due] = store.claim_due_reads("a", NOW, 10, LEASE)
    assert due.organization == odd
    assert str(due.organization.low_credits_threshold) == "1.50E+3"
    assert due.record == NO_READS


def test_an_unreadable_stored_organization_is_a_one_line_error_and_claims_nothing(
    store: Store,
) -> None:
    listed(store, 1)
    with store.engine.begin() as connection:
        connection.execute(update(read_schedule).values(organization={"id": 1}))
    with pytest.raises(
        DatabaseError, match=r"^org 1 in the read schedule cannot be read: KeyError"
    ):
        store.claim_due_reads("a", NOW, 10, LEASE)
    assert store.scheduled_reads()[1].claimed_by is None


# --- claims -------------------------------------------------------------------------------------


def test_claims_take_the_earliest_due_first_up_to_the_limit(store: Store) -> None:
    listed(store, 1, 2, 3, 4, 5)
    for org_id, minutes in ((1, -1), (2, -5), (3, -3), (4, 10), (5, -4)):
        set_due(store, org_id, NOW + timedelta(minutes=minutes))
    assert claimed_ids(store, "a", limit=2) == [2, 5]
    assert claimed_ids(store, "b", limit=10) == [3, 1]  # 4 is not due yet
    assert claimed_ids(store, "c") == []
    assert store.claim_due_reads("c", NOW, 0, LEASE) == []


def test_a_claimed_row_is_no_one_elses_until_its_lease_runs_out(store: Store) -> None:
    listed(store, 1)
    assert claimed_ids(store, "a") == [1]
    assert claimed_ids(store, "b", now=NOW + LEASE - timedelta(seconds=1)) == []
    assert claimed_ids(store, "b", now=NOW + LEASE) == [1]
    # The first holder lost it: its reschedule is not written.
    assert store.reschedule("a", [later(1)]) == 0
    assert store.reschedule("b", [later(1)]) == 1


def replicas(database_url: str, count: int, work: Callable[[Store, str], Result]) -> list[Result]:
    """``work(store, worker)`` in ``count`` threads at once, each with a store (and so database
    connections) of its own, like replicas; their results, once all ended without error."""
    results: list[Result] = []
    errors: list[Exception] = []
    start = threading.Barrier(count)

    def replica(worker: str) -> None:
        own = open_database(database_url)
        try:
            start.wait(timeout=30)
            results.append(work(own, worker))
        except Exception as error:  # reported by the assertion below, not lost in the thread
            errors.append(error)
        finally:
            own.close()

    threads = [threading.Thread(target=replica, args=(f"w{n}",)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    return results


def test_concurrent_claimers_never_get_the_same_row(store: Store, database_url: str) -> None:
    org_ids = list(range(1, 201))
    store.sync_listing([org(org_id) for org_id in org_ids], NOW, complete=True)

    def claim_all(own: Store, worker: str) -> list[int]:
        mine: list[int] = []
        while batch := own.claim_due_reads(worker, NOW, 7, LEASE):
            mine += [due.organization.id for due in batch]
        return mine

    claimed = replicas(database_url, 6, claim_all)
    assert sorted(org_id for mine in claimed for org_id in mine) == org_ids  # all, none twice


def test_a_claim_passes_over_rows_another_replica_is_claiming(store: Store) -> None:
    if store.engine.dialect.name == "sqlite":
        pytest.skip("SQLite serializes claims (BEGIN IMMEDIATE): they never overlap")
    listed(store, 1, 2, 3)
    set_due(store, 3, NOW + timedelta(seconds=-1))
    result: list[list[int]] = []
    with store.engine.connect() as other:
        # What another replica holds in the middle of its claim: org 1, locked.
        other.execute(text("SELECT org_id FROM read_schedule WHERE org_id = 1 FOR UPDATE"))
        claimer = threading.Thread(target=lambda: result.append(claimed_ids(store, "b", 2)))
        claimer.start()
        claimer.join(timeout=10)
        other.rollback()
    claimer.join(timeout=10)
    assert result == [[3, 2]]


def test_reschedule_writes_only_where_the_worker_holds_the_claim(store: Store) -> None:
    listed(store, 1, 2, 3)
    assert claimed_ids(store, "a", limit=2) == [1, 2]
    record = BurnRecord(NOW, Decimal("123.45"), 0.25, 4)
    written = store.reschedule("a", [later(1, 30, record), later(2, 60), later(3, 5)])
    assert written == 2  # 3 was never claimed by a
    reads = store.scheduled_reads()
    assert reads[1].due_at == NOW + timedelta(minutes=30)
    assert reads[1].reason == "in 30 min"
    assert reads[1].last_read_at == NOW
    assert reads[1].claimed_by is None
    assert reads[3].reason == NEW_ORGANIZATION and reads[3].due_at == NOW
    # Released and due again: the record comes back with the next claim.
    claimed = store.claim_due_reads("b", NOW + timedelta(minutes=31), 10, LEASE)
    assert [due.organization.id for due in claimed] == [3, 1]
    assert claimed[1].record == record
    assert claimed[0].record == NO_READS and isinstance(claimed[0].record.peak, float)


def test_reschedule_writes_every_batch(store: Store) -> None:
    org_ids = range(1, 4502)
    store.sync_listing([org(org_id) for org_id in org_ids], NOW, complete=True)
    claimed = store.claim_due_reads("a", NOW, 5000, LEASE)
    assert len(claimed) == 4501
    assert store.reschedule("a", [later(org_id) for org_id in org_ids]) == 4501
    assert store.queue_stats(NOW).overdue == 0


def test_scheduled_reads_show_only_live_claims_and_filter_by_org(store: Store) -> None:
    soon = datetime.now(UTC)
    listed(store, 1, 2, 3, now=soon)
    assert claimed_ids(store, "live", limit=1, now=soon) == [1]
    # A claim whose lease ended as it began: a replica that stopped.
    assert [
        due.organization.id for due in store.claim_due_reads("dead", soon, 1, timedelta(0))
    ] == [2]
    reads = store.scheduled_reads()
    assert reads[1].claimed_by == "live"
    assert reads[2].claimed_by is None  # its lease ran out
    assert set(store.scheduled_reads([2, 3, 99])) == {2, 3}
    assert store.scheduled_reads([]) == {}


# --- the listing --------------------------------------------------------------------------------


def test_a_listing_adds_changes_keeps_and_removes(store: Store) -> None:
    assert listed(store, 1, 2, 3, 4) == ListingSync(added=4, changed=0, removed=0)
    assert claimed_ids(store, "a") == [1, 2, 3, 4]
    store.reschedule("a", [later(org_id) for org_id in (1, 2, 3, 4)])
    assert claimed_ids(store, "a", limit=1, now=NOW + timedelta(hours=1)) == [1]  # held by a

    hour = NOW + timedelta(hours=2)
    listing = [
        org(1, threshold="100.00"),  # the same threshold written otherwise: no change
        org(2, name="Renamed"),  # only the name: refreshed, due time kept
        org(3, threshold="250"),  # settings: due at once
        org(5),  # new
    ]
    assert store.sync_listing(listing, hour, complete=True) == ListingSync(1, 1, 1)
    reads = store.scheduled_reads()
    assert set(reads) == {1, 2, 3, 5}
    assert reads[2].due_at == NOW + timedelta(minutes=30) and reads[2].reason == "in 30 min"
    assert (reads[3].due_at, reads[3].reason) == (hour, SETTINGS_CHANGED)
    assert (reads[5].due_at, reads[5].reason) == (hour, NEW_ORGANIZATION)
    [renamed] = [
        due.organization
        for due in store.claim_due_reads("b", hour, 10, LEASE)
        if due.organization.id == 2
    ]
    assert renamed.name == "Renamed"


def test_a_settings_change_drops_the_claim_so_the_old_read_cannot_reschedule(store: Store) -> None:
    listed(store, 1)
    assert claimed_ids(store, "a") == [1]
    store.sync_listing([org(1, notify_low_credits=False)], NOW, complete=True)
    assert store.reschedule("a", [later(1)]) == 0
    assert claimed_ids(store, "b") == [1]


def test_a_name_change_keeps_the_claim(store: Store) -> None:
    listed(store, 1)
    assert claimed_ids(store, "a") == [1]
    store.sync_listing([org(1, name="New name")], NOW, complete=True)
    assert store.reschedule("a", [later(1)]) == 1


def test_an_incomplete_listing_removes_nothing(store: Store) -> None:
    listed(store, 1, 2, 3)
    assert store.sync_listing([org(2)], NOW, complete=False) == ListingSync(0, 0, 0)
    assert set(store.scheduled_reads()) == {1, 2, 3}
    assert store.sync_listing([], NOW, complete=True) == ListingSync(0, 0, 3)
    assert store.scheduled_reads() == {}


def test_an_unchanged_listing_writes_no_row(store: Store) -> None:
    orgs = [org(org_id, name=f"Zoë {org_id}") for org_id in range(1, 2500)]
    store.sync_listing(orgs, NOW, complete=True)
    store.sync_listing(orgs, NOW + timedelta(hours=1), complete=True)
    with store.engine.connect() as connection:
        listed_at = connection.execute(select(read_schedule.c.listed_at).distinct()).scalars()
        assert list(listed_at) == [NOW]


# --- jobs ---------------------------------------------------------------------------------------


def test_a_job_runs_once_per_due_time(store: Store) -> None:
    assert store.claim_job("listing", "a", NOW, LEASE)  # never run: due
    assert not store.claim_job("listing", "b", NOW, LEASE)  # a holds it
    store.finish_job("listing", "b", NOW)  # not b's: nothing
    assert not store.claim_job("listing", "b", NOW + timedelta(seconds=1), LEASE)
    store.finish_job("listing", "a", NOW + timedelta(minutes=5))
    assert not store.claim_job("listing", "b", NOW + timedelta(minutes=4), LEASE)
    assert store.claim_job("listing", "b", NOW + timedelta(minutes=5), LEASE)
    # b died holding it: once its lease ran out, a takes over.
    assert not store.claim_job("listing", "a", NOW + timedelta(minutes=9), LEASE)
    assert store.claim_job("listing", "a", NOW + timedelta(minutes=10), LEASE)
    assert store.next_due() == NOW + timedelta(minutes=5)


def test_of_processes_racing_to_create_a_job_exactly_one_wins(
    store: Store, database_url: str
) -> None:
    store.claim_job("other", "x", NOW, LEASE)  # the table exists and is not empty
    results = replicas(
        database_url, 5, lambda own, worker: own.claim_job("listing", worker, NOW, LEASE)
    )
    assert sorted(results) == [False] * 4 + [True]


# --- health -------------------------------------------------------------------------------------


def test_queue_stats(store: Store) -> None:
    assert store.queue_stats(NOW) == QueueStats(0, 0, 0.0, None)
    assert store.next_due() is None
    org_ids = range(1, 41)
    store.sync_listing([org(org_id) for org_id in org_ids], NOW, complete=True)
    claimed_ids(store, "a")
    # Org n last read n minutes before NOW; due again an hour after.
    store.reschedule(
        "a",
        [
            Reschedule(
                n,
                NOW + timedelta(minutes=60 - n),
                "r",
                BurnRecord(NOW - timedelta(minutes=n), Decimal(1), 0.0, 1),
            )
            for n in range(1, 39)
        ],
    )
    # 39 and 40 never read; 39 being read right now (claimed), 40 released unread.
    store.reschedule("a", [Reschedule(40, NOW - timedelta(minutes=3), "r", NO_READS)])
    set_due(store, 39, NOW - timedelta(minutes=10))
    later_now = NOW + timedelta(minutes=30)
    stats = store.queue_stats(later_now)
    # Overdue at NOW+30: orgs 31..38 (due 60-n < 30 min), 40, and 39 (its claim's lease ran
    # out at NOW+5).
    assert stats.organizations == 40
    assert stats.overdue == 8 + 2
    assert stats.oldest_overdue_seconds == 40 * 60  # 39, due NOW-10min
    # 38 read: the nearest rank of the 95th percentile leaves 1 older (38 min): 37 min + 30.
    assert stats.p95_staleness_seconds == (37 + 30) * 60
    assert store.next_due() == NOW - timedelta(minutes=10)


def test_a_live_claim_is_not_overdue(store: Store) -> None:
    listed(store, 1, 2)
    claimed_ids(store, "a", limit=1)
    stats = store.queue_stats(NOW + timedelta(minutes=1))
    assert (stats.overdue, stats.oldest_overdue_seconds) == (1, 60.0)


def test_fleet_burn_is_the_90th_percentile_of_trusted_peaks(store: Store) -> None:
    assert store.fleet_burn(3) is None
    org_ids = range(1, 23)
    store.sync_listing([org(org_id) for org_id in org_ids], NOW, complete=True)
    claimed_ids(store, "a")
    records = {n: BurnRecord(NOW, Decimal(1), float(n), 3) for n in range(1, 21)}
    records[21] = BurnRecord(NOW, Decimal(1), 1000.0, 2)  # too few samples
    records[22] = BurnRecord(NOW, Decimal(1), 0.0, 9)  # never burned
    store.reschedule("a", [later(n, record=record) for n, record in records.items()])
    assert store.fleet_burn(3) == 18.0  # rank ceil(0.9 × 20) = 18 of 1..20
    assert store.fleet_burn(2) == 19.0  # 21 values: rank 19
    assert store.fleet_burn(10) is None


# --- the subset loads ---------------------------------------------------------------------------


def test_loads_of_some_orgs_equal_the_full_load_restricted(store: Store) -> None:
    armed = StoredState(AlertState.ARMED, 0)
    changes = [
        StateChange(ObservedOrg(n, f"Org {n}", True, Decimal(100), Decimal(n)), None, armed, None)
        for n in range(1, 11)
    ]
    store.apply_changes(changes, NOW)
    alerted = StoredState(AlertState.ALERTED, 1)
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE org_state SET state = 'alerted', breach_count = 1, last_alert_at = "
                "changed_at WHERE org_id IN (2, 3, 4)"
            )
        )
    notice = NoticeState(AlertState.ALERTED, 1, 2, NOW)
    store.persist(CycleWrites([], [NoticeChange(n, None, notice, ()) for n in (3, 4, 5)], []), NOW)
    some = [3, 4, 5, 99]
    full_states = store.load_states()
    assert full_states[2].stored == alerted
    assert store.load_states(some) == {n: full_states[n] for n in (3, 4, 5)}
    assert store.load_states([]) == {}
    full_notices = store.load_notice_states()
    assert store.load_notice_states(some) == {n: full_notices[n] for n in (3, 4, 5)}
    full_alerts = store.last_alerts()
    assert set(full_alerts) == {2, 3, 4}
    assert store.last_alerts(some) == {n: full_alerts[n] for n in (3, 4)}
    many = range(1, 40_000)  # more ids than SQLite takes as bound parameters
    assert store.load_states(many) == full_states

"""The alert-state store against real SQLite files and real PostgreSQL databases."""

from __future__ import annotations

import multiprocessing
import random
import shutil
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool
from structlog.testing import capture_logs

import poller.store.database as database_module
import poller.store.states as states_module
from poller.engine.model import AlertState, NewNotification, ObservedOrg, StateChange, StoredState
from poller.store import DatabaseError, SchemaOutdated, Store, open_database, upgrade_database
from poller.store.schema import Money, org_state

NOW = datetime(2024, 11, 24, 12, 0, tzinfo=UTC)
ARMED = StoredState(AlertState.ARMED, 0)
HEAD = "0004"
# PostgreSQL's view of its sessions, read to see one waiting for a row lock.
pg_stat_activity = Table(
    "pg_stat_activity", MetaData(), Column("datname", Text), Column("wait_event_type", Text)
)


def observed(org_id: int, balance: str = "50.00", threshold: str = "100.00") -> ObservedOrg:
    return ObservedOrg(
        org_id=org_id,
        name=f"Org {org_id}",
        enabled=True,
        threshold=Decimal(threshold),
        balance=Decimal(balance),
    )


def first_sight(org: ObservedOrg) -> StateChange:
    return StateChange(observed=org, expected=None, new=ARMED, notification=None)


def breach(
    org: ObservedOrg, expected: StoredState | None, *, status: str = "pending"
) -> StateChange:
    number = (expected or ARMED).breach_count + 1
    return StateChange(
        observed=org,
        expected=expected,
        new=StoredState(AlertState.ALERTED, number),
        notification=NewNotification(
            kind="low_credits",
            breach_number=number,
            org_name=org.name,
            recipients=("admin@example.com", "ops@example.com"),
            subject=f"{org.name}: credits below {org.threshold}",
            balance=org.balance,
            threshold=org.threshold,
            detected_at=NOW,
            status=status,
            auto_refill=True,
        ),
    )


def seed_pending(store: Store, count: int) -> list[int]:
    """``count`` orgs seen armed, then each breached once: ``count`` pending notifications."""
    orgs = [observed(org_id) for org_id in range(1, count + 1)]
    store.apply_changes([first_sight(org) for org in orgs], NOW)
    return store.apply_changes([breach(org, ARMED) for org in orgs], NOW).notifications


def count_writes(store: Store) -> Counter[str]:
    """Counts INSERT/UPDATE/DELETE statements the store's engine sends from now on."""
    writes: Counter[str] = Counter()

    @event.listens_for(store.engine, "before_cursor_execute")
    def _count(_conn, _cursor, statement: str, *_args: object) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in {"INSERT", "UPDATE", "DELETE"}:
            writes[verb] += 1

    return writes


# --- schema ---------------------------------------------------------------------------------


def test_a_new_empty_database_gets_the_schema_automatically(database_url: str) -> None:
    store = open_database(database_url)
    try:
        tables = set(inspect(store.engine).get_table_names())
        assert {"org_state", "notification", "cycle_run", "alembic_version"} <= tables
        assert store.load_states() == {}
    finally:
        store.close()
    assert upgrade_database(database_url) == (HEAD, HEAD)


def test_upgrade_database_creates_the_schema_from_empty(database_url: str) -> None:
    assert upgrade_database(database_url) == (None, HEAD)
    assert upgrade_database(database_url) == (HEAD, HEAD)
    open_database(database_url).close()


def test_it_refuses_an_outdated_schema_until_db_upgrade(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_database(database_url).close()  # at HEAD
    # A later poller: the shipped migrations plus one more revision.
    migrations = tmp_path / "migrations"
    shutil.copytree(
        Path(database_module.__file__).parent / "migrations",
        migrations,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (migrations / "versions" / "9999_cycle_note.py").write_text(
        'import sqlalchemy as sa\nfrom alembic import op\n\nrevision = "9999"\n'
        f'down_revision = "{HEAD}"\nbranch_labels = None\ndepends_on = None\n\n\n'
        "def upgrade():\n"
        '    op.add_column("cycle_run", sa.Column("note", sa.Text()))\n\n\n'
        "def downgrade():\n"
        '    op.drop_column("cycle_run", "note")\n'
    )
    monkeypatch.setattr(database_module, "MIGRATIONS_LOCATION", str(migrations))

    with pytest.raises(SchemaOutdated) as refused:
        open_database(database_url)
    assert str(refused.value) == (
        f"database schema is at revision {HEAD}, this poller needs 9999: run `poller db upgrade`"
    )

    assert upgrade_database(database_url) == (HEAD, "9999")
    upgraded = open_database(database_url)
    try:
        columns = {column["name"] for column in inspect(upgraded.engine).get_columns("cycle_run")}
        assert "note" in columns
    finally:
        upgraded.close()


def test_it_refuses_a_schema_from_a_newer_poller(database_url: str) -> None:
    store = open_database(database_url)
    version = Table("alembic_version", MetaData(), autoload_with=store.engine)
    with store.engine.begin() as connection:
        connection.execute(update(version).values(version_num="99999"))
    store.close()

    for attempt in (open_database, upgrade_database):
        with pytest.raises(SchemaOutdated, match=r"revision 99999, which this poller does not"):
            attempt(database_url)


def test_a_non_empty_database_without_poller_schema_is_not_taken_over(database_url: str) -> None:
    engine = create_engine(database_url, poolclass=NullPool)
    foreign = Table("someone_elses", MetaData(), Column("id", Integer, primary_key=True))
    foreign.create(engine)
    engine.dispose()

    outdated = rf"revision none, this poller needs {HEAD}: run `poller"
    with pytest.raises(SchemaOutdated, match=outdated):
        open_database(database_url)


def test_a_sqlite_file_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError) as error:
        open_database(f"sqlite:///{tmp_path}/missing/poller.db")
    assert str(error.value) == (
        f"cannot open SQLite database {tmp_path}/missing/poller.db: "
        f"directory {tmp_path}/missing does not exist"
    )


def test_database_errors_are_one_line_and_hide_the_password() -> None:
    with pytest.raises(DatabaseError) as error:
        open_database("postgresql+psycopg2://poller:s3cret-pw@127.0.0.1:1/poller")
    message = str(error.value)
    assert "s3cret-pw" not in message
    assert "\n" not in message
    assert message.startswith("opening the database failed on postgresql+psycopg2://poller:***@")


@pytest.mark.postgres
def test_a_plain_postgresql_url_uses_the_bundled_psycopg2_driver(postgres_url: str) -> None:
    plain = "postgresql://" + postgres_url.split("://", 1)[1]
    store = open_database(plain)
    try:
        assert store.engine.dialect.driver == "psycopg2"
        assert store.load_states() == {}
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://root:hunter2@db/poller", "unsupported database mysql://root:***@db/poller"),
        ("not a url", "database URL is not valid"),
    ],
)
def test_unusable_urls_are_refused_with_a_clear_message(url: str, expected: str) -> None:
    with pytest.raises(DatabaseError) as error:
        open_database(url)
    assert str(error.value).startswith(expected)
    assert "hunter2" not in str(error.value)


# --- alert states and the outbox -----------------------------------------------------------


def test_money_and_timestamps_round_trip_exactly(store: Store) -> None:
    amounts = ["-12.34", "99999999.99", "0.00", "0.1", "12345678901234.567891"]
    orgs = [
        observed(index, balance=amount, threshold=amount)
        for index, amount in enumerate(amounts, start=1)
    ]
    store.apply_changes([first_sight(org) for org in orgs], NOW)

    loaded = store.load_states()
    for org, amount in zip(orgs, amounts, strict=True):
        assert str(loaded[org.org_id].balance) == amount
        assert str(loaded[org.org_id].threshold) == amount
        assert isinstance(loaded[org.org_id].balance, Decimal)
    row = next(row for row in store.status_rows() if row.org_id == 1)
    assert row.changed_at == NOW
    assert row.changed_at.tzinfo is not None


@settings(max_examples=300, deadline=None)
@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_money_is_stored_on_sqlite_as_its_digits_without_an_exponent(amount: Decimal) -> None:
    dialect = sqlite.dialect()
    to_sqlite = Money().dialect_impl(dialect).bind_processor(dialect)
    assert to_sqlite(amount) == format(amount, "f")


def test_apply_refuses_two_changes_for_one_org(store: Store) -> None:
    with pytest.raises(ValueError, match="at most one change per organization"):
        store.apply_changes([first_sight(observed(1)), breach(observed(1), None)], NOW)
    assert store.load_states() == {}


def test_apply_writes_the_state_and_its_notification_together(store: Store) -> None:
    org = observed(7, balance="-12.34")
    result = store.apply_changes([breach(org, None)], NOW)

    assert (result.written, result.conflicts, len(result.notifications)) == (1, 0, 1)
    assert store.load_states()[7].stored == StoredState(AlertState.ALERTED, 1)
    [record] = store.notifications_for(7)
    assert record.id == result.notifications[0]
    assert (record.kind, record.breach_number, record.status) == ("low_credits", 1, "pending")
    assert record.recipients == ("admin@example.com", "ops@example.com")
    assert (record.balance, record.threshold) == (Decimal("-12.34"), Decimal("100.00"))
    assert (record.attempts, record.next_attempt_at, record.detected_at) == (0, NOW, NOW)
    assert record.auto_refill is True


def test_a_failing_notification_insert_rolls_back_the_state_write(store: Store) -> None:
    org = observed(1)
    store.apply_changes([first_sight(org)], NOW)

    result = store.apply_changes([breach(org, ARMED, status="sent")], NOW)

    assert "cannot have status 'sent'" in result.failed[1]
    assert (result.written, result.applied) == (0, frozenset())
    assert store.load_states()[1].stored == ARMED
    assert store.notifications_for(1) == []


def test_the_same_breach_applied_twice_yields_one_notification_and_one_conflict(
    store: Store,
) -> None:
    org = observed(1)
    store.apply_changes([first_sight(org)], NOW)
    # Two pollers loaded the same armed state and both decided the org breached.
    first = store.apply_changes([breach(org, ARMED)], NOW)
    second = store.apply_changes([breach(org, ARMED)], NOW + timedelta(seconds=1))

    assert (len(first.notifications), first.conflicts, first.applied) == (1, 0, {1})
    assert (second.written, second.notifications, second.conflicts) == (0, [], 1)
    assert second.applied == frozenset()
    assert len(store.notifications_for(1)) == 1


def test_a_new_org_inserted_twice_is_one_row_and_one_conflict(store: Store) -> None:
    org = observed(1)
    first = store.apply_changes([breach(org, None)], NOW)
    second = store.apply_changes([breach(org, None)], NOW)

    assert (first.written, len(first.notifications), first.conflicts) == (1, 1, 0)
    assert (second.written, second.notifications, second.conflicts) == (0, [], 1)
    assert len(store.notifications_for(1)) == 1


def test_a_value_refresh_leaves_the_state_another_poller_wrote(store: Store) -> None:
    org = observed(1, balance="500.00")
    store.apply_changes([first_sight(org)], NOW)
    store.apply_changes([breach(observed(1, balance="50.00"), ARMED)], NOW)  # poller B
    # Poller A still believes the org is armed and only saw the balance move.
    refresh = StateChange(observed(1, balance="450.00"), ARMED, ARMED, None)
    result = store.apply_changes([refresh], NOW + timedelta(minutes=1))

    assert (result.written, result.conflicts) == (1, 0)
    stored = store.load_states()[1]
    assert stored.stored == StoredState(AlertState.ALERTED, 1)
    assert stored.balance == Decimal("450.00")


def test_a_rearm_is_guarded_like_a_breach(store: Store) -> None:
    org = observed(1)
    store.apply_changes([breach(org, None)], NOW)
    alerted = StoredState(AlertState.ALERTED, 1)
    rearm = StateChange(
        observed(1, balance="500.00"), alerted, StoredState(AlertState.ARMED, 1), None
    )

    assert store.apply_changes([rearm], NOW).conflicts == 0
    assert store.apply_changes([rearm], NOW).conflicts == 1
    assert store.load_states()[1].stored == StoredState(AlertState.ARMED, 1)


def _apply_breaches_in_own_process(
    url: str, org_ids: list[int], barrier: threading.Barrier, results: multiprocessing.Queue
) -> None:
    # Several write batches per poller (on PostgreSQL two at a time), racing the others'.
    states_module.BATCH_SIZE = 40
    store = open_database(url)
    loaded = store.load_states()
    changes = [breach(observed(org_id), loaded[org_id].stored) for org_id in org_ids]
    random.shuffle(changes)
    barrier.wait()
    result = store.apply_changes(changes, NOW)
    results.put((result.notifications, result.conflicts))
    store.close()


def test_concurrent_pollers_in_separate_processes_notify_each_breach_once(
    store: Store, database_url: str
) -> None:
    org_ids = list(range(1, 201))
    store.apply_changes([first_sight(observed(org_id)) for org_id in org_ids], NOW)
    pollers = 4
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(pollers)
    results = context.Queue()
    processes = [
        context.Process(
            target=_apply_breaches_in_own_process, args=(database_url, org_ids, barrier, results)
        )
        for _ in range(pollers)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0

    notification_ids = [nid for ids, _ in outcomes for nid in ids]
    assert len(notification_ids) == len(set(notification_ids)) == len(org_ids)
    assert sum(conflicts for _, conflicts in outcomes) == (pollers - 1) * len(org_ids)
    for org_id in org_ids:
        assert [n.breach_number for n in store.notifications_for(org_id)] == [1]


def test_a_batch_writes_and_notifies_only_the_orgs_whose_loaded_state_still_holds(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(states_module, "BATCH_SIZE", 100)
    org_ids = range(1, 301)  # three write batches
    store.apply_changes([first_sight(observed(org_id)) for org_id in org_ids], NOW)
    raced = {org_id for org_id in org_ids if org_id % 7 == 3}
    store.apply_changes([breach(observed(org_id), ARMED) for org_id in sorted(raced)], NOW)
    # This poller loaded every org armed: its breaches of the raced orgs are stale. The same
    # batches also hold value refreshes and orgs it sees for the first time.
    later = NOW + timedelta(minutes=5)
    changes = [
        breach(observed(org_id), ARMED)
        if org_id % 2
        else StateChange(observed(org_id, balance="75.00"), ARMED, ARMED, None)
        for org_id in org_ids
    ] + [breach(observed(org_id), None) for org_id in range(5001, 5011)]
    result = store.apply_changes(changes, later)

    stale = {org_id for org_id in raced if org_id % 2}
    notified = {org_id for org_id in org_ids if org_id % 2} - stale | set(range(5001, 5011))
    assert result.conflicts == len(stale)
    assert result.written == len(changes) - len(stale)
    assert len(result.notifications) == len(notified)
    records = {org_id: store.notifications_for(org_id) for org_id in [*org_ids, *range(5001, 5011)]}
    assert {org_id for org_id, rows in records.items() if rows} == notified | raced
    assert all(len(rows) == 1 for rows in records.values() if rows)
    assert {rows[0].id for org_id, rows in records.items() if org_id in notified} == set(
        result.notifications
    )
    loaded = store.load_states()
    for org_id in org_ids:
        alerted = org_id % 2 or org_id in raced
        assert loaded[org_id].stored.state == (AlertState.ALERTED if alerted else AlertState.ARMED)
        assert loaded[org_id].balance == Decimal("50.00" if org_id % 2 else "75.00")


def _lock_waiters(database_url: str) -> int:
    """Sessions of this test's PostgreSQL database waiting for a lock."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(
                select(func.count()).where(
                    pg_stat_activity.c.datname == func.current_database(),
                    pg_stat_activity.c.wait_event_type == "Lock",
                )
            ).scalar_one()
    finally:
        engine.dispose()


def _wait_for_a_lock_waiter(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        time.sleep(0.5)  # SQLite: the writer waits in BEGIN IMMEDIATE, where nothing shows it
        return
    deadline = time.monotonic() + 20
    while _lock_waiters(database_url) == 0:
        assert time.monotonic() < deadline, "the batch never waited for the row lock"
        time.sleep(0.05)


def test_a_guarded_write_that_waits_for_another_poller_sees_what_that_poller_wrote(
    store: Store, database_url: str
) -> None:
    store.apply_changes([first_sight(observed(org_id)) for org_id in (1, 2, 3)], NOW)
    other = open_database(database_url)
    results: list[object] = []
    try:
        with other.engine.begin() as connection:  # another poller, mid-transaction
            connection.execute(
                update(org_state)
                .where(org_state.c.org_id == 2)
                .values(state=AlertState.ALERTED.value, breach_count=1)
            )
            stale = [breach(observed(org_id), ARMED) for org_id in (1, 2, 3)]
            writer = threading.Thread(
                target=lambda: results.append(store.apply_changes(stale, NOW))
            )
            writer.start()
            _wait_for_a_lock_waiter(database_url)
        writer.join(timeout=30)
    finally:
        other.close()

    [result] = results
    assert (result.written, result.conflicts, len(result.notifications)) == (2, 1, 2)
    assert store.notifications_for(2) == []
    assert [len(store.notifications_for(org_id)) for org_id in (1, 3)] == [1, 1]


@pytest.mark.postgres
def test_a_batch_that_deadlocks_is_retried_whole(postgres_url: str) -> None:
    store = open_database(postgres_url)
    try:
        store.apply_changes([first_sight(observed(org_id)) for org_id in (1, 2, 3)], NOW)
        results: list[object] = []
        with capture_logs() as logs, store.engine.connect() as other:
            with other.begin():
                # PostgreSQL breaks a deadlock by aborting the session that finds it, which
                # must be the batch's, not this one.
                other.exec_driver_sql("SET LOCAL deadlock_timeout = '30s'")
                other.execute(update(org_state).where(org_state.c.org_id == 3).values(name="B"))
                stale = [breach(observed(org_id), ARMED) for org_id in (1, 2, 3)]
                writer = threading.Thread(
                    target=lambda: results.append(store.apply_changes(stale, NOW))
                )
                writer.start()
                _wait_for_a_lock_waiter(postgres_url)  # the batch holds 1 and 2, waits for 3
                # Waiting for org 1 closes the cycle; the batch is rolled back and runs again
                # once this transaction has committed its own breach of org 1.
                other.execute(
                    update(org_state)
                    .where(org_state.c.org_id == 1)
                    .values(state=AlertState.ALERTED.value, breach_count=1)
                )
            writer.join(timeout=30)

        [result] = results
        assert [entry["event"] for entry in logs].count("store.deadlock_retry") == 1
        assert (result.written, result.conflicts, len(result.notifications)) == (2, 1, 2)
        assert store.notifications_for(1) == []
        assert [len(store.notifications_for(org_id)) for org_id in (2, 3)] == [1, 1]
    finally:
        store.close()


@pytest.mark.parametrize("name", ["Acme\x00Labs", "Acme\udc80Labs", "Acme\ud83dLabs"])
def test_a_nul_or_lone_surrogate_in_an_org_name_is_stored_as_a_replacement_character(
    store: Store, name: str
) -> None:
    # json.loads takes "\\udc80" from an API body; stored as is it would break every later read.
    orgs = [
        ObservedOrg(1, name, True, Decimal("100.00"), Decimal("50.00")),
        ObservedOrg(2, "Café 🚀", True, Decimal("100.00"), Decimal("50.00")),
    ]
    result = store.apply_changes([breach(org, None) for org in orgs], NOW)

    assert result.conflicts == 0
    states = store.load_states()
    assert (states[1].name, states[2].name) == ("Acme\ufffdLabs", "Café 🚀")
    [record] = store.notifications_for(1)
    assert record.org_name == "Acme\ufffdLabs"


def test_write_batches_runs_two_at_a_time_on_postgresql_and_one_on_sqlite(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(states_module, "BATCH_SIZE", 2)
    parallel = store.engine.dialect.name == "postgresql"
    meet = threading.Barrier(2, timeout=10)  # only two batches that run together pass it
    lock = threading.Lock()
    running = most = 0

    def write(batch: list[int]) -> list[int]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        if parallel:
            meet.wait()
        with lock:
            running -= 1
        return [item * 10 for item in batch]

    assert store.write_batches(list(range(8)), write) == [[0, 10], [20, 30], [40, 50], [60, 70]]
    assert most == (2 if parallel else 1)


def test_write_batches_starts_no_batch_after_one_failed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(states_module, "BATCH_SIZE", 1)
    started: list[int] = []

    def write(batch: list[int]) -> None:
        started.append(batch[0])
        if batch[0] == 1:
            raise DatabaseError("the second batch failed")

    with pytest.raises(DatabaseError, match="second batch"):
        store.write_batches([0, 1, 2, 3, 4, 5], write)
    assert sorted(started) == [0, 1]


def test_an_unchanged_cycle_writes_nothing_but_its_cycle_run(store: Store) -> None:
    orgs = [observed(org_id, balance="500.00") for org_id in range(1, 51)]
    store.apply_changes([first_sight(org) for org in orgs], NOW)
    writes = count_writes(store)

    later = NOW + timedelta(minutes=5)
    cycle_id = store.start_cycle(later, shard=None)
    loaded = store.load_states()
    changes = [
        StateChange(org, loaded[org.org_id].stored, loaded[org.org_id].stored, None)
        for org in orgs
        if loaded[org.org_id].differs_from(org, loaded[org.org_id].stored)
    ]
    result = store.apply_changes(changes, later)
    store.record_errors([], later)
    store.finish_cycle(cycle_id, later, orgs_read=50, orgs_failed=0, outcome="ok")

    assert changes == []
    assert result.written == 0
    assert writes == Counter({"INSERT": 1, "UPDATE": 1})  # the cycle_run row, nothing else
    assert {row.changed_at for row in store.status_rows()} == {NOW}


def test_only_changed_orgs_are_rewritten(store: Store) -> None:
    orgs = [observed(org_id, balance="500.00") for org_id in range(1, 11)]
    store.apply_changes([first_sight(org) for org in orgs], NOW)
    loaded = store.load_states()
    moved = observed(3, balance="480.00")

    assert not loaded[2].differs_from(observed(2, balance="500.0"), ARMED)
    assert loaded[3].differs_from(moved, ARMED)
    later = NOW + timedelta(minutes=5)
    store.apply_changes([StateChange(moved, ARMED, ARMED, None)], later)

    changed = {row.org_id for row in store.status_rows() if row.changed_at == later}
    assert changed == {3}


def test_a_batch_of_refreshes_stores_each_orgs_own_values(store: Store) -> None:
    store.apply_changes([first_sight(observed(org_id)) for org_id in (1, 2, 3)], NOW)
    refreshed = [
        ObservedOrg(1, "Acme", False, Decimal("10.00"), Decimal("-1.50")),
        ObservedOrg(2, "Globex", True, Decimal("20.00"), Decimal("2.25")),
        ObservedOrg(3, "Initech", True, Decimal("30.00"), Decimal("99999999.99")),
    ]
    result = store.apply_changes([StateChange(org, ARMED, ARMED, None) for org in refreshed], NOW)

    assert (result.written, result.conflicts) == (3, 0)
    loaded = store.load_states()
    assert [
        ObservedOrg(row.org_id, row.name, row.enabled, row.threshold, row.balance)
        for row in (loaded[1], loaded[2], loaded[3])
    ] == refreshed


def test_errors_are_recorded_and_cleared_by_the_next_write(store: Store) -> None:
    store.apply_changes([first_sight(observed(1)), first_sight(observed(2))], NOW)
    failed_at = NOW + timedelta(minutes=5)
    store.record_errors(
        [(1, "HTTP 503 from\n/organizations/1/billing"), (99, "never seen")], failed_at
    )

    loaded = store.load_states()
    assert loaded[1].last_error == "HTTP 503 from /organizations/1/billing"
    assert loaded[2].last_error is None
    assert loaded[1].differs_from(observed(1), ARMED)  # so the cycle rewrites it on success
    row = next(row for row in store.status_rows() if row.org_id == 1)
    assert (row.last_error_at, row.last_checked_at) == (failed_at, failed_at)

    store.apply_changes([StateChange(observed(1), ARMED, ARMED, None)], NOW + timedelta(minutes=10))
    assert store.load_states()[1].last_error is None


# --- delivery claims -----------------------------------------------------------------------


def test_concurrent_claimers_get_each_notification_exactly_once(
    store: Store, database_url: str
) -> None:
    notification_ids = seed_pending(store, 40)
    claimed: list[int] = []
    errors: list[Exception] = []
    lock = threading.Lock()

    def claimer(worker: str) -> None:
        own = open_database(database_url)
        try:
            while batch := own.claim_due(worker=worker, now=NOW, lease_seconds=300, limit=3):
                with lock:
                    claimed.extend(record.id for record in batch)
        except Exception as error:  # reported by the assertion below, not lost in the thread
            errors.append(error)
        finally:
            own.close()

    threads = [threading.Thread(target=claimer, args=(f"worker-{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sorted(claimed) == sorted(notification_ids)
    assert store.claim_due(worker="late", now=NOW, lease_seconds=300) == []


def test_a_claim_passes_over_rows_another_claim_is_taking(store: Store) -> None:
    # Two SMTP connections of one poller claim at the same moment: each gets its own rows.
    if store.engine.dialect.name == "sqlite":
        pytest.skip("SQLite serializes claims (BEGIN IMMEDIATE): they never overlap")
    ids = seed_pending(store, 4)
    results: list[list[int]] = []
    with store.engine.connect() as other:
        # What a claimer in the middle of its transaction holds: the first two rows, locked.
        other.execute(
            text("SELECT id FROM notification WHERE id IN (:a, :b) FOR UPDATE"),
            {"a": ids[0], "b": ids[1]},
        )
        claimer = threading.Thread(
            target=lambda: results.append(
                [r.id for r in store.claim_due(worker="b", now=NOW, lease_seconds=60, limit=2)]
            )
        )
        claimer.start()
        claimer.join(timeout=10)
        other.rollback()
    claimer.join(timeout=10)
    assert results == [ids[2:]]


def test_an_expired_lease_can_be_taken_over(store: Store) -> None:
    [notification_id] = seed_pending(store, 1)
    [first] = store.claim_due(worker="a", now=NOW, lease_seconds=60)
    assert (first.id, first.claimed_by, first.attempts) == (notification_id, "a", 1)
    assert first.claim_expires_at == NOW + timedelta(seconds=60)

    assert store.claim_due(worker="b", now=NOW + timedelta(seconds=30), lease_seconds=60) == []
    [taken] = store.claim_due(worker="b", now=NOW + timedelta(seconds=61), lease_seconds=60)
    assert (taken.id, taken.claimed_by, taken.attempts) == (notification_id, "b", 2)


def test_rows_another_poller_is_delivering_can_be_left_out_of_the_pending_count(
    store: Store,
) -> None:
    seed_pending(store, 2)
    store.claim_due(worker="a", now=NOW, lease_seconds=60, limit=1)

    assert store.pending_count(NOW) == 2
    assert store.pending_count(NOW, exclude_in_flight=True) == 1
    # Once the lease has run out the row is anyone's again, and counts as left undone.
    assert store.pending_count(NOW + timedelta(seconds=61), exclude_in_flight=True) == 2


def test_mark_sent_counts_only_for_the_worker_holding_the_claim(store: Store) -> None:
    [notification_id] = seed_pending(store, 1)
    store.claim_due(worker="a", now=NOW, lease_seconds=60)
    store.claim_due(worker="b", now=NOW + timedelta(seconds=61), lease_seconds=60)
    sent_at = NOW + timedelta(seconds=62)

    assert not store.mark_sent(notification_id, worker="a", message_id="<a@x>", now=sent_at)
    assert store.mark_sent(notification_id, worker="b", message_id="<b@x>", now=sent_at)
    assert not store.mark_sent(notification_id, worker="b", message_id="<b@x>", now=sent_at)

    [record] = store.notifications_for(1)
    assert (record.status, record.message_id, record.sent_at) == ("sent", "<b@x>", sent_at)
    assert (record.claimed_by, record.claim_expires_at) == (None, None)
    assert store.claim_due(worker="c", now=NOW + timedelta(days=1), lease_seconds=60) == []


def test_mark_retry_releases_the_claim_until_the_next_attempt(store: Store) -> None:
    [notification_id] = seed_pending(store, 1)
    store.claim_due(worker="a", now=NOW, lease_seconds=60)
    retry_at = NOW + timedelta(minutes=2)

    assert store.mark_retry(
        notification_id, worker="a", error="421 try later", next_attempt_at=retry_at, now=NOW
    )
    assert store.pending_count(NOW) == 1  # still undelivered, even though not due yet
    assert store.claim_due(worker="b", now=retry_at - timedelta(seconds=1), lease_seconds=60) == []
    [again] = store.claim_due(worker="b", now=retry_at, lease_seconds=60)
    assert (again.attempts, again.last_error, again.status) == (2, "421 try later", "pending")


def test_mark_failed_ends_delivery(store: Store) -> None:
    [notification_id] = seed_pending(store, 1)
    store.claim_due(worker="a", now=NOW, lease_seconds=60)

    assert not store.mark_failed(notification_id, worker="b", error="550 no such user", now=NOW)
    assert store.mark_failed(notification_id, worker="a", error="550 no such user", now=NOW)
    [record] = store.notifications_for(1)
    assert (record.status, record.last_error) == ("failed", "550 no such user")
    assert store.claim_due(worker="a", now=NOW + timedelta(days=1), lease_seconds=60) == []


def commit_durability(store: Store) -> list[str]:
    """How each commit from now on waits for the disk: "durable" or "relaxed"."""
    seen: list[str] = []

    @event.listens_for(store.engine, "commit")
    def _commit(connection) -> None:
        cursor = connection.connection.dbapi_connection.cursor()
        if store.engine.dialect.name == "sqlite":
            cursor.execute("PRAGMA synchronous")
            durable = cursor.fetchone()[0] == 2  # FULL; NORMAL (1) skips the fsync in WAL mode
        else:
            cursor.execute("SHOW synchronous_commit")
            durable = cursor.fetchone()[0] == "on"
        cursor.close()
        seen.append("durable" if durable else "relaxed")

    return seen


def test_only_delivery_progress_commits_without_waiting_for_the_disk(store: Store) -> None:
    # docs/guarantees.md: a power loss may forget a sent mark (a duplicate with the same
    # Message-ID), never a recorded breach or a claim, which stay durable.
    seen = commit_durability(store)
    ids = seed_pending(store, 3)
    assert set(seen) == {"durable"}

    def durability_of(operation) -> list[str]:
        seen.clear()
        operation()
        return list(seen)

    assert durability_of(lambda: store.claim_due(worker="a", now=NOW, lease_seconds=60)) == [
        "durable"
    ]
    until = NOW + timedelta(seconds=120)
    assert durability_of(lambda: store.renew_claims(ids, worker="a", now=NOW, until=until)) == [
        "relaxed"
    ]
    assert durability_of(
        lambda: store.mark_sent(ids[0], worker="a", message_id="<x@y>", now=NOW)
    ) == ["relaxed"]
    assert durability_of(
        lambda: store.mark_retry(ids[1], worker="a", error="421", next_attempt_at=NOW, now=NOW)
    ) == ["relaxed"]
    assert durability_of(lambda: store.mark_failed(ids[2], worker="a", error="550", now=NOW)) == [
        "relaxed"
    ]
    # The same pooled connection goes back to durable commits for everything else.
    assert set(durability_of(lambda: seed_more(store))) == {"durable"}
    assert durability_of(lambda: store.start_cycle(NOW, shard=None)) == ["durable"]


def test_a_sqlite_database_not_in_wal_mode_keeps_every_commit_durable() -> None:
    # Without WAL (here: in memory; on disk: where WAL is not available), synchronous=NORMAL
    # could corrupt the file on a power loss instead of only forgetting the last
    # transactions; poller relaxes nothing there.
    store = open_database("sqlite://")
    try:
        [notification_id] = seed_pending(store, 1)
        seen = commit_durability(store)
        store.claim_due(worker="a", now=NOW, lease_seconds=60)
        store.mark_sent(notification_id, worker="a", message_id="<x@y>", now=NOW)
        assert seen == ["durable", "durable"]
    finally:
        store.close()


def seed_more(store: Store) -> None:
    org = observed(99)
    store.apply_changes([first_sight(org)], NOW)
    store.apply_changes([breach(org, ARMED)], NOW)


def test_only_pending_notifications_are_claimable(store: Store) -> None:
    orgs = [observed(org_id) for org_id in (1, 2, 3)]
    statuses = ["suppressed", "no_recipients", "baseline"]
    store.apply_changes(
        [breach(org, None, status=status) for org, status in zip(orgs, statuses, strict=True)],
        NOW,
    )

    assert store.claim_due(worker="a", now=NOW, lease_seconds=60) == []
    assert store.pending_count(NOW) == 0
    assert [store.notifications_for(org.org_id)[0].status for org in orgs] == statuses


# --- status ----------------------------------------------------------------------------------


def test_status_rows_show_state_last_check_and_latest_notification(store: Store) -> None:
    store.apply_changes(
        [first_sight(observed(1, balance="500.00")), breach(observed(2), None)], NOW
    )
    store.apply_changes([breach(observed(3), None, status="baseline")], NOW)
    [notification_id] = store.claim_due(worker="a", now=NOW, lease_seconds=60)
    store.mark_failed(notification_id.id, worker="a", error="550 rejected", now=NOW)
    finished = NOW + timedelta(minutes=1)
    cycle_id = store.start_cycle(NOW, shard="0/1")
    store.finish_cycle(cycle_id, finished, orgs_read=3, orgs_failed=0, outcome="ok")

    rows = {row.org_id: row for row in store.status_rows()}

    assert list(rows) == [1, 2, 3]
    assert (rows[1].state, rows[1].breach_count, rows[1].balance) == (
        AlertState.ARMED,
        0,
        Decimal("500.00"),
    )
    assert (rows[1].notification_status, rows[1].last_alert_at) == (None, None)
    assert (rows[2].state, rows[2].breach_count, rows[2].last_alert_at) == (
        AlertState.ALERTED,
        1,
        NOW,
    )
    assert (rows[2].notification_status, rows[2].notification_error) == ("failed", "550 rejected")
    assert (rows[3].notification_status, rows[3].last_alert_at) == ("baseline", None)
    assert {row.last_checked_at for row in rows.values()} == {finished}
    assert rows[2].threshold == Decimal("100.00") and rows[2].enabled is True


def test_a_change_the_database_or_a_check_refuses_fails_its_org_only(store: Store) -> None:
    orgs = [observed(org_id) for org_id in range(1, 41)]
    store.apply_changes([first_sight(org) for org in orgs], NOW)
    # Org 17: a notification that cannot be new (refused before the database sees it). Org 23:
    # a balance of 200,001 digits, more than PostgreSQL's NUMERIC holds (SQLite stores text).
    changes = [breach(org, ARMED, status="sent" if org.org_id == 17 else "pending") for org in orgs]
    changes[22] = breach(observed(23, balance="1E+200000"), ARMED)

    result = store.apply_changes(changes, NOW)

    refused = {17, 23} if store.engine.dialect.name == "postgresql" else {17}
    assert set(result.failed) == refused
    assert "cannot have status 'sent'" in result.failed[17]
    assert result.applied == frozenset(range(1, 41)) - refused
    assert (result.written, len(result.notifications)) == (40 - len(refused),) * 2
    states = store.load_states()
    for org_id in range(1, 41):
        expected = ARMED if org_id in refused else StoredState(AlertState.ALERTED, 1)
        assert states[org_id].stored == expected, org_id
        assert len(store.notifications_for(org_id)) == (org_id not in refused)


def test_a_database_that_fails_every_batch_fails_the_write_without_halving_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    orgs = [observed(org_id) for org_id in range(1, 41)]
    calls = []

    def unusable(connection, batch, now):
        calls.append(len(batch))
        raise OperationalError("INSERT ...", {}, Exception("could not connect to server"))

    monkeypatch.setattr(store, "_apply_batch", unusable)
    with pytest.raises(DatabaseError, match="could not connect"):
        store.apply_changes([first_sight(org) for org in orgs], NOW)
    assert calls == [40]

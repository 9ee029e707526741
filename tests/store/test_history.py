"""The balance history on SQLite and PostgreSQL: recording, reading, downsampling, pruning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from poller.engine.forecast import Point
from poller.store import (
    MIGRATIONS_LOCATION,
    Store,
    create_configured_engine,
    open_database,
    upgrade_database,
)
from poller.store.history import History
from poller.store.schema import org_state

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


RETENTION = timedelta(days=30)


def history(store: Store) -> History:
    return History(store)


def record_every(
    h: History, org_id: int, start: datetime, end: datetime, step: timedelta, balance: int = 10_000
) -> None:
    moment = start
    while moment <= end:
        h.record([(org_id, Decimal(balance))], moment)
        balance -= 1
        moment += step


def all_points(h: History, org_id: int) -> list[Point]:
    return h.series([org_id], since=NOW - timedelta(days=400)).get(org_id, [])


def test_recording_the_same_moment_twice_keeps_one_point(store: Store) -> None:
    h = history(store)
    h.record([(1, Decimal("10.50")), (2, Decimal("-3"))], NOW)
    h.record([(1, Decimal("10.50"))], NOW)
    assert all_points(h, 1) == [Point(NOW, Decimal("10.50"))]
    assert all_points(h, 2) == [Point(NOW, Decimal("-3"))]


def test_a_series_starts_with_the_last_point_before_the_window_however_old(store: Store) -> None:
    h = history(store)
    h.record([(1, Decimal(900))], NOW - timedelta(days=20))
    h.record([(1, Decimal(800))], NOW - timedelta(days=10))
    h.record([(1, Decimal(700))], NOW - timedelta(hours=2))
    h.record([(2, Decimal(5))], NOW - timedelta(hours=1))
    series = h.series([1], since=NOW - timedelta(days=7))
    assert series == {
        1: [
            Point(NOW - timedelta(days=10), Decimal(800)),
            Point(NOW - timedelta(hours=2), Decimal(700)),
        ]
    }


def test_points_older_than_48_hours_keep_only_the_last_of_each_hour(store: Store) -> None:
    h = history(store)
    record_every(h, 1, NOW - timedelta(hours=52), NOW, timedelta(minutes=15))

    h.maintain(NOW, RETENTION)

    points = all_points(h, 1)
    cutoff = NOW - timedelta(hours=48)
    old = [point for point in points if point.at < cutoff]
    recent = [point for point in points if point.at >= cutoff]
    assert [point.at.minute for point in old] == [45, 45, 45, 45]
    assert len(recent) == 48 * 4 + 1  # untouched
    # Again at the same moment: nothing new to do.
    h.maintain(NOW, RETENTION)
    assert all_points(h, 1) == points
    # A minute later the 12:00 point of two days ago is old, and 12:15 supersedes it.
    h.maintain(NOW + timedelta(minutes=1), RETENTION)
    assert cutoff not in [point.at for point in all_points(h, 1)]
    assert len(all_points(h, 1)) == len(points) - 1


def test_points_older_than_the_retention_are_deleted(store: Store) -> None:
    h = History(store)
    for days in (12, 11, 9, 1):
        h.record([(1, Decimal(days))], NOW - timedelta(days=days))
    h.maintain(NOW, timedelta(days=10))
    assert [point.balance for point in all_points(h, 1)] == [Decimal(9), Decimal(1)]


def test_db_upgrade_from_0001_keeps_existing_notifications(database_url: str) -> None:
    engine = create_configured_engine(database_url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", MIGRATIONS_LOCATION)
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            org_state.insert().values(
                org_id=1,
                name="Org",
                enabled=True,
                threshold=Decimal(1000),
                balance=Decimal(5),
                state="alerted",
                breach_count=1,
                first_seen_at=NOW,
                changed_at=NOW,
            )
        )
        connection.execute(
            text(
                "INSERT INTO notification (org_id, breach_number, kind, org_name, recipients, "
                "subject, balance, threshold, detected_at, status, next_attempt_at, created_at, "
                "updated_at) VALUES (1, 1, 'low_credits', 'Org', '[]', 'Low', '5', '1000', "
                ":now, 'sent', :now, :now, :now)"
            ),
            {"now": NOW},
        )
    engine.dispose()

    assert upgrade_database(database_url)[0] == "0001"

    store = open_database(database_url)
    try:
        [row] = store.notifications_for(1)
        assert (row.kind, row.burn_per_day, row.runs_out_at) == ("low_credits", None, None)
    finally:
        store.close()

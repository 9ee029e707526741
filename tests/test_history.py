"""The balance history on SQLite and PostgreSQL: recording, reading, downsampling, pruning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from poller.forecast import Point
from poller.history import History
from poller.store import Store

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def history(store: Store) -> History:
    return History(store, retention=timedelta(days=30))


def record_every(h: History, org_id: int, start: datetime, end: datetime, step: timedelta,
                 balance: int = 10_000) -> None:
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
    assert series == {1: [Point(NOW - timedelta(days=10), Decimal(800)),
                          Point(NOW - timedelta(hours=2), Decimal(700))]}


def test_points_older_than_48_hours_keep_only_the_last_of_each_hour(store: Store) -> None:
    h = history(store)
    record_every(h, 1, NOW - timedelta(hours=52), NOW, timedelta(minutes=15))

    h.maintain(NOW)

    points = all_points(h, 1)
    cutoff = NOW - timedelta(hours=48)
    old = [point for point in points if point.at < cutoff]
    recent = [point for point in points if point.at >= cutoff]
    assert [point.at.minute for point in old] == [45, 45, 45, 45]
    assert len(recent) == 48 * 4 + 1  # untouched
    # Again at the same moment: nothing new to do.
    h.maintain(NOW)
    assert all_points(h, 1) == points
    # A minute later the 12:00 point of two days ago is old, and 12:15 supersedes it.
    h.maintain(NOW + timedelta(minutes=1))
    assert cutoff not in [point.at for point in all_points(h, 1)]
    assert len(all_points(h, 1)) == len(points) - 1


def test_points_older_than_the_retention_are_deleted(store: Store) -> None:
    h = History(store, retention=timedelta(days=10))
    for days in (12, 11, 9, 1):
        h.record([(1, Decimal(days))], NOW - timedelta(days=days))
    h.maintain(NOW)
    assert [point.balance for point in all_points(h, 1)] == [Decimal(9), Decimal(1)]

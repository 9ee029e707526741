"""The per-organization balance history: recorded by the cycle, read by the forecasts.

Compact and bounded:

- a point is recorded only when an organization's balance changed since the last cycle (or it
  is seen for the first time), so an unchanged cycle writes no history at all; between two
  points the balance is known to have stayed put (``poller.engine.forecast`` carries it forward);
- points older than ``RAW_PERIOD`` (48 h) are downsampled to the last point of each hour;
- points older than ``history_retention_days`` are deleted.

Downsampling and pruning run after a cycle's writes, only when an index lookup finds work
(points that crossed the 48 h or the retention line since the last run), in transactions of
at most ``MAINTENANCE_BATCH`` rows and at most ``MAINTENANCE_MAX_BATCHES`` per run, so
neither holds a lock for long or makes one cycle slow; a backlog is worked off over the
following cycles.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import (
    BigInteger,
    Integer,
    and_,
    bindparam,
    delete,
    exists,
    func,
    select,
    true,
    update,
)
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.expression import Executable

from poller.engine.forecast import Point
from poller.store.jsonrows import JsonRows, among_orgs

if TYPE_CHECKING:
    from poller.store.states import StateWrites
from poller.store.schema import Money, UTCDateTime, balance_history

log = structlog.get_logger(__name__)

RAW_PERIOD = timedelta(hours=48)
MAINTENANCE_BATCH = 5000
MAINTENANCE_MAX_BATCHES = 20

_POINTS = JsonRows("points", {"org_id": BigInteger(), "balance": Money()})


def _record_statement(store: StateWrites) -> Insert:
    """One INSERT per batch of points, all observed at :now (see JsonRows for why)."""
    points = _POINTS.table(store.engine.dialect)
    values = select(
        points.c.org_id,
        bindparam("now", type_=UTCDateTime),
        bindparam("hour", type_=Integer),
        points.c.balance,
        true(),
    ).where(true())  # for SQLite: where the SELECT ends and the ON CONFLICT begins
    return (
        store.dialect_insert(balance_history)
        .from_select(["org_id", "observed_at", "hour", "balance", "raw"], values)
        .on_conflict_do_nothing(
            index_elements=[balance_history.c.org_id, balance_history.c.observed_at]
        )
    )


def hour_of(moment: datetime) -> int:
    return int(moment.timestamp() // 3600)


class History:
    """Reads and writes ``balance_history`` through the store's engine."""

    def __init__(self, store: StateWrites) -> None:
        self._store = store

    def record(self, balances: Sequence[tuple[int, Decimal]], now: datetime) -> None:
        """One point per (org, balance) seen at ``now``; the same org and moment twice: one."""
        if not balances:
            return
        statement = _record_statement(self._store)

        def record(batch: Sequence[tuple[int, Decimal]]) -> None:
            with (
                self._store.database_errors("recording balance history"),
                self._store.engine.begin() as connection,
            ):
                connection.execute(
                    statement,
                    _POINTS.bind(connection.dialect, batch) | {"now": now, "hour": hour_of(now)},
                )

        self._store.write_batches(balances, record)

    def series(self, org_ids: Iterable[int] | None, *, since: datetime) -> dict[int, list[Point]]:
        """Each org's points from ``since`` on, oldest first, after the last point before it.

        The point before ``since`` is the balance when the window opened, however old it is
        (an org whose balance sat still has no newer one). ``org_ids`` None means every org.
        """
        points: dict[int, list[Point]] = defaultdict(list)
        columns = (
            balance_history.c.org_id,
            balance_history.c.observed_at,
            balance_history.c.balance,
        )
        dialect = self._store.engine.dialect
        chosen = None if org_ids is None else sorted(set(org_ids))
        # Both statements pick the same orgs, so they take the same parameters.
        before, parameters = among_orgs(
            select(
                balance_history.c.org_id,
                func.max(balance_history.c.observed_at).label("observed_at"),
            ).where(balance_history.c.observed_at < since),
            balance_history.c.org_id,
            dialect,
            chosen,
        )
        last_before = before.group_by(balance_history.c.org_id).subquery()
        anchors = select(*columns).join(
            last_before,
            and_(
                last_before.c.org_id == balance_history.c.org_id,
                last_before.c.observed_at == balance_history.c.observed_at,
            ),
        )
        recent, _ = among_orgs(
            select(*columns).where(balance_history.c.observed_at >= since),
            balance_history.c.org_id,
            dialect,
            chosen,
        )
        with (
            self._store.database_errors("reading balance history"),
            self._store.reader.connect() as connection,
        ):
            rows = [
                *connection.execute(anchors, parameters),
                *connection.execute(recent, parameters),
            ]
        for row in sorted(rows, key=lambda row: (row.org_id, row.observed_at)):
            points[row.org_id].append(Point(row.observed_at, row.balance))
        return dict(points)

    def maintain(self, now: datetime, retention: timedelta) -> None:
        """Downsample and prune what is due; an index lookup each when nothing is."""
        raw_cutoff, prune_cutoff = now - RAW_PERIOD, now - retention
        due = select(
            exists().where(balance_history.c.raw, balance_history.c.observed_at < raw_cutoff),
            exists().where(balance_history.c.observed_at < prune_cutoff),
        )
        with (
            self._store.database_errors("reading balance history"),
            self._store.reader.connect() as connection,
        ):
            downsample_due, prune_due = connection.execute(due).one()
        downsampled = self._downsample(raw_cutoff) if downsample_due else 0
        pruned = self._prune(prune_cutoff) if prune_due else 0
        if downsampled or pruned:
            log.info("history.maintained", downsampled=downsampled, pruned=pruned)

    def _downsample(self, cutoff: datetime) -> int:
        """Raw points older than cutoff: drop all but the last of each (org, hour)."""
        later = balance_history.alias("later")
        superseded = (
            select(balance_history.c.id)
            .where(
                balance_history.c.raw,
                balance_history.c.observed_at < cutoff,
                exists().where(
                    later.c.org_id == balance_history.c.org_id,
                    later.c.hour == balance_history.c.hour,
                    later.c.observed_at > balance_history.c.observed_at,
                ),
            )
            .limit(MAINTENANCE_BATCH)
            .scalar_subquery()
        )
        deleted = self._in_batches(
            delete(balance_history).where(balance_history.c.id.in_(superseded)),
            "downsampling balance history",
        )
        # What is left of the old raw points is the hourly series: never look at it again.
        settled = (
            select(balance_history.c.id)
            .where(balance_history.c.raw, balance_history.c.observed_at < cutoff)
            .limit(MAINTENANCE_BATCH)
            .scalar_subquery()
        )
        self._in_batches(
            update(balance_history).where(balance_history.c.id.in_(settled)).values(raw=False),
            "downsampling balance history",
        )
        return deleted

    def _prune(self, cutoff: datetime) -> int:
        expired = (
            select(balance_history.c.id)
            .where(balance_history.c.observed_at < cutoff)
            .limit(MAINTENANCE_BATCH)
            .scalar_subquery()
        )
        return self._in_batches(
            delete(balance_history).where(balance_history.c.id.in_(expired)),
            "pruning balance history",
        )

    def _in_batches(self, statement: Executable, action: str) -> int:
        total = 0
        for _ in range(MAINTENANCE_MAX_BATCHES):
            with self._store.database_errors(action), self._store.engine.begin() as connection:
                count = connection.execute(statement).rowcount
            total += count
            if count < MAINTENANCE_BATCH:
                break
        return total

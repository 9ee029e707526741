"""Alert-state writes: load every org's stored state, write a cycle's changes in batches.

Every state write is conditional on the state the cycle loaded (``UPDATE ... WHERE state =
:expected AND breach_count = :expected``, or an INSERT that does nothing when the org exists),
and the outbox rows go in the same transaction only when that write hit: two pollers that
loaded the same state produce one notification (docs/architecture.md, "Exactly once").
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import structlog
from sqlalchemy import (
    Connection,
    Dialect,
    Engine,
    Integer,
    Text,
    bindparam,
    func,
    literal,
    select,
    true,
    type_coerce,
    update,
)
from sqlalchemy.sql.dml import Insert, Update

from poller.engine.forecast import Point
from poller.engine.model import (
    NEW_STATUSES,
    AlertState,
    ApplyResult,
    CycleWrites,
    NewNotification,
    NoticeState,
    NotificationStatus,
    ObservedOrg,
    StateChange,
    StoredRow,
    StoredState,
    describe_failure,
    one_line,
)
from poller.store.database import Connected, DatabaseError, DialectInsert, row_specific
from poller.store.history import History
from poller.store.jsonrows import JsonRows, among_orgs, batches, column_types
from poller.store.notice_states import NoticeStates
from poller.store.schema import UTCDateTime, notification, org_state

log = structlog.get_logger(__name__)

# Rows per write transaction: big enough to amortize commits, small enough that a concurrent
# poller (or `poller status`) never waits long for the SQLite write lock.
BATCH_SIZE = 2000
# PostgreSQL writes this many batches at a time, each in its own transaction on its own
# connection, so the server works on each in a process of its own. SQLite has one writer.
PARALLEL_WRITES = 2
# PostgreSQL SQLSTATE of a transaction aborted to break a deadlock.
DEADLOCK_DETECTED = "40P01"
Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class _BatchResult:
    written: int
    notifications: list[int]
    conflicts: int
    applied: set[int]


_OBSERVED_COLUMNS = ("org_id", "name", "enabled", "threshold", "balance")
_NEW_ORGS = JsonRows(
    "new_orgs",
    column_types(org_state, *_OBSERVED_COLUMNS, "state", "breach_count", "last_alert_at"),
)
# An org's new row (the columns of _NEW_ORGS), then the state it must still hold (the guard).
_TRANSITIONS = JsonRows(
    "transitions",
    _NEW_ORGS.columns
    | {"expected_state": org_state.c.state.type, "expected_breach_count": Integer()},
)
_REFRESHES = JsonRows("refreshes", column_types(org_state, *_OBSERVED_COLUMNS))
_ERRORS = JsonRows("errors", column_types(org_state, "org_id", "last_error"))
_OUTBOX = JsonRows(
    "notifications",
    column_types(
        notification,
        "org_id",
        "breach_number",
        "kind",
        "org_name",
        "recipients",
        "subject",
        "balance",
        "threshold",
        "auto_refill",
        "burn_per_day",
        "runs_out_at",
        "detected_at",
        "status",
    ),
)


@dataclass(frozen=True)
class _Writes:
    """The cycle's batched write statements for one dialect (built once per store)."""

    insert_orgs: Insert
    transition: Update
    refresh: Update
    add_notifications: Insert
    record_errors: Update

    @classmethod
    def build(cls, dialect: Dialect, dialect_insert: DialectInsert) -> _Writes:
        now = bindparam("now", type_=UTCDateTime)
        new = _NEW_ORGS.table(dialect)
        # SQLite needs a WHERE to tell where an INSERT's SELECT ends and its ON CONFLICT begins.
        insert_orgs = (
            dialect_insert(org_state)
            .from_select(
                [*new.c.keys(), "first_seen_at", "changed_at"],
                select(*new.c, now, now).where(true()),
            )
            .on_conflict_do_nothing(index_elements=[org_state.c.org_id])
            .returning(org_state.c.org_id)
        )
        moved = _TRANSITIONS.table(dialect)
        transition = (
            update(org_state)
            .where(
                org_state.c.org_id == moved.c.org_id,
                org_state.c.state == moved.c.expected_state,
                org_state.c.breach_count == moved.c.expected_breach_count,
            )
            .values(
                **{name: moved.c[name] for name in _OBSERVED_COLUMNS[1:]},
                state=moved.c.state,
                breach_count=moved.c.breach_count,
                # Only a real alert moves last_alert_at; a re-arm or baseline keeps it.
                last_alert_at=func.coalesce(moved.c.last_alert_at, org_state.c.last_alert_at),
                changed_at=now,
                last_error=None,
                last_error_at=None,
            )
            .returning(org_state.c.org_id)
        )
        observed = _REFRESHES.table(dialect)
        refresh = (
            update(org_state)
            .where(org_state.c.org_id == observed.c.org_id)
            .values(
                **{name: observed.c[name] for name in _OBSERVED_COLUMNS[1:]},
                changed_at=now,
                last_error=None,
                last_error_at=None,
            )
        )
        notices = _OUTBOX.table(dialect)
        add_notifications = (
            dialect_insert(notification)
            .from_select(
                [*notices.c.keys(), "attempts", "next_attempt_at", "created_at", "updated_at"],
                select(*notices.c, literal(0), now, now, now).where(true()),
            )
            .on_conflict_do_nothing(
                index_elements=[
                    notification.c.org_id,
                    notification.c.kind,
                    notification.c.breach_number,
                ]
            )
            .returning(notification.c.id)
        )
        failed = _ERRORS.table(dialect)
        record_errors = (
            update(org_state)
            .where(org_state.c.org_id == failed.c.org_id)
            .values(last_error=failed.c.last_error, last_error_at=now)
        )
        return cls(insert_orgs, transition, refresh, add_notifications, record_errors)


def _observed_row(observed: ObservedOrg) -> tuple[Any, ...]:
    """The values of _OBSERVED_COLUMNS, in that order."""
    return (observed.org_id, observed.name, observed.enabled, observed.threshold, observed.balance)


def _new_state_row(change: StateChange) -> tuple[Any, ...]:
    """The values of _NEW_ORGS's columns, in that order."""
    return (
        *_observed_row(change.observed),
        change.new.state.value,
        change.new.breach_count,
        _alert_time(change),
    )


def _alert_time(change: StateChange) -> datetime | None:
    """When a real alert (not a first-sight baseline) was raised by this change, if one was."""
    new = change.notification
    return None if new is None or new.status == NotificationStatus.BASELINE else new.detected_at


class StateWrites(Connected):
    """The cycle's reads and writes of org_state, notice_state, the outbox and history."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._writes = _Writes.build(engine.dialect, self.dialect_insert)

    def load_states(self, org_ids: Collection[int] | None = None) -> dict[int, StoredRow]:
        """Every org's stored row (a full cycle), or just those of ``org_ids`` (due reads)."""
        # Money is read as the driver hands it over (text on SQLite, a Decimal from psycopg2)
        # and made a Decimal below: Money's per-value result hook cost more than the conversion.
        query = select(
            org_state.c.org_id,
            org_state.c.state,
            org_state.c.breach_count,
            org_state.c.name,
            org_state.c.enabled,
            type_coerce(org_state.c.threshold, Text),
            type_coerce(org_state.c.balance, Text),
            org_state.c.last_error,
        )
        query, parameters = among_orgs(query, org_state.c.org_id, self.engine.dialect, org_ids)
        # At 100,000 orgs every object per row counts: the few distinct states and thresholds
        # are shared (both immutable) instead of held once per org, and rows are unpacked as
        # tuples (attribute access on each row is slower).
        states: dict[tuple[str, int], StoredState] = {}
        thresholds: dict[Any, Decimal] = {}
        loaded: dict[int, StoredRow] = {}
        with self.database_errors("loading alert states"), self.reader.connect() as connection:
            # Streamed in partitions: PostgreSQL through a server-side cursor (psycopg2 would
            # otherwise hold every row at once), and a partition at a time because
            # SQLAlchemy's row-by-row iteration calls fetchone.
            streamed = connection.execution_options(yield_per=2000).execute(query, parameters)
            for rows in streamed.partitions():
                for org_id, state, breach_count, name, enabled, threshold, balance, error in rows:
                    stored = states.get((state, breach_count))
                    if stored is None:
                        stored = states[state, breach_count] = StoredState(
                            AlertState(state), breach_count
                        )
                    shared_threshold = thresholds.get(threshold)
                    if shared_threshold is None:
                        shared_threshold = thresholds[threshold] = Decimal(threshold)
                    loaded[org_id] = StoredRow(
                        org_id, stored, name, enabled, shared_threshold, Decimal(balance), error
                    )
        return loaded

    def write_batches(
        self, items: Sequence[Item], write: Callable[[Sequence[Item]], Result]
    ) -> list[Result]:
        """``write(batch)`` for each BATCH_SIZE slice of ``items``; the results in batch order.

        ``write`` opens its own transaction, and no batch may depend on another's: on
        PostgreSQL they run PARALLEL_WRITES at a time, on connections of their own. After a
        failure no further batch starts, and the error is raised once the running ones end.
        """
        parts = list(batches(items, BATCH_SIZE))
        if self.engine.dialect.name != "postgresql" or len(parts) < 2:
            return [write(batch) for batch in parts]
        results: list[Result] = []
        with ThreadPoolExecutor(PARALLEL_WRITES, thread_name_prefix="poller-write") as pool:
            for group in batches(parts, PARALLEL_WRITES):
                results += pool.map(write, group)
        return results

    def apply_changes(self, changes: Sequence[StateChange], now: datetime) -> ApplyResult:
        """Write changes in batches; a change whose expected state no longer holds is skipped.

        At most one change per org: a batch's writes tell which orgs they hit by org id. A
        change that cannot be written on its own account (a value the database or a bind
        processor refuses) fails only its org, reported in ``failed``; a database that cannot
        be used at all raises DatabaseError as before.
        """
        if len({change.observed.org_id for change in changes}) != len(changes):
            raise ValueError("apply_changes takes at most one change per organization")
        written = conflicts = 0
        notification_ids: list[int] = []
        applied: set[int] = set()
        failed: dict[int, str] = {}
        # Sorted by org id, two pollers writing overlapping orgs mostly meet in the same batch
        # ranges. Within one statement PostgreSQL locks rows in its own join order, so a
        # deadlock stays possible: its victim's batch is run again whole (below).
        ordered = sorted(changes, key=lambda change: change.observed.org_id)

        def write(batch: Sequence[StateChange]) -> tuple[list[_BatchResult], dict[int, str]]:
            return self.write_isolating(
                batch,
                lambda part: self._apply_batch_retrying(part, now),
                lambda change: change.observed.org_id,
            )

        for results, batch_failed in self.write_batches(ordered, write):
            failed |= batch_failed
            for result in results:
                written += result.written
                notification_ids += result.notifications
                conflicts += result.conflicts
                applied |= result.applied
        if conflicts:
            log.info("store.conflicts", conflicts=conflicts)
        return ApplyResult(written, notification_ids, conflicts, frozenset(applied), failed)

    def persist(self, writes: CycleWrites, now: datetime) -> ApplyResult:
        """A cycle's writes: alert states with their outbox rows, then notice states with
        theirs, then the history points. An org whose state write failed gets nothing else
        written (it is in ``failed``)."""
        result = self.apply_changes(writes.states, now)
        failed = dict(result.failed)
        notices = [change for change in writes.notices if change.org_id not in failed]
        notice_ids, notice_conflicts, notice_failed = NoticeStates(self).apply(notices, now)
        failed |= notice_failed
        History(self).record(
            [(org_id, balance) for org_id, balance in writes.balances if org_id not in failed], now
        )
        return replace(
            result,
            conflicts=result.conflicts + notice_conflicts,
            failed=failed,
            notices=notice_ids,
        )

    def load_notice_states(self, org_ids: Collection[int] | None = None) -> dict[int, NoticeState]:
        return NoticeStates(self).load(org_ids)

    def last_alerts(self, org_ids: Collection[int] | None = None) -> dict[int, datetime]:
        """When each alerted org's current breach was alerted (orgs with a real alert only)."""
        return NoticeStates(self).last_alerts(org_ids)

    def balance_series(
        self, org_ids: Iterable[int] | None, *, since: datetime
    ) -> dict[int, list[Point]]:
        """Each org's recorded balances from ``since`` on (see History.series)."""
        return History(self).series(org_ids, since=since)

    def maintain_history(self, now: datetime, retention: timedelta) -> None:
        """Downsample and prune the balance history, a bounded amount per call."""
        History(self).maintain(now, retention)

    def write_isolating(
        self,
        batch: Sequence[Item],
        write: Callable[[Sequence[Item]], Result],
        org_id_of: Callable[[Item], int],
    ) -> tuple[list[Result], dict[int, str]]:
        """``write(batch)``, or, when one of its rows makes it fail, each half of it again.

        ``write`` runs one transaction, so a failed one wrote nothing and the halves start
        from the same state. Returns the results of the writes that succeeded and, by org id,
        why each item that fails on its own could not be written. A bad row costs about two
        transactions per halving (some 22 for a full batch); a failure of the database itself
        (see _row_specific) is raised at once, as without this.
        """
        try:
            return [write(batch)], {}
        except Exception as error:
            if not row_specific(error):
                raise
            if len(batch) == 1:
                return [], {org_id_of(batch[0]): describe_failure(error)}
        middle = len(batch) // 2
        first, first_failed = self.write_isolating(batch[:middle], write, org_id_of)
        second, second_failed = self.write_isolating(batch[middle:], write, org_id_of)
        return first + second, first_failed | second_failed

    def _apply_batch_retrying(self, batch: Sequence[StateChange], now: datetime) -> _BatchResult:
        # A deadlock victim's transaction was rolled back whole; running it again is safe
        # because every state write re-checks its guard.
        attempt = 1
        while True:
            try:
                with self.database_errors("saving alert states"), self.engine.begin() as connection:
                    return self._apply_batch(connection, batch, now)
            except DatabaseError as error:
                cause = getattr(error.__cause__, "orig", None)
                if getattr(cause, "pgcode", None) != DEADLOCK_DETECTED or attempt == 3:
                    raise
                log.warning("store.deadlock_retry", attempt=attempt)
                attempt += 1

    def _apply_batch(
        self, connection: Connection, batch: Sequence[StateChange], now: datetime
    ) -> _BatchResult:
        new_orgs = [change for change in batch if change.expected is None]
        transitions = [
            change
            for change in batch
            if change.expected is not None
            and (change.new != change.expected or change.notification is not None)
        ]
        refreshes = [
            change
            for change in batch
            if change.expected is not None
            and change.new == change.expected
            and change.notification is None
        ]
        hit = self._insert_new_orgs(connection, new_orgs, now)
        hit |= self._transition(connection, transitions, now)
        self._refresh_observed(connection, refreshes, now)
        applied = [change for change in (*new_orgs, *transitions) if change.observed.org_id in hit]
        notification_ids = self.add_notifications(
            connection,
            [
                (change.observed.org_id, new)
                for change in applied
                for new in (change.notification, *change.also_notify)
                if new is not None
            ],
            now,
        )
        conflicts = len(new_orgs) + len(transitions) - len(applied)
        return _BatchResult(len(applied) + len(refreshes), notification_ids, conflicts, hit)

    def _insert_new_orgs(
        self, connection: Connection, changes: list[StateChange], now: datetime
    ) -> set[int]:
        """Insert orgs that were not stored; returns the ids of the rows this call created."""
        if not changes:
            return set()
        rows = (_new_state_row(change) for change in changes)
        parameters = _NEW_ORGS.bind(connection.dialect, rows) | {"now": now}
        return set(connection.execute(self._writes.insert_orgs, parameters).scalars())

    def _transition(
        self, connection: Connection, changes: list[StateChange], now: datetime
    ) -> set[int]:
        """The guarded state writes: the ids of the orgs whose row still held the expected state.

        One UPDATE ... FROM for the batch whose WHERE repeats each org's loaded state, so a row
        another poller changed meanwhile is not matched (PostgreSQL re-checks the WHERE on the
        committed row after waiting for the other writer's lock; SQLite serializes writers).
        """
        if not changes:
            return set()
        rows = []
        for change in changes:
            assert change.expected is not None
            rows.append(
                (*_new_state_row(change), change.expected.state.value, change.expected.breach_count)
            )
        parameters = _TRANSITIONS.bind(connection.dialect, rows) | {"now": now}
        return set(connection.execute(self._writes.transition, parameters).scalars())

    def _refresh_observed(
        self, connection: Connection, changes: list[StateChange], now: datetime
    ) -> None:
        """Observed values only, same state: no guard needed, the state columns stay untouched."""
        if not changes:
            return
        rows = (_observed_row(change.observed) for change in changes)
        parameters = _REFRESHES.bind(connection.dialect, rows) | {"now": now}
        connection.execute(self._writes.refresh, parameters)

    def add_notifications(
        self,
        connection: Connection,
        notifications: Sequence[tuple[int, NewNotification]],
        now: datetime,
    ) -> list[int]:
        """Insert (org id, notification) pairs into the outbox in the caller's transaction.

        Returns the ids of the rows inserted. A (org, kind, breach) row that already exists is
        left alone: that happens only if the state was rewound by hand, and the existing row
        stands for the breach.
        """
        if not notifications:
            return []
        for _, new in notifications:
            if new.status not in NEW_STATUSES:
                raise ValueError(f"a new notification cannot have status {new.status!r}")
        rows = (
            (
                org_id,
                new.breach_number,
                new.kind,
                new.org_name,
                list(new.recipients),
                new.subject,
                new.balance,
                new.threshold,
                new.auto_refill,
                new.burn_per_day,
                new.runs_out_at,
                new.detected_at,
                new.status,
            )
            for org_id, new in notifications
        )
        parameters = _OUTBOX.bind(connection.dialect, rows) | {"now": now}
        return list(connection.execute(self._writes.add_notifications, parameters).scalars())

    def record_errors(self, errors: Sequence[tuple[int, str]], now: datetime) -> None:
        """Remember why reading these orgs failed; orgs never stored have no row to note it on."""

        def record(batch: Sequence[tuple[int, str]]) -> None:
            rows = [(org_id, one_line(error)) for org_id, error in batch]
            with self.database_errors("recording org errors"), self.engine.begin() as connection:
                connection.execute(
                    self._writes.record_errors,
                    _ERRORS.bind(connection.dialect, rows) | {"now": now},
                )

        self.write_batches(errors, record)

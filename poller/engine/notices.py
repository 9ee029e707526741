"""The optional notices beside the main alert: runway alert, reminders, recovery notice.

Each is off by default and never changes the main alert (``poller.engine.rule``):

- **runway alert** (``runway_days``): its own armed/alerted state and breach counter. Armed,
  notifications on, a meaningful forecast and fewer than ``runway_days`` days to zero →
  alerted, one email for that runway breach. Alerted and a top-up (the balance rose) that
  leaves no forecast below ``runway_days`` → armed again.
- **reminder** (``remind_every``): while the main alert stays alerted after a real alert
  (not a ``--baseline`` record), one reminder when ``remind_every`` has passed since the
  alert or the previous reminder. Reminders are numbered per organization; the number is the
  outbox row's sequence, so (org, 'reminder', number) is unique.
- **recovery notice** (``recovery_notice``): one email when an alerted org is re-armed by a
  top-up; written with the re-arm itself (``StateChange.also_notify``), numbered by the breach
  it ends.

Runway and reminder state live in ``notice_state`` (a row appears with an org's first
notice). Its writes are guarded like the main state: ``UPDATE ... WHERE`` the values the cycle
loaded, or an INSERT that does nothing if the row exists, with the outbox row in the same
transaction only when that write hit. Two pollers therefore record one notice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy import BigInteger, Column, Connection, Integer, String, Table, select, update

from poller.engine.forecast import Forecast
from poller.engine.rule import AlertState
from poller.store.database import (
    NewNotification,
    Store,
    UTCDateTime,
    metadata,
    org_state,
)

log = structlog.get_logger(__name__)

notice_state = Table(
    "notice_state",
    metadata,
    Column("org_id", BigInteger, primary_key=True, autoincrement=False),
    Column("runway_state", String(16), nullable=False),
    Column("runway_breaches", Integer, nullable=False),
    Column("reminders", Integer, nullable=False),
    Column("reminded_at", UTCDateTime),
    Column("changed_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class NoticeState:
    runway: AlertState
    runway_breaches: int
    reminders: int
    reminded_at: datetime | None


NOTICE_INITIAL = NoticeState(AlertState.ARMED, 0, 0, None)


@dataclass(frozen=True)
class NoticeChange:
    org_id: int
    expected: NoticeState | None  # None: no notice_state row was loaded
    new: NoticeState
    notifications: tuple[NewNotification, ...]  # none for a runway re-arm


def forecast_fields(forecast: Forecast | None) -> dict[str, Any]:
    """burn_per_day and runs_out_at for a notice, when the estimate is worth a sentence.

    A rate without a date means a runway beyond the horizon (see ``mail.runway_phrase``)."""
    if forecast is None or forecast.rate is None or forecast.balance <= 0:
        return {}
    return {"burn_per_day": forecast.rate, "runs_out_at": forecast.runs_out_at}


# --- the decisions (pure) -------------------------------------------------------------


def runway_transition(
    state: NoticeState,
    *,
    enabled: bool,
    forecast: Forecast | None,
    topped_up: bool,
    runway_days: Decimal,
) -> NoticeState | None:
    """The runway alert's next state, or None when it does not change."""
    days = forecast.runway_days if forecast is not None else None
    short = days is not None and days < runway_days
    if state.runway == AlertState.ARMED and enabled and short:
        return replace(state, runway=AlertState.ALERTED, runway_breaches=state.runway_breaches + 1)
    if state.runway == AlertState.ALERTED and topped_up and not short:
        return replace(state, runway=AlertState.ARMED)
    return None


def reminder_due(
    state: NoticeState,
    *,
    alerted: bool,
    enabled: bool,
    last_alert_at: datetime | None,
    every: timedelta,
    now: datetime,
) -> bool:
    """Whether an alerted org is owed a reminder now (at most one per ``every``)."""
    if not alerted or not enabled or last_alert_at is None:
        return False
    since = last_alert_at
    if state.reminded_at is not None and state.reminded_at > since:
        since = state.reminded_at
    return now - since >= every


# --- storage --------------------------------------------------------------------------


class NoticeStore:
    """notice_state reads and the guarded notice writes (with their outbox rows)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def load(self) -> dict[int, NoticeState]:
        query = select(notice_state)
        with (
            self._store.database_errors("loading notice states"),
            self._store.reader.connect() as connection,
        ):
            return {
                row.org_id: NoticeState(
                    AlertState(row.runway_state),
                    row.runway_breaches,
                    row.reminders,
                    row.reminded_at,
                )
                for row in connection.execute(query)
            }

    def last_alerts(self) -> dict[int, datetime]:
        """When each alerted org's current breach was alerted (orgs with a real alert only)."""
        query = select(org_state.c.org_id, org_state.c.last_alert_at).where(
            org_state.c.state == AlertState.ALERTED.value,
            org_state.c.last_alert_at.is_not(None),
        )
        with (
            self._store.database_errors("loading alert times"),
            self._store.reader.connect() as connection,
        ):
            return {row.org_id: row.last_alert_at for row in connection.execute(query)}

    def apply(
        self, changes: Sequence[NoticeChange], now: datetime
    ) -> tuple[list[int], int, dict[int, str]]:
        """Write the changes whose loaded state still holds; (notification ids, conflicts,
        why each org whose own change could not be written failed)."""

        def write(batch: Sequence[NoticeChange]) -> tuple[list[int], int]:
            with (
                self._store.database_errors("saving notices"),
                self._store.engine.begin() as connection,
            ):
                notifications = []
                conflicts = 0
                for change in batch:
                    if not self._write(connection, change, now):
                        conflicts += 1
                        continue
                    notifications += [(change.org_id, new) for new in change.notifications]
                return self._store.add_notifications(connection, notifications, now), conflicts

        def write_isolating(
            batch: Sequence[NoticeChange],
        ) -> tuple[list[tuple[list[int], int]], dict[int, str]]:
            return self._store.write_isolating(batch, write, lambda change: change.org_id)

        ordered = sorted(changes, key=lambda change: change.org_id)
        ids: list[int] = []
        conflicts = 0
        failed: dict[int, str] = {}
        for results, batch_failed in self._store.write_batches(ordered, write_isolating):
            failed |= batch_failed
            for batch_ids, batch_conflicts in results:
                ids += batch_ids
                conflicts += batch_conflicts
        if conflicts:
            log.info("notices.conflicts", conflicts=conflicts)
        return ids, conflicts, failed

    def _write(self, connection: Connection, change: NoticeChange, now: datetime) -> bool:
        values = {
            "runway_state": change.new.runway.value,
            "runway_breaches": change.new.runway_breaches,
            "reminders": change.new.reminders,
            "reminded_at": change.new.reminded_at,
            "changed_at": now,
        }
        if change.expected is None:
            statement = (
                self._store.dialect_insert(notice_state)
                .values(org_id=change.org_id, **values)
                .on_conflict_do_nothing(index_elements=[notice_state.c.org_id])
            )
            return connection.execute(statement).rowcount == 1
        expected = change.expected
        statement = (
            update(notice_state)
            .where(
                notice_state.c.org_id == change.org_id,
                notice_state.c.runway_state == expected.runway.value,
                notice_state.c.runway_breaches == expected.runway_breaches,
                notice_state.c.reminders == expected.reminders,
            )
            .values(values)
        )
        return connection.execute(statement).rowcount == 1

"""notice_state: the optional notices' state, with guarded writes like the alert state's.

A write is ``UPDATE ... WHERE`` the values the cycle loaded, or an INSERT that does nothing if
the row exists, and the notices' outbox rows go in the same transaction only when it hit: two
pollers that loaded the same state record one notice.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Connection, select, update

from poller.engine.model import AlertState, NoticeChange, NoticeState
from poller.store.jsonrows import among_orgs
from poller.store.schema import notice_state, org_state

if TYPE_CHECKING:
    from poller.store.states import StateWrites

log = structlog.get_logger(__name__)


class NoticeStates:
    """notice_state reads and the guarded notice writes (with their outbox rows)."""

    def __init__(self, store: StateWrites) -> None:
        self._store = store

    def load(self, org_ids: Collection[int] | None = None) -> dict[int, NoticeState]:
        """Every org's notice state, or just those of ``org_ids``."""
        query, parameters = among_orgs(
            select(notice_state), notice_state.c.org_id, self._store.engine.dialect, org_ids
        )
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
                for row in connection.execute(query, parameters)
            }

    def last_alerts(self, org_ids: Collection[int] | None = None) -> dict[int, datetime]:
        """When each alerted org's current breach was alerted (orgs with a real alert only)."""
        alerted = select(org_state.c.org_id, org_state.c.last_alert_at).where(
            org_state.c.state == AlertState.ALERTED.value,
            org_state.c.last_alert_at.is_not(None),
        )
        query, parameters = among_orgs(
            alerted, org_state.c.org_id, self._store.engine.dialect, org_ids
        )
        with (
            self._store.database_errors("loading alert times"),
            self._store.reader.connect() as connection,
        ):
            rows = connection.execute(query, parameters)
            return {row.org_id: row.last_alert_at for row in rows}

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
            insert = (
                self._store.dialect_insert(notice_state)
                .values(org_id=change.org_id, **values)
                .on_conflict_do_nothing(index_elements=[notice_state.c.org_id])
            )
            return connection.execute(insert).rowcount == 1
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

"""The outbox as delivery and reporting see it: claims with leases, outcomes, status rows.

A claim is an UPDATE whose WHERE repeats the "claimable" conditions, so only one claimer gets
a row; it is a lease, and a row held by a dead process becomes claimable again when it ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy import (
    JSON,
    Connection,
    Integer,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.sql.dml import Update

from poller.engine.model import (
    AlertState,
    Deliveries,
    NotificationStatus,
    one_line,
)
from poller.store.database import Connected
from poller.store.schema import UTCDateTime, cycle_run, notification, org_state

log = structlog.get_logger(__name__)


# Delivery statements, built once: they run once per email (or per batch).
_CLAIMABLE = and_(
    notification.c.status == NotificationStatus.PENDING,
    notification.c.next_attempt_at <= bindparam("b_now", type_=UTCDateTime),
    or_(
        notification.c.claim_expires_at.is_(None),
        notification.c.claim_expires_at < bindparam("b_now", type_=UTCDateTime),
    ),
)
_DUE = (
    select(notification.c.id)
    .where(_CLAIMABLE)
    .order_by(notification.c.next_attempt_at, notification.c.id)
    .limit(bindparam("b_limit", type_=Integer))
    # PostgreSQL: rows another claimer is taking right now are passed over, so parallel
    # claimers (a poller's SMTP connections) get the next rows instead of all picking the same
    # ones, of which all but one would then get none and stop. SQLite: no such clause (its
    # claims never overlap, BEGIN IMMEDIATE serializes them).
    .with_for_update(skip_locked=True)
)
_CLAIM = (
    update(notification)
    .where(notification.c.id.in_(bindparam("b_ids", expanding=True)), _CLAIMABLE)
    .values(
        claimed_by=bindparam("b_worker"),
        claim_expires_at=bindparam("b_until", type_=UTCDateTime),
        attempts=notification.c.attempts + 1,
        updated_at=bindparam("b_now", type_=UTCDateTime),
    )
    .returning(*notification.c)
)
_HELD_BY_WORKER = and_(
    notification.c.status == NotificationStatus.PENDING,
    notification.c.claimed_by == bindparam("b_worker"),
)
_RENEW = (
    update(notification)
    .where(notification.c.id.in_(bindparam("b_ids", expanding=True)), _HELD_BY_WORKER)
    .values(
        claim_expires_at=bindparam("b_until", type_=UTCDateTime),
        updated_at=bindparam("b_now", type_=UTCDateTime),
    )
    .returning(notification.c.id)
)


def _finish_claim_statement(**values: Any) -> Update:
    """The update that ends a claim (sent, retry later, failed) if the worker still holds it."""
    return (
        update(notification)
        .where(notification.c.id == bindparam("b_id"), _HELD_BY_WORKER)
        .values(
            claimed_by=None,
            claim_expires_at=None,
            updated_at=bindparam("b_now", type_=UTCDateTime),
            **values,
        )
    )


_DELIVERIES = bindparam("b_deliveries", type_=JSON(none_as_null=True))
_MARK_SENT = _finish_claim_statement(
    status=NotificationStatus.SENT,
    message_id=bindparam("b_message_id"),
    sent_at=bindparam("b_now", type_=UTCDateTime),
    last_error=None,
    deliveries=_DELIVERIES,
)
_MARK_RETRY = _finish_claim_statement(
    last_error=bindparam("b_error"),
    next_attempt_at=bindparam("b_next_attempt_at", type_=UTCDateTime),
    deliveries=_DELIVERIES,
)
_MARK_FAILED = _finish_claim_statement(
    status=NotificationStatus.FAILED, last_error=bindparam("b_error"), deliveries=_DELIVERIES
)
# PostgreSQL: this transaction's commit does not wait for the WAL flush (Store._progress_write).
_ASYNC_COMMIT = text("SET LOCAL synchronous_commit = off")


@dataclass(frozen=True)
class NotificationRecord:
    id: int
    org_id: int
    kind: str
    breach_number: int
    org_name: str
    recipients: tuple[str, ...]
    subject: str
    balance: Decimal
    threshold: Decimal
    auto_refill: bool
    detected_at: datetime
    status: str
    attempts: int
    next_attempt_at: datetime
    claimed_by: str | None
    claim_expires_at: datetime | None
    last_error: str | None
    message_id: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    burn_per_day: Decimal | None
    runs_out_at: datetime | None
    deliveries: Deliveries


# What claim_due hands out: a record whose lease the claiming worker now holds.
ClaimedNotification = NotificationRecord


@dataclass(frozen=True)
class StatusRow:
    org_id: int
    name: str
    enabled: bool
    balance: Decimal
    threshold: Decimal
    state: AlertState
    breach_count: int
    # Latest of: the last finished cycle that read orgs, the org's last write, its last error.
    # With sharded cycles the cycle part may belong to another shard.
    last_checked_at: datetime | None
    changed_at: datetime
    last_alert_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    notification_status: str | None  # of the org's latest notification
    notification_error: str | None
    notification_recipients: tuple[str, ...] = ()
    notification_deliveries: Deliveries | None = None


def _record(row: Any) -> NotificationRecord:
    values = dict(row._mapping)
    values["recipients"] = tuple(values["recipients"])
    values["deliveries"] = values["deliveries"] or {}
    return NotificationRecord(**values)


class Outbox(Connected):
    """Delivery's claims and marks, and what `poller status` reads of the outbox."""

    def claim_due(
        self, *, worker: str, now: datetime, lease_seconds: float, limit: int = 100
    ) -> list[ClaimedNotification]:
        """Take a lease on up to ``limit`` due notifications; each row goes to one worker only.

        One SELECT and one UPDATE for the whole batch. Committed durably: that also makes
        every earlier delivery-progress commit durable (see _progress_write).
        """
        until = now + timedelta(seconds=lease_seconds)
        with self.database_errors("claiming notifications"), self.engine.begin() as connection:
            candidates = connection.execute(_DUE, {"b_now": now, "b_limit": limit}).scalars().all()
            if not candidates:
                return []
            # Repeating the conditions makes the UPDATE the arbiter: a concurrent claimer that
            # got a row first leaves it unmatched here (PostgreSQL re-checks the WHERE of each
            # row after the other transaction commits; SQLite serializes writers).
            rows = connection.execute(
                _CLAIM, {"b_ids": candidates, "b_now": now, "b_until": until, "b_worker": worker}
            )
            claimed = {row.id: _record(row) for row in rows}
        return [claimed[row_id] for row_id in candidates if row_id in claimed]

    def renew_claims(
        self, notification_ids: Sequence[int], *, worker: str, now: datetime, until: datetime
    ) -> set[int]:
        """Move the lease of these rows on to ``until``; returns the ids ``worker`` still held.

        A row missing from the answer was taken over by another poller after our lease ran
        out (or finished): it is no longer ours to send.
        """
        if not notification_ids:
            return set()
        values = {
            "b_ids": list(notification_ids),
            "b_worker": worker,
            "b_now": now,
            "b_until": until,
        }
        with self._progress_write("renewing delivery claims") as connection:
            return set(connection.execute(_RENEW, values).scalars())

    def mark_sent(
        self,
        notification_id: int,
        *,
        worker: str,
        message_id: str | None,
        now: datetime,
        deliveries: Deliveries | None = None,
    ) -> bool:
        """Record delivery; False if ``worker`` no longer holds the claim (someone took over)."""
        values = {"b_message_id": message_id, "b_deliveries": deliveries or None}
        return self._finish_claim(
            _MARK_SENT, notification_id, worker, now, values, "marking a notification sent"
        )

    def mark_retry(
        self,
        notification_id: int,
        *,
        worker: str,
        error: str | None,
        next_attempt_at: datetime,
        now: datetime,
        deliveries: Deliveries | None = None,
    ) -> bool:
        """Back to pending until ``next_attempt_at``. ``error``: why the message as a whole
        could not go (not about its recipients); None when only recipients are to retry."""
        values = {
            "b_error": None if error is None else one_line(error),
            "b_next_attempt_at": next_attempt_at,
            "b_deliveries": deliveries or None,
        }
        return self._finish_claim(
            _MARK_RETRY, notification_id, worker, now, values, "scheduling a notification retry"
        )

    def mark_failed(
        self,
        notification_id: int,
        *,
        worker: str,
        error: str,
        now: datetime,
        deliveries: Deliveries | None = None,
    ) -> bool:
        values = {"b_error": one_line(error), "b_deliveries": deliveries or None}
        return self._finish_claim(
            _MARK_FAILED, notification_id, worker, now, values, "marking a notification failed"
        )

    def _finish_claim(
        self,
        statement: Update,
        notification_id: int,
        worker: str,
        now: datetime,
        values: dict[str, Any],
        action: str,
    ) -> bool:
        with self._progress_write(action) as connection:
            parameters = {"b_id": notification_id, "b_worker": worker, "b_now": now, **values}
            return connection.execute(statement, parameters).rowcount == 1

    @contextmanager
    def _progress_write(self, action: str) -> Iterator[Connection]:
        """A transaction recording delivery progress, committed without waiting for the disk.

        SQLite (WAL) commits it with synchronous=NORMAL, PostgreSQL with synchronous_commit
        off: a crash of the process keeps it, only a power loss or a crash of the operating
        system (or of the PostgreSQL server) may forget it, and never what a durable commit
        after it made durable too. What can be forgotten is progress only (a mark, a renewed
        lease): the row goes back to pending and is sent again, with the same Message-ID. The
        notification row itself and every claim are committed durably, so no recorded breach
        can be lost this way; docs/guarantees.md bounds the window. Each email costs one such
        commit, which with an fsync each was most of delivery's time.
        """
        with self.database_errors(action), self.progress.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(_ASYNC_COMMIT)
            yield connection

    # --- reporting ----------------------------------------------------------------------

    def pending_count(self, now: datetime, *, exclude_in_flight: bool = False) -> int:
        """Notifications created by ``now`` and not delivered yet: due, leased or awaiting retry.

        ``exclude_in_flight`` leaves out rows another poller holds a live lease on: they are
        that poller's to deliver (or anyone's once the lease expires), so a `poller once`
        running beside it should not report them as left undone.
        """
        conditions = [
            notification.c.status == NotificationStatus.PENDING,
            notification.c.created_at <= now,
        ]
        if exclude_in_flight:
            conditions.append(
                or_(
                    notification.c.claim_expires_at.is_(None),
                    notification.c.claim_expires_at <= now,
                )
            )
        query = select(func.count()).where(*conditions)
        with (
            self.database_errors("counting pending notifications"),
            self.reader.connect() as connection,
        ):
            return connection.execute(query).scalar_one()

    def held_back(self) -> tuple[int, str | None]:
        """Pending notifications whose last attempt failed for a reason that is not about
        their recipients (server, login, sender, settings), and the latest such reason."""
        held = and_(
            notification.c.status == NotificationStatus.PENDING,
            notification.c.last_error.is_not(None),
        )
        count = select(func.count()).where(held)
        latest = (
            select(notification.c.last_error)
            .where(held)
            .order_by(notification.c.updated_at.desc())
            .limit(1)
        )
        with self.database_errors("counting held notifications"), self.reader.connect() as c:
            return c.execute(count).scalar_one(), c.execute(latest).scalar_one_or_none()

    def requeue_failed(self, now: datetime, org_id: int | None = None) -> tuple[int, int]:
        """Failed notifications, and sent ones with failed recipients, back to pending, due now.

        Each failed recipient is tried again; recipients who have the email keep their outcome.
        Returns (notifications, recipients) requeued.
        """
        candidates = select(
            notification.c.id,
            notification.c.status,
            notification.c.recipients,
            notification.c.deliveries,
        ).where(
            or_(
                notification.c.status == NotificationStatus.FAILED,
                and_(
                    notification.c.status == NotificationStatus.SENT,
                    notification.c.deliveries.is_not(None),
                ),
            ),
            *([notification.c.org_id == org_id] if org_id is not None else []),
        )
        rows = recipients = 0
        with self.database_errors("requeueing notifications"), self.engine.begin() as connection:
            for row in connection.execute(candidates).all():
                deliveries = row.deliveries or {}
                kept = {
                    address: entry
                    for address, entry in deliveries.items()
                    if entry.get("outcome") != "failed"
                }
                if row.status == NotificationStatus.SENT and kept == deliveries:
                    continue  # every recipient has it
                # A failed row from before per-recipient outcomes: all its recipients.
                again = len(deliveries) - len(kept) if deliveries else len(row.recipients)
                requeue = (
                    update(notification)
                    .where(notification.c.id == row.id, notification.c.status == row.status)
                    .values(
                        status=NotificationStatus.PENDING,
                        next_attempt_at=now,
                        attempts=0,
                        last_error=None,
                        deliveries=kept or None,
                        updated_at=now,
                    )
                )
                if connection.execute(requeue).rowcount == 1:
                    rows += 1
                    recipients += again
        return rows, recipients

    def notifications_for(self, org_id: int) -> list[NotificationRecord]:
        query = (
            select(notification).where(notification.c.org_id == org_id).order_by(notification.c.id)
        )
        with self.database_errors("reading notifications"), self.reader.connect() as connection:
            return [_record(row) for row in connection.execute(query)]

    def status_rows(self) -> list[StatusRow]:
        latest_ids = (
            select(notification.c.org_id, func.max(notification.c.id).label("id"))
            .group_by(notification.c.org_id)
            .subquery()
        )
        latest = notification.alias("latest_notification")
        query = (
            select(
                org_state,
                latest.c.status,
                latest.c.last_error.label("notification_error"),
                latest.c.recipients,
                latest.c.deliveries,
            )
            .select_from(
                org_state.outerjoin(
                    latest_ids, latest_ids.c.org_id == org_state.c.org_id
                ).outerjoin(latest, latest.c.id == latest_ids.c.id)
            )
            .order_by(org_state.c.org_id)
        )
        last_cycle = select(func.max(cycle_run.c.finished_at)).where(cycle_run.c.orgs_read > 0)
        with self.database_errors("reading the status"), self.reader.connect() as connection:
            last_cycle_at = connection.execute(last_cycle).scalar_one_or_none()
            return [
                StatusRow(
                    org_id=row.org_id,
                    name=row.name,
                    enabled=row.enabled,
                    balance=row.balance,
                    threshold=row.threshold,
                    state=AlertState(row.state),
                    breach_count=row.breach_count,
                    last_checked_at=_latest(last_cycle_at, row.changed_at, row.last_error_at),
                    changed_at=row.changed_at,
                    last_alert_at=row.last_alert_at,
                    last_error=row.last_error,
                    last_error_at=row.last_error_at,
                    notification_status=row.status,
                    notification_error=row.notification_error,
                    notification_recipients=tuple(row.recipients or ()),
                    notification_deliveries=row.deliveries or {},
                )
                for row in connection.execute(query)
            ]


def _latest(*moments: datetime | None) -> datetime | None:
    known: Iterable[datetime] = [moment for moment in moments if moment is not None]
    return max(known, default=None)

"""The adaptive schedule's work queue (``poller.engine.ports.WorkQueue``) in the database.

One ``read_schedule`` row per listed organization says when its balance is next due and why,
and ``scheduled_job`` rows do the same for named jobs (the listing). A replica claims due
rows with a lease (``claimed_by``, ``claim_expires_at``) in one UPDATE: on PostgreSQL the rows
come from a ``FOR UPDATE SKIP LOCKED`` subquery, so concurrent replicas pass over each other's
rows instead of waiting for them or taking the same ones; on SQLite BEGIN IMMEDIATE makes
writers take turns. A claim whose lease ran out is anyone's, so the reads of a replica that
died go to the others. Writing the next due time releases the claim, and only its holder can.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    Dialect,
    Engine,
    Executable,
    Integer,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.sql.dml import Delete, Insert, Update

from poller.engine.model import (
    BurnRecord,
    DueRead,
    ListingSync,
    Member,
    Organization,
    QueueStats,
    Reschedule,
    ScheduledRead,
    describe_failure,
    utc_now,
)
from poller.engine.schedule import settings_fingerprint
from poller.store.database import DatabaseError, DialectInsert
from poller.store.jsonrows import ORG_IDS, JsonRows, among_orgs, batches, column_types
from poller.store.schema import UTCDateTime, read_schedule, scheduled_job
from poller.store.states import BATCH_SIZE, StateWrites

NEW_ORGANIZATION = "new organization: read at once"
SETTINGS_CHANGED = "settings changed in the listing: read at once"

_LISTED = JsonRows("listed", {"org_id": BigInteger(), "settings": Text(), "organization": Text()})
_Listed = tuple[int, str, str]  # a _LISTED row: org id, settings fingerprint, stored text
_RESCHEDULED = JsonRows(
    "rescheduled",
    column_types(
        read_schedule,
        "org_id",
        "due_at",
        "reason",
        "last_read_at",
        "last_balance",
        "peak_burn",
        "burn_samples",
    ),
)
_NOW = bindparam("now", type_=UTCDateTime)
_UNTIL = bindparam("until", type_=UTCDateTime)
_WORKER = bindparam("worker", type_=Text)


# --- the organization as stored: a JSON document -------------------------------------------


def organization_to_dict(org: Organization) -> dict[str, Any]:
    """The organization as a JSON object (the threshold as its exact decimal text)."""
    return {
        "id": org.id,
        "name": org.name,
        "notify_low_credits": org.notify_low_credits,
        "low_credits_threshold": str(org.low_credits_threshold),
        "send_emails_enabled": org.send_emails_enabled,
        "auto_refill": org.auto_refill,
        "members": [
            {
                "membership_id": member.membership_id,
                "user_id": member.user_id,
                "name": member.name,
                "email": member.email,
                "role": member.role,
                "email_notify_enabled": member.email_notify_enabled,
            }
            for member in org.members
        ],
    }


def organization_from_dict(data: dict[str, Any]) -> Organization:
    return Organization(
        id=data["id"],
        name=data["name"],
        notify_low_credits=data["notify_low_credits"],
        low_credits_threshold=Decimal(data["low_credits_threshold"]),
        send_emails_enabled=data["send_emails_enabled"],
        auto_refill=data["auto_refill"],
        members=tuple(
            Member(
                membership_id=member["membership_id"],
                user_id=member["user_id"],
                name=member["name"],
                email=member["email"],
                role=member["role"],
                email_notify_enabled=member["email_notify_enabled"],
            )
            for member in data["members"]
        ),
    )


def _encoded(org: Organization) -> str:
    """The stored text of an organization: one encoding for one organization, so a listing
    tells an unchanged org by comparing texts (ASCII: exact for any name, NUL included)."""
    return json.dumps(organization_to_dict(org), separators=(",", ":"))


# --- statements -------------------------------------------------------------------------------


def _unclaimed(table: Table) -> ColumnElement[bool]:
    """No live claim on the row at ``now``: never claimed, released, or its lease ran out."""
    return or_(table.c.claimed_by.is_(None), table.c.claim_expires_at <= _NOW)


def _as_json(dialect: Dialect, text: ColumnElement[str]) -> ColumnElement[Any]:
    # PostgreSQL has no implicit text-to-json cast; SQLite's CAST AS JSON would make the text
    # a number (JSON is no type name SQLite knows, so it means NUMERIC affinity).
    return cast(text, JSON) if dialect.name == "postgresql" else text


@dataclass(frozen=True)
class _Statements:
    """The queue's statements for one dialect (built once per store)."""

    claim_reads: Update
    reschedule: Update
    change_settings: Update
    refresh_listed: Update
    insert_listed: Insert
    delete_unlisted: Delete
    claim_job: Insert

    @classmethod
    def build(cls, dialect: Dialect, dialect_insert: DialectInsert) -> _Statements:
        schedule = read_schedule.c
        due = (
            select(schedule.org_id)
            .where(schedule.due_at <= _NOW, _unclaimed(read_schedule))
            .order_by(schedule.due_at)
            .limit(bindparam("limit", type_=Integer))
            # PostgreSQL: rows another replica is claiming right now are passed over, not
            # waited for. SQLite renders no such clause (BEGIN IMMEDIATE serializes claims).
            .with_for_update(skip_locked=True)
        )
        claim_reads = (
            update(read_schedule)
            .where(schedule.org_id.in_(due))
            .values(claimed_by=_WORKER, claim_expires_at=_UNTIL)
            .returning(
                schedule.org_id,
                schedule.due_at,
                schedule.organization,
                schedule.last_read_at,
                schedule.last_balance,
                schedule.peak_burn,
                schedule.burn_samples,
            )
        )
        rows = _RESCHEDULED.table(dialect)
        reschedule = (
            update(read_schedule)
            .where(schedule.org_id == rows.c.org_id, schedule.claimed_by == _WORKER)
            .values(
                **{name: rows.c[name] for name in _RESCHEDULED.columns if name != "org_id"},
                claimed_by=None,
                claim_expires_at=None,
            )
        )
        listed = _LISTED.table(dialect)
        organization = _as_json(dialect, listed.c.organization)
        # The claim goes with the old settings: a replica reading the org now cannot write a
        # due time planned with them over this one.
        change_settings = (
            update(read_schedule)
            .where(schedule.org_id == listed.c.org_id, schedule.settings != listed.c.settings)
            .values(
                due_at=_NOW,
                reason=SETTINGS_CHANGED,
                claimed_by=None,
                claim_expires_at=None,
                settings=listed.c.settings,
                organization=organization,
                listed_at=_NOW,
            )
        )
        refresh_listed = (
            update(read_schedule)
            .where(
                schedule.org_id == listed.c.org_id,
                cast(schedule.organization, Text) != listed.c.organization,
            )
            .values(organization=organization, listed_at=_NOW)
        )
        # SQLite needs a WHERE to tell where an INSERT's SELECT ends and its ON CONFLICT begins.
        insert_listed = (
            dialect_insert(read_schedule)
            .from_select(
                [
                    "org_id",
                    "settings",
                    "organization",
                    "due_at",
                    "reason",
                    "listed_at",
                    "peak_burn",
                    "burn_samples",
                ],
                select(
                    listed.c.org_id,
                    listed.c.settings,
                    organization,
                    _NOW,
                    literal(NEW_ORGANIZATION),
                    _NOW,
                    literal(0.0),
                    literal(0),
                ).where(true()),
            )
            .on_conflict_do_nothing(index_elements=[schedule.org_id])
        )
        delete_unlisted = delete(read_schedule).where(
            schedule.org_id.in_(select(ORG_IDS.table(dialect).c.org_id))
        )
        job = dialect_insert(scheduled_job).values(
            name=bindparam("name"), due_at=_NOW, claimed_by=_WORKER, claim_expires_at=_UNTIL
        )
        # A missing row is due now and inserted claimed; of two processes inserting it, the
        # other one finds the row and its live claim. An existing row is claimed only if due.
        claim_job = job.on_conflict_do_update(
            index_elements=[scheduled_job.c.name],
            set_={"claimed_by": job.excluded.claimed_by, "claim_expires_at": _UNTIL},
            where=and_(scheduled_job.c.due_at <= _NOW, _unclaimed(scheduled_job)),
        ).returning(scheduled_job.c.name)
        return cls(
            claim_reads,
            reschedule,
            change_settings,
            refresh_listed,
            insert_listed,
            delete_unlisted,
            claim_job,
        )


class ReadQueue(StateWrites):
    """The work queue of the adaptive schedule (``poller.engine.ports.WorkQueue``)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._queue = _Statements.build(engine.dialect, self.dialect_insert)

    # --- due reads ------------------------------------------------------------------------

    def claim_due_reads(
        self, worker: str, now: datetime, limit: int, lease: timedelta
    ) -> list[DueRead]:
        """Claim up to ``limit`` due orgs nobody holds a live claim on, earliest due first."""
        if limit <= 0:
            return []
        parameters = {"worker": worker, "now": now, "until": now + lease, "limit": limit}
        with self.database_errors("claiming due reads"), self.engine.begin() as connection:
            rows = connection.execute(self._queue.claim_reads, parameters).all()
            # Read inside the transaction: a row that cannot be read leaves nothing claimed.
            return [
                _due_read(row) for row in sorted(rows, key=lambda row: (row.due_at, row.org_id))
            ]

    def reschedule(self, worker: str, updates: Sequence[Reschedule]) -> int:
        """Each org's next due time, reason and burn record, written and its claim released
        where ``worker`` holds the claim; the number of rows written."""

        def write(batch: Sequence[Reschedule]) -> int:
            rows = [
                (
                    change.org_id,
                    change.due_at,
                    change.reason,
                    change.record.read_at,
                    change.record.balance,
                    change.record.peak,
                    change.record.samples,
                )
                for change in batch
            ]
            with self.database_errors("rescheduling reads"), self.engine.begin() as connection:
                parameters = _RESCHEDULED.bind(connection.dialect, rows) | {"worker": worker}
                return connection.execute(self._queue.reschedule, parameters).rowcount

        # In org id order, as the listing writes: writers that lock rows in one order cannot
        # deadlock each other, as far as PostgreSQL's join takes the rows in the order given.
        return sum(self.write_batches(sorted(updates, key=lambda change: change.org_id), write))

    def scheduled_reads(self, org_ids: Collection[int] | None = None) -> dict[int, ScheduledRead]:
        """Each org's place in the queue (every org's, or those of ``org_ids``). ``claimed_by``
        is set only while the claim is live (its lease not run out by this process's clock):
        an expired claim is a replica that stopped, and its org is anyone's to read."""
        schedule = read_schedule.c
        query, parameters = among_orgs(
            select(
                schedule.org_id,
                schedule.due_at,
                schedule.reason,
                schedule.last_read_at,
                schedule.claimed_by,
                schedule.claim_expires_at,
            ),
            schedule.org_id,
            self.engine.dialect,
            org_ids,
        )
        with self.database_errors("reading the read schedule"), self.reader.connect() as c:
            rows = c.execute(query, parameters).all()
        now = utc_now()
        return {
            row.org_id: ScheduledRead(
                org_id=row.org_id,
                due_at=row.due_at,
                reason=row.reason,
                last_read_at=row.last_read_at,
                claimed_by=(
                    row.claimed_by
                    if row.claim_expires_at is not None and row.claim_expires_at > now
                    else None
                ),
            )
            for row in rows
        }

    # --- the listing ----------------------------------------------------------------------

    def sync_listing(
        self, organizations: Sequence[Organization], now: datetime, *, complete: bool
    ) -> ListingSync:
        """Bring the queue in line with a listing: new orgs due at once, orgs whose settings
        changed due at once (and their claims dropped), the others' stored organization
        rewritten only where it changed. ``complete``: the orgs not listed leave the queue.

        The stored texts are read first and only the orgs whose text differs are sent: most
        listings change a handful of 100,000 orgs. The writes repeat the comparisons in their
        WHERE, so they stay right whatever changed in between.
        """
        listed = {org.id: org for org in organizations}
        new, differing, unlisted = self._compare_listing(listed)

        def write(statements: Sequence[Executable]) -> Callable[[Sequence[_Listed]], int]:
            def write_batch(batch: Sequence[_Listed]) -> int:
                with (
                    self.database_errors("syncing the listing"),
                    self.engine.begin() as connection,
                ):
                    parameters = _LISTED.bind(connection.dialect, batch) | {"now": now}
                    counts = [connection.execute(s, parameters).rowcount for s in statements]
                return counts[0]

            return write_batch

        queue = self._queue
        added = self.write_batches(sorted(new), write([queue.insert_listed]))
        # The refresh after the settings change: it passes over the rows that change wrote.
        changes = write([queue.change_settings, queue.refresh_listed])
        changed = self.write_batches(sorted(differing), changes)
        removed = self._remove(unlisted) if complete else 0
        return ListingSync(added=sum(added), changed=sum(changed), removed=removed)

    def _compare_listing(
        self, listed: dict[int, Organization]
    ) -> tuple[list[_Listed], list[_Listed], list[int]]:
        """The _LISTED rows of the orgs not stored and of those whose stored text differs,
        and the ids of the stored orgs not listed. A settings change changes the text too."""
        query = select(read_schedule.c.org_id, cast(read_schedule.c.organization, Text))
        differing: list[_Listed] = []
        unlisted: list[int] = []
        stored: set[int] = set()
        with self.database_errors("syncing the listing"), self.reader.connect() as connection:
            # Streamed like load_states: the texts are compared a partition at a time.
            streamed = connection.execution_options(yield_per=2000).execute(query)
            for partition in streamed.partitions():
                for org_id, stored_text in partition:
                    org = listed.get(org_id)
                    if org is None:
                        unlisted.append(org_id)
                        continue
                    stored.add(org_id)
                    text = _encoded(org)
                    if text != stored_text:
                        differing.append((org_id, settings_fingerprint(org), text))
        new = [
            (org_id, settings_fingerprint(org), _encoded(org))
            for org_id, org in listed.items()
            if org_id not in stored
        ]
        return new, differing, unlisted

    def _remove(self, org_ids: list[int]) -> int:
        removed = 0
        for batch in batches(sorted(org_ids), BATCH_SIZE):
            with self.database_errors("syncing the listing"), self.engine.begin() as connection:
                parameters = ORG_IDS.bind(connection.dialect, ((org_id,) for org_id in batch))
                removed += connection.execute(self._queue.delete_unlisted, parameters).rowcount
        return removed

    # --- jobs -----------------------------------------------------------------------------

    def claim_job(self, name: str, worker: str, now: datetime, lease: timedelta) -> bool:
        """Take job ``name`` if it is due (a job never run is) and nobody holds a live claim."""
        parameters = {"name": name, "worker": worker, "now": now, "until": now + lease}
        with self.database_errors(f"claiming job {name}"), self.engine.begin() as connection:
            return connection.execute(self._queue.claim_job, parameters).first() is not None

    def finish_job(self, name: str, worker: str, due_at: datetime) -> None:
        """Release the job, due again at ``due_at``, if ``worker`` still holds it
        (``finished_at``: this process's clock)."""
        statement = (
            update(scheduled_job)
            .where(scheduled_job.c.name == name, scheduled_job.c.claimed_by == worker)
            .values(due_at=due_at, finished_at=utc_now(), claimed_by=None, claim_expires_at=None)
        )
        with self.database_errors(f"finishing job {name}"), self.engine.begin() as connection:
            connection.execute(statement)

    # --- health ---------------------------------------------------------------------------

    def queue_stats(self, now: datetime) -> QueueStats:
        schedule = read_schedule.c
        counts = select(func.count(), func.count(schedule.last_read_at))
        overdue = select(func.count(), func.min(schedule.due_at)).where(
            schedule.due_at < _NOW, _unclaimed(read_schedule)
        )
        oldest_reads = (
            select(schedule.last_read_at)
            .where(schedule.last_read_at.is_not(None))
            .order_by(schedule.last_read_at)
            .limit(1)
        )
        with self.database_errors("reading the queue's health"), self.reader.connect() as c:
            organizations, read = c.execute(counts).one()
            overdue_count, oldest_due = c.execute(overdue, {"now": now}).one()
            # The 95th percentile by nearest rank: the row with 5% of the read orgs older.
            offset = read - _nearest_rank(read, 95)
            staleness_at = c.execute(oldest_reads.offset(offset)).scalar() if read else None
        return QueueStats(
            organizations=organizations,
            overdue=overdue_count,
            oldest_overdue_seconds=(
                (now - oldest_due).total_seconds() if oldest_due is not None else 0.0
            ),
            p95_staleness_seconds=(
                (now - staleness_at).total_seconds() if staleness_at is not None else None
            ),
        )

    def next_due(self) -> datetime | None:
        """The earliest due time of any org or job, claimed or not."""
        reads = select(func.min(read_schedule.c.due_at))
        jobs = select(func.min(scheduled_job.c.due_at))
        with self.database_errors("reading the next due time"), self.reader.connect() as c:
            due = [c.execute(reads).scalar(), c.execute(jobs).scalar()]
        return min((moment for moment in due if moment is not None), default=None)

    def fleet_burn(self, min_samples: int) -> float | None:
        """The 90th percentile (nearest rank) of the peak burns of orgs with ``min_samples``
        or more intervals and some burn; None when there is none."""
        schedule = read_schedule.c
        eligible = and_(schedule.burn_samples >= min_samples, schedule.peak_burn > 0)
        count = select(func.count()).where(eligible)
        fastest = select(schedule.peak_burn).where(eligible).order_by(schedule.peak_burn.desc())
        with self.database_errors("reading the fleet's burn"), self.reader.connect() as c:
            orgs = c.execute(count).scalar_one()
            if not orgs:
                return None
            # Counted from the fastest: the sort keeps only the top tenth.
            burn: float = c.execute(
                fastest.limit(1).offset(orgs - _nearest_rank(orgs, 90))
            ).scalar_one()
        return burn


def _nearest_rank(count: int, percentile: int) -> int:
    """The 1-based rank of the ``percentile``-th percentile of ``count`` values, ascending."""
    return max(1, -(-count * percentile // 100))


def _due_read(row: Any) -> DueRead:
    try:
        organization = organization_from_dict(row.organization)
    except (KeyError, TypeError, ValueError, InvalidOperation) as error:
        raise DatabaseError(
            f"org {row.org_id} in the read schedule cannot be read: {describe_failure(error)}"
        ) from None
    # float(): SQLite's RETURNING hands back a whole REAL as an integer.
    record = BurnRecord(row.last_read_at, row.last_balance, float(row.peak_burn), row.burn_samples)
    return DueRead(organization, record)

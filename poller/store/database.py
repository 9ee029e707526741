"""The alert-state store: org states, notification outbox, cycle runs; SQLite or PostgreSQL.

Tables (created and evolved only by the Alembic revisions in poller/store/migrations):

- ``org_state``: one row per organization: the last observed name / enabled / threshold /
  balance, the alert state (armed | alerted) with its breach counter, ``first_seen_at``,
  ``changed_at`` (last time any stored value changed), ``last_alert_at`` (detection time of the
  latest breach that produced a real notification, i.e. not a ``baseline`` one) and
  ``last_error`` / ``last_error_at`` (set only when reading the org failed; any later write of
  the org clears them). A cycle writes only orgs whose values or state changed (see
  ``StoredRow.differs_from``), so an unchanged cycle of 100,000 orgs writes nothing but its
  ``cycle_run`` row.
- ``notification``: the outbox. One row per (org, kind, breach number), enforced by a UNIQUE
  constraint; a partial index on ``next_attempt_at WHERE status = 'pending'`` keeps claims
  proportional to the pending rows, however long the history grows.
- ``cycle_run``: one row per cycle (start, finish, counts, shard, outcome); ``poller status``
  takes "last checked" from it.

Exactly-once-effective notifications: every state write is conditional on the state the cycle
loaded (``UPDATE ... WHERE org_id = :id AND state = :expected AND breach_count = :expected``,
or an INSERT that does nothing when the org already exists), and the outbox row is inserted in
the same transaction only when that write hit the row. Two pollers that loaded the same old
state therefore produce one notification; the loser counts a conflict. Delivery claims a row
with an UPDATE whose WHERE repeats the "claimable" conditions and proceeds only when it
changed the row; the claim is a lease, so a row held by a dead process becomes claimable again.

A cycle's writes go in batches of ``BATCH_SIZE`` orgs, one transaction and one statement per
kind of write each: the batch's rows travel as one JSON parameter (``JsonRows``), the guarded
UPDATE repeats each org's own expected state in its WHERE and returns the ids it hit, and only
those orgs get their outbox rows. PostgreSQL writes two batches at a time (``write_batches``).
A batch that PostgreSQL aborts to break a deadlock is run again whole; its guards make that
safe.

Refinements of the original design, and why:

- Money columns are exact and unconstrained (NUMERIC without precision on PostgreSQL, TEXT on
  SQLite) instead of NUMERIC(14,2): the API documents no format for ``credits_remaining``, and
  rounding it would silently change the amount and make every cycle see a "change".
- Timestamps are stored as UTC and always come back timezone-aware, on both databases.
- On SQLite every write transaction starts with BEGIN IMMEDIATE (reads use a plain BEGIN), so
  concurrent writers wait for the busy timeout instead of failing with "database is locked"
  when a read transaction tries to upgrade to a write. WAL lets readers run during writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    JSON,
    Connection,
    Dialect,
    Engine,
    Integer,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    literal,
    or_,
    select,
    text,
    true,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.types import TypeEngine

from poller.engine.forecast import Point
from poller.engine.model import (
    NEW_STATUSES,
    AlertState,
    ApplyResult,
    CycleWrites,
    Deliveries,
    NewNotification,
    NoticeState,
    ObservedOrg,
    StateChange,
    StoredRow,
    StoredState,
    WordedError,
    describe_failure,
    one_line,
)
from poller.store.history import History
from poller.store.jsonrows import JsonRows, batches
from poller.store.notice_states import NoticeStates
from poller.store.schema import UTCDateTime, cycle_run, notification, org_state

log = structlog.get_logger(__name__)

MIGRATIONS_LOCATION = "poller.store:migrations"
# Rows per write transaction: big enough to amortize commits, small enough that a concurrent
# poller (or `poller status`) never waits long for the SQLite write lock: with one statement
# per batch (JsonRows) 2,000 new orgs take about 20 ms to write.
BATCH_SIZE = 2000
# PostgreSQL writes this many batches at a time, each in its own transaction on its own
# connection: the server works on each in a process of its own, which made the first cycle's
# writes at 100,000 orgs 40% faster on two cores. SQLite has one writer at a time.
PARALLEL_WRITES = 2
SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
# Arbitrary constant naming the PostgreSQL advisory lock that serializes schema changes.
SCHEMA_LOCK_ID = 0x706F6C6C6572  # "poller"
# Execution option telling the SQLite BEGIN hook that a transaction only reads.
_READ_ONLY = "poller_read_only"
# Execution option for the transactions that only record delivery progress (renewed leases,
# sent / retry / failed marks): they commit without waiting for the disk (see
# Store._progress_write for what a power loss can then cost).
_PROGRESS = "poller_delivery_progress"
# PostgreSQL SQLSTATE of a transaction aborted to break a deadlock.
DEADLOCK_DETECTED = "40P01"

Item = TypeVar("Item")
# INSERT with ON CONFLICT, which both dialects spell the same.
DialectInsert = Callable[[Table], postgresql.Insert | sqlite.Insert]
Result = TypeVar("Result")


class SchemaOutdated(Exception):
    """The database schema is not the revision this poller needs (one-line message)."""


class DatabaseError(WordedError):
    """The database could not be opened or used; the message is one line without secrets."""


# Delivery statements, built once: they run once per email (or per batch).
_CLAIMABLE = and_(
    notification.c.status == "pending",
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
    notification.c.status == "pending", notification.c.claimed_by == bindparam("b_worker")
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
    status="sent",
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
    status="failed", last_error=bindparam("b_error"), deliveries=_DELIVERIES
)
# PostgreSQL: this transaction's commit does not wait for the WAL flush (Store._progress_write).
_ASYNC_COMMIT = text("SET LOCAL synchronous_commit = off")


@dataclass(frozen=True)
class _BatchResult:
    written: int
    notifications: list[int]
    conflicts: int
    applied: set[int]


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


def normalize_database_url(url: str) -> URL:
    """Parse a database URL as poller reads it: a bare postgresql:// means psycopg2."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Never echo an unparsable URL: it may hold a password we cannot locate.
        raise DatabaseError(
            "database URL is not valid (expected e.g. sqlite:///poller.db or "
            "postgresql+psycopg2://user@host/dbname)"
        ) from None
    if parsed.drivername == "postgresql":
        # SQLAlchemy 2.1 defaults to psycopg 3; poller ships psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def create_configured_engine(url: str) -> Engine:
    """An engine with the settings the store relies on (SQLite locking and pragmas, pre-ping)."""
    parsed = normalize_database_url(url)
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            return _create_sqlite_engine(parsed)
        if backend == "postgresql":
            return create_engine(parsed, pool_pre_ping=True)
    except (ArgumentError, ImportError, NoSuchModuleError) as error:
        raise DatabaseError(f"cannot use database {_safe_url(parsed)}: {error}") from None
    raise DatabaseError(
        f"unsupported database {_safe_url(parsed)}: use sqlite:/// or postgresql:// URLs"
    )


def _create_sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not url.query.get("uri"):
        parent = Path(database).parent
        if not parent.is_dir():
            raise DatabaseError(
                f"cannot open SQLite database {database}: directory {parent} does not exist"
            )
    # A `?timeout=SECONDS` in the URL (sqlite3's own parameter) overrides the default wait for
    # another process's write lock; connect_args would otherwise silently win over it.
    connect_args = {} if "timeout" in url.query else {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}
    engine = create_engine(url, connect_args=connect_args)

    @event.listens_for(engine, "connect")
    def _configure_connection(dbapi_connection: Any, connection_record: Any) -> None:
        # Let SQLAlchemy's begin hook below emit BEGIN instead of the sqlite3 module, which
        # would start transactions lazily (a SELECT runs outside any transaction).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            journal_mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            cursor.execute("PRAGMA foreign_keys=ON")
            # Every commit reaches the disk before it returns, unless the BEGIN hook below
            # relaxes it for one transaction that only records delivery progress.
            cursor.execute(_SYNCHRONOUS_FULL)
        finally:
            cursor.close()
        connection_record.info[_SYNCHRONOUS] = _SYNCHRONOUS_FULL
        # Only WAL makes NORMAL safe: there a power loss can roll back the last transactions
        # but never corrupt the file. A filesystem without WAL support keeps every commit FULL.
        connection_record.info[_WAL] = journal_mode == "wal"

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # IMMEDIATE takes the write lock up front (waiting up to the busy timeout). A deferred
        # transaction that reads and then writes can instead fail at once with "database is
        # locked" when another writer got there first.
        options = connection.get_execution_options()
        if options.get(_READ_ONLY, False):
            connection.exec_driver_sql("BEGIN")
            return
        # In WAL mode NORMAL skips the fsync at commit; a later FULL commit syncs the log, and
        # with it every transaction before it. Set per transaction (the setting belongs to the
        # pooled connection), only when it changes.
        info = connection.connection.info
        relaxed = options.get(_PROGRESS, False) and info[_WAL]
        wanted = _SYNCHRONOUS_NORMAL if relaxed else _SYNCHRONOUS_FULL
        if info.get(_SYNCHRONOUS) != wanted:
            connection.exec_driver_sql(wanted)
            info[_SYNCHRONOUS] = wanted
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


# Keys in a pooled SQLite connection's info: its synchronous setting, whether it is in WAL mode.
_SYNCHRONOUS = "poller_sqlite_synchronous"
_WAL = "poller_sqlite_wal"
_SYNCHRONOUS_FULL = "PRAGMA synchronous=FULL"
_SYNCHRONOUS_NORMAL = "PRAGMA synchronous=NORMAL"


def _safe_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _row_specific(error: Exception) -> bool:
    """Whether a failed batch may owe its failure to one of its rows rather than the database.

    A refused connection, a lost one, a lock held past the busy timeout, a full disk or a
    deadlock that kept coming back fail every batch alike (OperationalError, InterfaceError):
    halving the batch would only repeat them. Anything else (a value a column or a bind
    processor refuses, a bug in building one row) is worth narrowing down.
    """
    if isinstance(error, MemoryError):
        return False
    if not isinstance(error, DatabaseError):
        return True
    cause = error.__cause__
    if isinstance(cause, DBAPIError) and cause.connection_invalidated:
        return False
    return not isinstance(cause, OperationalError | InterfaceError)


def _describe(error: BaseException, url: URL) -> str:
    cause = getattr(error, "orig", None) or error
    text = one_line(str(cause)) or type(cause).__name__
    if url.password:
        text = text.replace(str(url.password), "***")
    return f"{_safe_url(url)}: {text}"


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", MIGRATIONS_LOCATION)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())


def _lock_schema(connection: Connection) -> None:
    """Serialize schema checks and migrations between processes, until the transaction ends."""
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_ID)))
    # SQLite: the BEGIN IMMEDIATE of this transaction already holds the database's write lock.


def _refuse_unknown_revision(current: str | None, script: ScriptDirectory) -> None:
    if current is None:
        return
    try:
        script.get_revision(current)
    except CommandError:
        raise SchemaOutdated(
            f"database schema is at revision {current}, which this poller does not know "
            f"(it needs {script.get_current_head()}): a newer poller upgraded it; "
            "upgrade poller"
        ) from None


@contextmanager
def _database_errors(url: URL, action: str) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as error:
        raise DatabaseError(f"{action} failed on {_describe(error, url)}") from error
    except CommandError as error:
        detail = one_line(str(error))
        raise DatabaseError(f"{action} failed on {_safe_url(url)}: {detail}") from error


def upgrade_database(url: str) -> tuple[str | None, str]:
    """Migrate the database to the newest schema; returns (revision before, revision after)."""
    engine = create_configured_engine(url)
    script = _script()
    head = script.get_current_head()
    assert head is not None, "poller ships at least one migration"
    try:
        with _database_errors(engine.url, "upgrading the database schema"):
            with engine.begin() as connection:
                _lock_schema(connection)
                current = MigrationContext.configure(connection).get_current_revision()
                _refuse_unknown_revision(current, script)
                if current != head:
                    command.upgrade(_alembic_config(connection), "head")
    finally:
        engine.dispose()
    if current != head:
        log.info("store.schema_upgraded", from_revision=current, to_revision=head)
    return current, head


def open_database(url: str) -> Store:
    """Open the store; an empty database gets the schema, any other revision is refused."""
    engine = create_configured_engine(url)
    script = _script()
    head = script.get_current_head()
    try:
        with _database_errors(engine.url, "opening the database"):
            with engine.begin() as connection:
                _lock_schema(connection)
                current = MigrationContext.configure(connection).get_current_revision()
                _refuse_unknown_revision(current, script)
                if current is None and not inspect(connection).get_table_names():
                    command.upgrade(_alembic_config(connection), "head")
                    log.info("store.schema_created", revision=head)
                elif current != head:
                    raise SchemaOutdated(
                        f"database schema is at revision {current or 'none'}, this poller "
                        f"needs {head}: run `poller db upgrade`"
                    )
    except BaseException:
        engine.dispose()
        raise
    return Store(engine)


def _types(table: Table, *names: str) -> dict[str, TypeEngine[Any]]:
    return {name: table.c[name].type for name in names}


_OBSERVED_COLUMNS = ("org_id", "name", "enabled", "threshold", "balance")
_NEW_ORGS = JsonRows(
    "new_orgs",
    _types(org_state, *_OBSERVED_COLUMNS, "state", "breach_count", "last_alert_at"),
)
# An org's new row (the columns of _NEW_ORGS), then the state it must still hold (the guard).
_TRANSITIONS = JsonRows(
    "transitions",
    _NEW_ORGS.columns
    | {"expected_state": org_state.c.state.type, "expected_breach_count": Integer()},
)
_REFRESHES = JsonRows("refreshes", _types(org_state, *_OBSERVED_COLUMNS))
_ERRORS = JsonRows("errors", _types(org_state, "org_id", "last_error"))
_OUTBOX = JsonRows(
    "notifications",
    _types(
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
    return None if new is None or new.status == "baseline" else new.detected_at


def _record(row: Any) -> NotificationRecord:
    values = dict(row._mapping)
    values["recipients"] = tuple(values["recipients"])
    values["deliveries"] = values["deliveries"] or {}
    return NotificationRecord(**values)


class Store:
    """The few queries the cycle and delivery need; every method is its own transaction(s)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.reader = engine.execution_options(**{_READ_ONLY: True})
        self._progress = engine.execution_options(**{_PROGRESS: True})
        inserts: dict[str, DialectInsert] = {
            "postgresql": postgresql.insert,
            "sqlite": sqlite.insert,
        }
        self.dialect_insert = inserts[engine.dialect.name]
        self._writes = _Writes.build(engine.dialect, self.dialect_insert)

    def close(self) -> None:
        self.engine.dispose()

    def database_errors(self, action: str) -> Any:
        return _database_errors(self.engine.url, action)

    # --- alert states -------------------------------------------------------------------

    def load_states(self) -> dict[int, StoredRow]:
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
        # At 100,000 orgs every object per row counts: the few distinct states and thresholds
        # are shared (both immutable) instead of held once per org, about 40% less memory.
        # Rows are unpacked as tuples: attribute access on each row doubled the time.
        states: dict[tuple[str, int], StoredState] = {}
        thresholds: dict[Any, Decimal] = {}
        loaded: dict[int, StoredRow] = {}
        with self.database_errors("loading alert states"), self.reader.connect() as connection:
            # Streamed in partitions: PostgreSQL through a server-side cursor (psycopg2 would
            # otherwise hold every row at once, about 19 MB more at peak for 100,000 orgs), and
            # a partition at a time because SQLAlchemy's row-by-row iteration calls fetchone.
            streamed = connection.execution_options(yield_per=2000).execute(query)
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

    def load_notice_states(self) -> dict[int, NoticeState]:
        return NoticeStates(self).load()

    def last_alerts(self) -> dict[int, datetime]:
        """When each alerted org's current breach was alerted (orgs with a real alert only)."""
        return NoticeStates(self).last_alerts()

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
            if not _row_specific(error):
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

    # --- cycle runs ---------------------------------------------------------------------

    def start_cycle(self, now: datetime, shard: str | None) -> int:
        statement = cycle_run.insert().values(started_at=now, shard=shard).returning(cycle_run.c.id)
        with self.database_errors("recording the cycle start"), self.engine.begin() as connection:
            return connection.execute(statement).scalar_one()

    def finish_cycle(
        self, cycle_id: int, now: datetime, orgs_read: int, orgs_failed: int, outcome: str
    ) -> None:
        statement = (
            update(cycle_run)
            .where(cycle_run.c.id == cycle_id)
            .values(finished_at=now, orgs_read=orgs_read, orgs_failed=orgs_failed, outcome=outcome)
        )
        with self.database_errors("recording the cycle end"), self.engine.begin() as connection:
            connection.execute(statement)

    # --- delivery -----------------------------------------------------------------------

    def last_successful_run(self) -> tuple[datetime, float] | None:
        """When the latest successful cycle (any process, any replica) finished, and how many
        seconds it took."""
        successful = or_(
            cycle_run.c.outcome == "ok",
            and_(
                cycle_run.c.outcome == "partial",
                or_(cycle_run.c.orgs_read > 0, cycle_run.c.orgs_failed == 0),
            ),
        )
        query = (
            select(cycle_run.c.finished_at, cycle_run.c.started_at)
            .where(successful)
            .order_by(cycle_run.c.finished_at.desc())
            .limit(1)
        )
        # The store's own error wrapping: a database problem is one line, password hidden.
        with self.database_errors("reading the cycle history"), self.engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None
        return row.finished_at, (row.finished_at - row.started_at).total_seconds()

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
        with self.database_errors(action), self._progress.begin() as connection:
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
        conditions = [notification.c.status == "pending", notification.c.created_at <= now]
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
        held = and_(notification.c.status == "pending", notification.c.last_error.is_not(None))
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
                notification.c.status == "failed",
                and_(notification.c.status == "sent", notification.c.deliveries.is_not(None)),
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
                if row.status == "sent" and kept == deliveries:
                    continue  # every recipient has it
                # A failed row from before per-recipient outcomes: all its recipients.
                again = len(deliveries) - len(kept) if deliveries else len(row.recipients)
                requeue = (
                    update(notification)
                    .where(notification.c.id == row.id, notification.c.status == row.status)
                    .values(
                        status="pending",
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

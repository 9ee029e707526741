"""The alert-state store: org states, notification outbox, cycle runs; SQLite or PostgreSQL.

Tables (created and evolved only by the Alembic revisions in poller/migrations):

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

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.sql.dml import Update
from sqlalchemy.types import TypeDecorator, TypeEngine

from poller.rules import AlertState, StoredState

log = structlog.get_logger(__name__)

MIGRATIONS_LOCATION = "poller:migrations"
# Rows per write transaction: big enough to amortize commits, small enough that a concurrent
# poller (or `poller status`) never waits long for the SQLite write lock.
BATCH_SIZE = 500
SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
# Arbitrary constant naming the PostgreSQL advisory lock that serializes schema changes.
SCHEMA_LOCK_ID = 0x706F6C6C6572  # "poller"
# Execution option telling the SQLite BEGIN hook that a transaction only reads.
_READ_ONLY = "poller_read_only"
MAX_ERROR_LENGTH = 500
# PostgreSQL SQLSTATE of a transaction aborted to break a deadlock.
DEADLOCK_DETECTED = "40P01"

Item = TypeVar("Item")

NOTIFICATION_STATUSES = frozenset(
    {"pending", "sent", "failed", "suppressed", "no_recipients", "baseline"}
)


class SchemaOutdated(Exception):
    """The database schema is not the revision this poller needs (one-line message)."""


class DatabaseError(Exception):
    """The database could not be opened or used; the message is one line without secrets."""


class Money(TypeDecorator[Decimal]):
    """An exact Decimal on every backend (see the module docstring)."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String())
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal) or not value.is_finite():
            raise ValueError(f"money must be a finite Decimal, got {value!r}")
        return format(value, "f") if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, also on SQLite (which has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"timestamps must be timezone-aware, got {value!r}")
        value = value.astimezone(UTC)
        # SQLite stores text; dropping the offset keeps every stored value in one sortable form.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

org_state = Table(
    "org_state",
    metadata,
    Column("org_id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("threshold", Money, nullable=False),
    Column("balance", Money, nullable=False),
    Column("state", String(16), nullable=False),
    Column("breach_count", Integer, nullable=False),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("changed_at", UTCDateTime, nullable=False),
    Column("last_alert_at", UTCDateTime),
    Column("last_error", Text),
    Column("last_error_at", UTCDateTime),
)

notification = Table(
    "notification",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("org_id", BigInteger, nullable=False),
    Column("breach_number", Integer, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("org_name", Text, nullable=False),
    Column("recipients", JSON, nullable=False),
    Column("subject", Text, nullable=False),
    Column("balance", Money, nullable=False),
    Column("threshold", Money, nullable=False),
    Column("auto_refill", Boolean, nullable=False),
    Column("detected_at", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("claimed_by", Text),
    Column("claim_expires_at", UTCDateTime),
    Column("last_error", Text),
    Column("message_id", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime),
    # The forecast when the notice was detected (revision 0002); None: no meaningful estimate.
    Column("burn_per_day", Money),
    Column("runs_out_at", UTCDateTime),
)

cycle_run = Table(
    "cycle_run",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("orgs_read", Integer),
    Column("orgs_failed", Integer),
    Column("shard", Text),
    Column("outcome", String(32)),
)


def _refresh_from_arrays() -> Update:
    """PostgreSQL: one UPDATE per batch, fed by parallel arrays.

    Per-row statements cost a network round trip each, which made a cycle in which most
    balances moved take tens of seconds at 100k orgs; a VALUES list would be recompiled for
    every batch. Parallel unnest() calls in one SELECT list are zipped row by row.
    """
    observed = select(
        func.unnest(bindparam("org_ids", type_=postgresql.ARRAY(BigInteger))).label("org_id"),
        func.unnest(bindparam("names", type_=postgresql.ARRAY(Text))).label("name"),
        func.unnest(bindparam("enabled", type_=postgresql.ARRAY(Boolean))).label("enabled"),
        func.unnest(bindparam("thresholds", type_=postgresql.ARRAY(Numeric))).label("threshold"),
        func.unnest(bindparam("balances", type_=postgresql.ARRAY(Numeric))).label("balance"),
    ).subquery("observed")
    return (
        update(org_state)
        .where(org_state.c.org_id == observed.c.org_id)
        .values(
            name=observed.c.name,
            enabled=observed.c.enabled,
            threshold=observed.c.threshold,
            balance=observed.c.balance,
            changed_at=bindparam("now", type_=UTCDateTime),
            last_error=None,
            last_error_at=None,
        )
    )


_REFRESH_FROM_ARRAYS = _refresh_from_arrays()


@dataclass(frozen=True, slots=True)
class ObservedOrg:
    org_id: int
    name: str
    enabled: bool
    threshold: Decimal
    balance: Decimal


@dataclass(frozen=True, slots=True)
class StoredRow:
    org_id: int
    stored: StoredState
    name: str
    enabled: bool
    threshold: Decimal
    balance: Decimal
    last_error: str | None

    def differs_from(self, observed: ObservedOrg, new: StoredState) -> bool:
        """Whether the org must be written: a value or the state changed, or an error to clear."""
        return (
            new != self.stored
            or self.last_error is not None
            or (observed.name, observed.enabled, observed.threshold, observed.balance)
            != (self.name, self.enabled, self.threshold, self.balance)
        )


@dataclass(frozen=True, slots=True)
class NewNotification:
    kind: str
    breach_number: int
    org_name: str
    recipients: tuple[str, ...]
    subject: str
    balance: Decimal
    threshold: Decimal
    detected_at: datetime
    status: str  # 'pending' | 'suppressed' | 'no_recipients' | 'baseline'
    auto_refill: bool = False  # the org's auto-refill setting when the breach was detected
    burn_per_day: Decimal | None = None
    runs_out_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StateChange:
    observed: ObservedOrg
    expected: StoredState | None  # what the cycle loaded; None = the org was not stored
    new: StoredState
    notification: NewNotification | None
    # More notifications written with the state change, only if its guarded write hits
    # (the recovery notice of a re-arm).
    also_notify: tuple[NewNotification, ...] = ()


@dataclass(frozen=True)
class ApplyResult:
    written: int
    notifications: list[int]
    conflicts: int


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


def create_configured_engine(url: str) -> Engine:
    """An engine with the settings the store relies on (SQLite locking and pragmas, pre-ping)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Never echo an unparsable URL: it may hold a password we cannot locate.
        raise DatabaseError(
            "database URL is not valid (expected e.g. sqlite:///poller.db or "
            "postgresql+psycopg2://user@host/dbname)"
        ) from None
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            return _create_sqlite_engine(parsed)
        if backend == "postgresql":
            if parsed.drivername == "postgresql":
                # SQLAlchemy 2.1 defaults to psycopg 3; poller ships psycopg2.
                parsed = parsed.set(drivername="postgresql+psycopg2")
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
    def _configure_connection(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin hook below emit BEGIN instead of the sqlite3 module, which
        # would start transactions lazily (a SELECT runs outside any transaction).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # IMMEDIATE takes the write lock up front (waiting up to the busy timeout). A deferred
        # transaction that reads and then writes can instead fail at once with "database is
        # locked" when another writer got there first.
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def _safe_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _one_line(text: str, limit: int = MAX_ERROR_LENGTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _describe(error: BaseException, url: URL) -> str:
    cause = getattr(error, "orig", None) or error
    text = _one_line(str(cause)) or type(cause).__name__
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
        detail = _one_line(str(error))
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


def _batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _observed_values(observed: ObservedOrg) -> dict[str, Any]:
    return {
        "name": observed.name,
        "enabled": observed.enabled,
        "threshold": observed.threshold,
        "balance": observed.balance,
    }


def _alert_time(change: StateChange) -> datetime | None:
    """When a real alert (not a first-sight baseline) was raised by this change, if one was."""
    new = change.notification
    return None if new is None or new.status == "baseline" else new.detected_at


def _record(row: Any) -> NotificationRecord:
    values = dict(row._mapping)
    values["recipients"] = tuple(values["recipients"])
    return NotificationRecord(**values)


class Store:
    """The few queries the cycle and delivery need; every method is its own transaction(s)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.reader = engine.execution_options(**{_READ_ONLY: True})
        dialect_insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
        self.dialect_insert = dialect_insert[engine.dialect.name]

    def close(self) -> None:
        self.engine.dispose()

    def database_errors(self, action: str) -> Any:
        return _database_errors(self.engine.url, action)

    # --- alert states -------------------------------------------------------------------

    def load_states(self) -> dict[int, StoredRow]:
        query = select(
            org_state.c.org_id,
            org_state.c.state,
            org_state.c.breach_count,
            org_state.c.name,
            org_state.c.enabled,
            org_state.c.threshold,
            org_state.c.balance,
            org_state.c.last_error,
        )
        # At 100,000 orgs every object per row counts: the few distinct states and thresholds
        # are shared (both immutable) instead of held once per org, about 40% less memory.
        states: dict[tuple[str, int], StoredState] = {}
        thresholds: dict[Decimal, Decimal] = {}
        with self.database_errors("loading alert states"), self.reader.connect() as connection:
            return {
                row.org_id: StoredRow(
                    row.org_id,
                    states.get((row.state, row.breach_count))
                    or states.setdefault(
                        (row.state, row.breach_count),
                        StoredState(AlertState(row.state), row.breach_count),
                    ),
                    row.name,
                    row.enabled,
                    thresholds.setdefault(row.threshold, row.threshold),
                    row.balance,
                    row.last_error,
                )
                for row in connection.execute(query)
            }

    def apply_changes(self, changes: Sequence[StateChange], now: datetime) -> ApplyResult:
        """Write changes in batches; a change whose expected state no longer holds is skipped."""
        written = conflicts = 0
        notification_ids: list[int] = []
        # One global order (by org id) means two pollers writing overlapping orgs take row
        # locks in the same order, which keeps PostgreSQL deadlocks to rare corner cases.
        ordered = sorted(changes, key=lambda change: change.observed.org_id)
        for batch in _batches(ordered, BATCH_SIZE):
            batch_written, batch_ids, batch_conflicts = self._apply_batch_retrying(batch, now)
            written += batch_written
            notification_ids += batch_ids
            conflicts += batch_conflicts
        if conflicts:
            log.info("store.conflicts", conflicts=conflicts)
        return ApplyResult(written, notification_ids, conflicts)

    def _apply_batch_retrying(
        self, batch: Sequence[StateChange], now: datetime
    ) -> tuple[int, list[int], int]:
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
    ) -> tuple[int, list[int], int]:
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
        applied = self._insert_new_orgs(connection, new_orgs, now)
        applied += [change for change in transitions if self._transition(connection, change, now)]
        self._refresh_observed(connection, refreshes, now)
        notification_ids = [
            notification_id
            for change in applied
            for new in (change.notification, *change.also_notify)
            if new is not None
            and (notification_id := self.add_notification(
                connection, change.observed.org_id, new, now)) is not None
        ]
        conflicts = len(new_orgs) + len(transitions) - len(applied)
        return len(applied) + len(refreshes), notification_ids, conflicts

    def _insert_new_orgs(
        self, connection: Connection, changes: list[StateChange], now: datetime
    ) -> list[StateChange]:
        """Insert orgs that were not stored; returns the changes whose row this call created."""
        if not changes:
            return []
        statement = (
            self.dialect_insert(org_state)
            .on_conflict_do_nothing(index_elements=[org_state.c.org_id])
            .returning(org_state.c.org_id)
        )
        rows = [
            {
                "org_id": change.observed.org_id,
                **_observed_values(change.observed),
                "state": change.new.state.value,
                "breach_count": change.new.breach_count,
                "first_seen_at": now,
                "changed_at": now,
                "last_alert_at": _alert_time(change),
            }
            for change in changes
        ]
        inserted = set(connection.execute(statement, rows).scalars())
        return [change for change in changes if change.observed.org_id in inserted]

    def _transition(self, connection: Connection, change: StateChange, now: datetime) -> bool:
        """The guarded state write: True only if the row still held the expected state."""
        assert change.expected is not None
        values: dict[str, Any] = {
            **_observed_values(change.observed),
            "state": change.new.state.value,
            "breach_count": change.new.breach_count,
            "changed_at": now,
            "last_error": None,
            "last_error_at": None,
        }
        alert_time = _alert_time(change)
        if alert_time is not None:
            values["last_alert_at"] = alert_time
        statement = (
            update(org_state)
            .where(
                org_state.c.org_id == change.observed.org_id,
                org_state.c.state == change.expected.state.value,
                org_state.c.breach_count == change.expected.breach_count,
            )
            .values(values)
        )
        return connection.execute(statement).rowcount == 1

    def _refresh_observed(
        self, connection: Connection, changes: list[StateChange], now: datetime
    ) -> None:
        """Observed values only, same state: no guard needed, the state columns stay untouched."""
        if not changes:
            return
        if connection.dialect.name == "postgresql":
            connection.execute(
                _REFRESH_FROM_ARRAYS,
                {
                    "org_ids": [change.observed.org_id for change in changes],
                    "names": [change.observed.name for change in changes],
                    "enabled": [change.observed.enabled for change in changes],
                    "thresholds": [change.observed.threshold for change in changes],
                    "balances": [change.observed.balance for change in changes],
                    "now": now,
                },
            )
            return
        statement = (
            update(org_state)
            .where(org_state.c.org_id == bindparam("b_org_id"))
            .values(
                name=bindparam("b_name"),
                enabled=bindparam("b_enabled"),
                threshold=bindparam("b_threshold"),
                balance=bindparam("b_balance"),
                changed_at=bindparam("b_now"),
                last_error=None,
                last_error_at=None,
            )
        )
        connection.execute(
            statement,
            [
                {f"b_{key}": value for key, value in _observed_values(change.observed).items()}
                | {"b_org_id": change.observed.org_id, "b_now": now}
                for change in changes
            ],
        )

    def add_notification(
        self, connection: Connection, org_id: int, new: NewNotification, now: datetime
    ) -> int | None:
        """Insert into the outbox within the caller's transaction; None if it already exists."""
        if new.status not in NOTIFICATION_STATUSES - {"sent", "failed"}:
            raise ValueError(f"a new notification cannot have status {new.status!r}")
        statement = (
            self.dialect_insert(notification)
            .values(
                org_id=org_id,
                breach_number=new.breach_number,
                kind=new.kind,
                org_name=new.org_name,
                recipients=list(new.recipients),
                subject=new.subject,
                balance=new.balance,
                threshold=new.threshold,
                auto_refill=new.auto_refill,
                burn_per_day=new.burn_per_day,
                runs_out_at=new.runs_out_at,
                detected_at=new.detected_at,
                status=new.status,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            # The UNIQUE (org, kind, breach) row already exists only if the state was rewound
            # by hand; the existing row stands for this breach.
            .on_conflict_do_nothing(
                index_elements=[
                    notification.c.org_id,
                    notification.c.kind,
                    notification.c.breach_number,
                ]
            )
            .returning(notification.c.id)
        )
        return connection.execute(statement).scalar_one_or_none()

    def record_errors(self, errors: Sequence[tuple[int, str]], now: datetime) -> None:
        """Remember why reading these orgs failed; orgs never stored have no row to note it on."""
        if not errors:
            return
        statement = (
            update(org_state)
            .where(org_state.c.org_id == bindparam("b_org_id"))
            .values(last_error=bindparam("b_error"), last_error_at=bindparam("b_now"))
        )
        for batch in _batches(errors, BATCH_SIZE):
            with self.database_errors("recording org errors"), self.engine.begin() as connection:
                connection.execute(
                    statement,
                    [
                        {"b_org_id": org_id, "b_error": _one_line(error), "b_now": now}
                        for org_id, error in batch
                    ],
                )

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

    def claim_due(
        self, *, worker: str, now: datetime, lease_seconds: float, limit: int = 100
    ) -> list[ClaimedNotification]:
        """Take a lease on up to ``limit`` due notifications; each row goes to one worker only."""
        claimable = and_(
            notification.c.status == "pending",
            notification.c.next_attempt_at <= now,
            or_(notification.c.claim_expires_at.is_(None), notification.c.claim_expires_at < now),
        )
        candidates = (
            select(notification.c.id)
            .where(claimable)
            .order_by(notification.c.next_attempt_at, notification.c.id)
            .limit(limit)
        )
        claim = (
            update(notification)
            .where(notification.c.id == bindparam("b_id"), claimable)
            .values(
                claimed_by=worker,
                claim_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=notification.c.attempts + 1,
                updated_at=now,
            )
            .returning(*notification.c)
        )
        claimed: list[ClaimedNotification] = []
        with self.database_errors("claiming notifications"), self.engine.begin() as connection:
            for notification_id in connection.execute(candidates).scalars().all():
                # Repeating the conditions makes the UPDATE the arbiter: a concurrent claimer
                # that got the row first leaves it unmatched here (PostgreSQL re-checks the
                # WHERE after the other transaction commits; SQLite serializes writers).
                row = connection.execute(claim, {"b_id": notification_id}).one_or_none()
                if row is not None:
                    claimed.append(_record(row))
        return claimed

    def _finish_claim(
        self, notification_id: int, worker: str, values: dict[str, Any], action: str
    ) -> bool:
        statement = (
            update(notification)
            .where(
                notification.c.id == notification_id,
                notification.c.status == "pending",
                notification.c.claimed_by == worker,
            )
            .values(claimed_by=None, claim_expires_at=None, **values)
        )
        with self.database_errors(action), self.engine.begin() as connection:
            return connection.execute(statement).rowcount == 1

    def renew_claim(
        self, notification_id: int, *, worker: str, now: datetime, lease_seconds: float
    ) -> bool:
        """Restart the lease just before sending, so a long batch cannot outlive its claim.

        False if ``worker`` no longer holds the row (its lease ran out and another took it).
        """
        values = {"claim_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now}
        statement = (
            update(notification)
            .where(
                notification.c.id == notification_id,
                notification.c.status == "pending",
                notification.c.claimed_by == worker,
            )
            .values(values)
        )
        with self.database_errors("renewing a delivery claim"), self.engine.begin() as connection:
            return connection.execute(statement).rowcount == 1

    def mark_sent(
        self, notification_id: int, *, worker: str, message_id: str | None, now: datetime
    ) -> bool:
        """Record delivery; False if ``worker`` no longer holds the claim (someone took over)."""
        values = {
            "status": "sent",
            "message_id": message_id,
            "sent_at": now,
            "last_error": None,
            "updated_at": now,
        }
        return self._finish_claim(notification_id, worker, values, "marking a notification sent")

    def mark_retry(
        self,
        notification_id: int,
        *,
        worker: str,
        error: str,
        next_attempt_at: datetime,
        now: datetime,
    ) -> bool:
        values = {
            "last_error": _one_line(error),
            "next_attempt_at": next_attempt_at,
            "updated_at": now,
        }
        return self._finish_claim(
            notification_id, worker, values, "scheduling a notification retry"
        )

    def mark_failed(self, notification_id: int, *, worker: str, error: str, now: datetime) -> bool:
        values = {"status": "failed", "last_error": _one_line(error), "updated_at": now}
        return self._finish_claim(notification_id, worker, values, "marking a notification failed")

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
                or_(notification.c.claim_expires_at.is_(None),
                    notification.c.claim_expires_at <= now)
            )
        query = select(func.count()).where(*conditions)
        with (
            self.database_errors("counting pending notifications"),
            self.reader.connect() as connection,
        ):
            return connection.execute(query).scalar_one()

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
            select(org_state, latest.c.status, latest.c.last_error.label("notification_error"))
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
                )
                for row in connection.execute(query)
            ]


def _latest(*moments: datetime | None) -> datetime | None:
    known: Iterable[datetime] = [moment for moment in moments if moment is not None]
    return max(known, default=None)

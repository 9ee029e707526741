"""Opening the database: engines (SQLite pragmas, PostgreSQL), Alembic upgrades, errors.

Every database problem leaves here as a ``DatabaseError`` of one line with no password in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    create_engine,
    event,
    func,
    inspect,
    select,
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

from poller.engine.model import (
    WordedError,
    one_line,
)

log = structlog.get_logger(__name__)

MIGRATIONS_LOCATION = "poller.store:migrations"
SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
# Arbitrary constant naming the PostgreSQL advisory lock that serializes schema changes.
SCHEMA_LOCK_ID = 0x706F6C6C6572  # "poller"
# Execution option telling the SQLite BEGIN hook that a transaction only reads.
_READ_ONLY = "poller_read_only"
# Execution option for the transactions that only record delivery progress (renewed leases,
# sent / retry / failed marks): they commit without waiting for the disk (see
# Store._progress_write for what a power loss can then cost).
_PROGRESS = "poller_delivery_progress"
# INSERT with ON CONFLICT, which both dialects spell the same.
DialectInsert = Callable[[Table], postgresql.Insert | sqlite.Insert]


class SchemaOutdated(Exception):
    """The database schema is not the revision this poller needs (one-line message)."""


class DatabaseError(WordedError):
    """The database could not be opened or used; the message is one line without secrets."""


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


def row_specific(error: Exception) -> bool:
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


def prepared_engine(url: str) -> Engine:
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
    return engine


class Connected:
    """The engine and the connection flavours every part of the store works through."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.reader = engine.execution_options(**{_READ_ONLY: True})
        # Delivery progress commits without waiting for the disk (Outbox._progress_write).
        self.progress = engine.execution_options(**{_PROGRESS: True})
        inserts: dict[str, DialectInsert] = {
            "postgresql": postgresql.insert,
            "sqlite": sqlite.insert,
        }
        self.dialect_insert = inserts[engine.dialect.name]

    def close(self) -> None:
        self.engine.dispose()

    def database_errors(self, action: str) -> Any:
        return _database_errors(self.engine.url, action)

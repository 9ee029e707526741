"""The database adapter: schema, opening, state writes, outbox, history (SQLite, PostgreSQL)."""

from poller.store.database import (
    MIGRATIONS_LOCATION,
    DatabaseError,
    SchemaOutdated,
    create_configured_engine,
    normalize_database_url,
    upgrade_database,
)
from poller.store.outbox import ClaimedNotification, NotificationRecord, StatusRow
from poller.store.queue import NEW_ORGANIZATION, SETTINGS_CHANGED
from poller.store.store import Store, open_database

__all__ = [
    "MIGRATIONS_LOCATION",
    "NEW_ORGANIZATION",
    "SETTINGS_CHANGED",
    "ClaimedNotification",
    "DatabaseError",
    "NotificationRecord",
    "SchemaOutdated",
    "StatusRow",
    "Store",
    "create_configured_engine",
    "normalize_database_url",
    "open_database",
    "upgrade_database",
]

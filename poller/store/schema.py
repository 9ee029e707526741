"""Every table poller keeps, and the column types that make both databases store the same values.

Created and evolved only by the Alembic revisions in ``poller/store/migrations``.

- ``org_state``: one row per organization: the last observed name / enabled / threshold /
  balance, the alert state with its breach counter, ``first_seen_at``, ``changed_at``,
  ``last_alert_at`` (the latest breach that produced a real notification) and
  ``last_error`` / ``last_error_at`` (set only when reading the org failed).
- ``notification``: the outbox, one row per (org, kind, breach number).
- ``notice_state``: the optional notices' state (runway alert, reminders), per organization.
- ``balance_history``: balances as they changed, for the forecasts.
- ``cycle_run``: one row per cycle; ``poller status`` takes "last checked" from it.
- ``read_schedule``: the adaptive schedule's queue, one row per listed organization: when it
  is next due and why, who holds a claim on it (a lease), the organization as listed with
  its settings fingerprint, and its burn record (last read, last balance, peak burn).
- ``scheduled_job``: named jobs on the same queue (the listing), due time and claim.

Money is exact (NUMERIC without precision, TEXT on SQLite) and timestamps are UTC and
timezone-aware on both databases; docs/architecture.md says why.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator, TypeEngine


def plain_decimal(value: Decimal) -> str:
    """``format(value, "f")``: the digits without an exponent ("1E+3" is "1000")."""
    # str() is several times faster and gives that same text unless it switches to an exponent.
    text = str(value)
    return format(value, "f") if "E" in text else text


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
        return plain_decimal(value) if dialect.name == "sqlite" else value

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
    # Each recipient's outcome so far (revision 0003; see Deliveries); NULL on older rows.
    Column("deliveries", JSON(none_as_null=True)),
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


balance_history = Table(
    "balance_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("org_id", BigInteger, nullable=False),
    Column("observed_at", UTCDateTime, nullable=False),
    Column("hour", Integer, nullable=False),
    Column("balance", Money, nullable=False),
    Column("raw", Boolean, nullable=False),
)


read_schedule = Table(
    "read_schedule",
    metadata,
    Column("org_id", BigInteger, primary_key=True, autoincrement=False),
    Column("due_at", UTCDateTime, nullable=False),
    Column("reason", Text, nullable=False),
    Column("claimed_by", Text),
    Column("claim_expires_at", UTCDateTime),
    Column("settings", Text, nullable=False),  # poller.engine.schedule.settings_fingerprint
    Column("organization", JSON, nullable=False),  # as listed (poller.store.queue's codec)
    Column("listed_at", UTCDateTime, nullable=False),  # when that organization was listed
    Column("last_read_at", UTCDateTime),
    Column("last_balance", Money),
    Column("peak_burn", Float, nullable=False),
    Column("burn_samples", Integer, nullable=False),
    Index("ix_read_schedule_due_at", "due_at"),
    Index("ix_read_schedule_last_read_at", "last_read_at"),
)

scheduled_job = Table(
    "scheduled_job",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("due_at", UTCDateTime, nullable=False),
    Column("claimed_by", Text),
    Column("claim_expires_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
)

"""Initial schema: org_state, notification (the outbox) and cycle_run.

Revision ID: 0001
Revises:
Create Date: 2024-11-24

Types are spelled out here instead of imported from poller.store.database so that this revision
keeps creating exactly the same schema when the application's types evolve later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Exact decimal: unconstrained NUMERIC on PostgreSQL; TEXT on SQLite, whose NUMERIC affinity
# would turn the value into a binary float.
MONEY = sa.Numeric().with_variant(sa.String(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "org_state",
        sa.Column("org_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("threshold", MONEY, nullable=False),
        sa.Column("balance", MONEY, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("breach_count", sa.Integer(), nullable=False),
        sa.Column("first_seen_at", TIMESTAMP, nullable=False),
        sa.Column("changed_at", TIMESTAMP, nullable=False),
        sa.Column("last_alert_at", TIMESTAMP, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint("state IN ('armed', 'alerted')", name="ck_org_state_state"),
        sa.CheckConstraint("breach_count >= 0", name="ck_org_state_breach_count"),
    )
    op.create_table(
        "notification",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "org_id",
            sa.BigInteger(),
            sa.ForeignKey("org_state.org_id", name="fk_notification_org_id"),
            nullable=False,
        ),
        sa.Column("breach_number", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False, server_default="low_credits"),
        sa.Column("org_name", sa.Text(), nullable=False),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("balance", MONEY, nullable=False),
        sa.Column("threshold", MONEY, nullable=False),
        # Whether auto-refill was on at detection: the email says whether a top-up is coming.
        sa.Column("auto_refill", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("detected_at", TIMESTAMP, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("claim_expires_at", TIMESTAMP, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("sent_at", TIMESTAMP, nullable=True),
        sa.UniqueConstraint(
            "org_id", "kind", "breach_number", name="uq_notification_org_kind_breach"
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed', 'suppressed', 'no_recipients', 'baseline')",
            name="ck_notification_status",
        ),
    )
    # Claims scan only rows still waiting for delivery, so the outbox can grow forever without
    # slowing them down. Both PostgreSQL and SQLite support partial indexes.
    op.create_index(
        "ix_notification_pending_due",
        "notification",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "cycle_run",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("orgs_read", sa.Integer(), nullable=True),
        sa.Column("orgs_failed", sa.Integer(), nullable=True),
        sa.Column("shard", sa.Text(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
    )
    op.create_index("ix_cycle_run_finished_at", "cycle_run", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_cycle_run_finished_at", table_name="cycle_run")
    op.drop_table("cycle_run")
    op.drop_index("ix_notification_pending_due", table_name="notification")
    op.drop_table("notification")
    op.drop_table("org_state")

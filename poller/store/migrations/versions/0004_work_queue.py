"""The adaptive schedule's work queue: read_schedule (one row per listed org) and scheduled_job.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Types are spelled out here (not imported from the application) so this revision keeps
creating the same schema when the application's types change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

MONEY = sa.Numeric().with_variant(sa.String(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "read_schedule",
        sa.Column("org_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("due_at", TIMESTAMP, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("claim_expires_at", TIMESTAMP, nullable=True),
        # The listed settings whose change makes the org due at once (settings_fingerprint).
        sa.Column("settings", sa.Text(), nullable=False),
        # The organization as last listed, what a read of its balance needs.
        sa.Column("organization", sa.JSON(), nullable=False),
        sa.Column("listed_at", TIMESTAMP, nullable=False),
        # The burn record: the last read and the fastest burn seen between two reads.
        sa.Column("last_read_at", TIMESTAMP, nullable=True),
        sa.Column("last_balance", MONEY, nullable=True),
        sa.Column("peak_burn", sa.Float(), nullable=False),
        sa.Column("burn_samples", sa.Integer(), nullable=False),
    )
    # Claims take the earliest due rows; the staleness percentile the oldest reads.
    op.create_index("ix_read_schedule_due_at", "read_schedule", ["due_at"])
    op.create_index("ix_read_schedule_last_read_at", "read_schedule", ["last_read_at"])
    op.create_table(
        "scheduled_job",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("due_at", TIMESTAMP, nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("claim_expires_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("scheduled_job")
    op.drop_index("ix_read_schedule_last_read_at", table_name="read_schedule")
    op.drop_index("ix_read_schedule_due_at", table_name="read_schedule")
    op.drop_table("read_schedule")

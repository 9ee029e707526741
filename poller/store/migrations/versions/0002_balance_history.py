"""Balance history, notice state (runway alert, reminders), forecast columns on notifications.

Revision ID: 0002
Revises: 0001
Create Date: 2024-12-02

Types are spelled out here (not imported from the application) so this revision keeps
creating the same schema when the application's types change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MONEY = sa.Numeric().with_variant(sa.String(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "balance_history",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("observed_at", TIMESTAMP, nullable=False),
        # Whole hours since the epoch: downsampling keeps the last point of each hour.
        sa.Column("hour", sa.Integer(), nullable=False),
        sa.Column("balance", MONEY, nullable=False),
        # True until downsampling has looked at the point (older than the raw period).
        sa.Column("raw", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.UniqueConstraint("org_id", "observed_at", name="uq_balance_history_org_time"),
    )
    op.create_index("ix_balance_history_observed_at", "balance_history", ["observed_at"])
    # Downsampling scans only points it has not looked at yet, however long the history.
    op.create_index(
        "ix_balance_history_raw",
        "balance_history",
        ["observed_at"],
        postgresql_where=sa.text("raw"),
        sqlite_where=sa.text("raw"),
    )
    op.create_table(
        "notice_state",
        sa.Column(
            "org_id",
            sa.BigInteger(),
            sa.ForeignKey("org_state.org_id", name="fk_notice_state_org_id"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("runway_state", sa.String(16), nullable=False, server_default="armed"),
        sa.Column("runway_breaches", sa.Integer(), nullable=False, server_default="0"),
        # Reminders recorded for the organization so far: the next one is number reminders + 1.
        sa.Column("reminders", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("reminded_at", TIMESTAMP, nullable=True),
        sa.Column("changed_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "runway_state IN ('armed', 'alerted')", name="ck_notice_state_runway_state"
        ),
    )
    with op.batch_alter_table("notification") as batch:
        batch.add_column(sa.Column("burn_per_day", MONEY, nullable=True))
        batch.add_column(sa.Column("runs_out_at", TIMESTAMP, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("notification") as batch:
        batch.drop_column("runs_out_at")
        batch.drop_column("burn_per_day")
    op.drop_table("notice_state")
    op.drop_index("ix_balance_history_raw", table_name="balance_history")
    op.drop_index("ix_balance_history_observed_at", table_name="balance_history")
    op.drop_table("balance_history")

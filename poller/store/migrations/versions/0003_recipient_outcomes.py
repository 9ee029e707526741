"""Per-recipient delivery outcomes on notifications.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

``deliveries`` maps each recipient address that has an outcome to it ({"outcome": "sent" |
"failed" | "retrying", "answer": the server's answer or why, "at": ISO time}); a recipient
without an entry has not been tried yet. NULL on rows from before this revision: their row
status says it all. Types are spelled out here, not imported from the application.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notification") as batch:
        batch.add_column(sa.Column("deliveries", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("notification") as batch:
        batch.drop_column("deliveries")

"""The store the engine works with (``poller.engine.ports.AlertStore`` and ``WorkQueue``), and
how to open it."""

from __future__ import annotations

from datetime import datetime

import structlog
from sqlalchemy import (
    and_,
    or_,
    select,
    update,
)

from poller.store.database import prepared_engine
from poller.store.outbox import Outbox
from poller.store.queue import ReadQueue
from poller.store.schema import cycle_run

log = structlog.get_logger(__name__)


class Store(ReadQueue, Outbox):
    """Every query poller makes; each method is its own transaction(s)."""

    def start_cycle(self, now: datetime, shard: str | None) -> int:
        statement = cycle_run.insert().values(started_at=now, shard=shard).returning(cycle_run.c.id)
        with self.database_errors("recording the cycle start"), self.engine.begin() as connection:
            run_id: int = connection.execute(statement).scalar_one()
            return run_id

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


def open_database(url: str) -> Store:
    """Open the store; an empty database gets the schema, any other revision is refused."""
    return Store(prepared_engine(url))

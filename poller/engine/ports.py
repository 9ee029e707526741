"""What the engine needs from the outside world, as protocols the adapters implement.

The cycle reads organizations from a ``Source`` (``poller.cekura``), keeps state in an
``AlertStore`` (``poller.store``) and hands due emails to a ``Dispatcher``
(``poller.engine.delivery``, which sends through ``poller.mail``). The CLI builds the adapters
and passes them in; nothing in the engine imports an adapter to do its work.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from poller.engine.forecast import Point
from poller.engine.model import (
    ApplyResult,
    CycleWrites,
    DeliveryReport,
    NoticeState,
    OrgError,
    OrgSnapshot,
    StoredRow,
    WordedError,
)


class SourceError(WordedError):
    """The organization list itself could not be read: the cycle changes nothing."""


class Fetched(Protocol):
    """One cycle's read of the fleet: the organizations read, and those that could not be."""

    @property
    def snapshots(self) -> list[OrgSnapshot]: ...

    @property
    def errors(self) -> Sequence[OrgError]: ...


class Source(Protocol):
    def fetch_snapshots(
        self, only_org: int | None = None, *, cancel: threading.Event | None = None
    ) -> Fetched:
        """Every organization with its balance; raises SourceError when none can be listed."""
        ...


class AlertStore(Protocol):
    def load_states(self) -> dict[int, StoredRow]: ...

    def load_notice_states(self) -> dict[int, NoticeState]: ...

    def last_alerts(self) -> dict[int, datetime]: ...

    def balance_series(
        self, org_ids: Iterable[int] | None, *, since: datetime
    ) -> dict[int, list[Point]]: ...

    def persist(self, writes: CycleWrites, now: datetime) -> ApplyResult: ...

    def maintain_history(self, now: datetime, retention: timedelta) -> None: ...

    def record_errors(self, errors: Sequence[tuple[int, str]], now: datetime) -> None: ...

    def start_cycle(self, now: datetime, shard: str | None) -> int: ...

    def finish_cycle(
        self, cycle_id: int, now: datetime, orgs_read: int, orgs_failed: int, outcome: str
    ) -> None: ...


class Dispatcher(Protocol):
    def deliver_due(self, *, cancel: threading.Event | None = None) -> DeliveryReport: ...

"""What the engine needs from the outside world, as protocols the adapters implement.

The cycle reads organizations from a ``Source`` (``poller.cekura``), keeps state in an
``AlertStore`` (``poller.store``) and hands due emails to a ``Dispatcher``
(``poller.engine.delivery``, which sends through ``poller.mail``). The CLI builds the adapters
and passes them in; nothing in the engine imports an adapter to do its work.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from poller.engine.forecast import Point
from poller.engine.model import (
    ApplyResult,
    CycleWrites,
    DeliveryReport,
    DueRead,
    ListingSync,
    NoticeState,
    Organization,
    OrgError,
    OrgSnapshot,
    QueueStats,
    Reschedule,
    ScheduledRead,
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


class Listing(Protocol):
    """The organization list alone (the adaptive schedule reads balances when due)."""

    @property
    def organizations(self) -> list[Organization]: ...

    # Orgs whose balance came with the listing (an org-scoped API key is read whole).
    @property
    def snapshots(self) -> list[OrgSnapshot]: ...

    @property
    def errors(self) -> Sequence[OrgError]: ...

    # False when an entry could not be identified: then no org may be dropped as unlisted.
    @property
    def complete(self) -> bool: ...


class Source(Protocol):
    def fetch_snapshots(
        self, only_org: int | None = None, *, cancel: threading.Event | None = None
    ) -> Fetched:
        """Every organization with its balance; raises SourceError when none can be listed."""
        ...

    def list_organizations(self, *, cancel: threading.Event | None = None) -> Listing:
        """Every organization with its settings, no balances; SourceError when none can be
        listed."""
        ...

    def read_balances(
        self, organizations: Sequence[Organization], *, cancel: threading.Event | None = None
    ) -> Fetched:
        """The balance of each org given, as listed earlier; an org that cannot be read is an
        error of its own. Never raises for API trouble."""
        ...


class AlertStore(Protocol):
    # org_ids None: every org (a full cycle); else just those (a batch of due reads).
    def load_states(self, org_ids: Collection[int] | None = None) -> dict[int, StoredRow]: ...

    def load_notice_states(
        self, org_ids: Collection[int] | None = None
    ) -> dict[int, NoticeState]: ...

    def last_alerts(self, org_ids: Collection[int] | None = None) -> dict[int, datetime]: ...

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


class WorkQueue(Protocol):
    """The adaptive schedule's queue: one row per listed org with its due time, and named
    jobs (the listing). Claims carry a lease; an expired claim is anyone's to take."""

    def claim_job(self, name: str, worker: str, now: datetime, lease: timedelta) -> bool:
        """Take job ``name`` if it is due and nobody holds a live claim on it."""
        ...

    def finish_job(self, name: str, worker: str, due_at: datetime) -> None:
        """Release the job, due again at ``due_at`` (only if ``worker`` still holds it)."""
        ...

    def sync_listing(
        self, organizations: Sequence[Organization], now: datetime, *, complete: bool
    ) -> ListingSync: ...

    def claim_due_reads(
        self, worker: str, now: datetime, limit: int, lease: timedelta
    ) -> list[DueRead]: ...

    def reschedule(self, worker: str, updates: Sequence[Reschedule]) -> int:
        """Write each org's next due time and release its claim, only where ``worker`` still
        holds it; the number written."""
        ...

    def scheduled_reads(
        self, org_ids: Collection[int] | None = None
    ) -> dict[int, ScheduledRead]: ...

    def queue_stats(self, now: datetime) -> QueueStats: ...

    def next_due(self) -> datetime | None:
        """The earliest due time of any org or job, claimed or not (how long to sleep)."""
        ...

    def fleet_burn(self, min_samples: int) -> float | None:
        """The 90th percentile of peak burns over orgs with ``min_samples`` or more."""
        ...


class Dispatcher(Protocol):
    def deliver_due(self, *, cancel: threading.Event | None = None) -> DeliveryReport: ...

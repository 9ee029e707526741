"""The adaptive schedule's work: the listing when it is due, then the balance reads that are due.

Any number of processes (`poller run` replicas, overlapping cron `poller once`) call ``step``
on one database. Everything they do is claimed there first with a lease (``WorkQueue``), so
they share the work with no setting of their own, and a process that dies loses its claims
when their leases end. A batch of reads is decided and written exactly as a cycle's are
(``decide_and_persist``); then each org gets its next due time (``poller.engine.schedule``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from poller.config.settings import Settings
from poller.engine.cycle import CycleReport, decide_and_persist, log_plans
from poller.engine.decide import OrgPlan
from poller.engine.delivery import worker_name
from poller.engine.model import (
    AlertState,
    DeliveryReport,
    DueRead,
    ListingSync,
    Reschedule,
    utc_now,
)
from poller.engine.ports import AlertStore, Dispatcher, Source, SourceError, WorkQueue
from poller.engine.schedule import (
    MIN_BURN_SAMPLES,
    ReadTiming,
    next_read,
    observe,
    read_failed,
)

log = structlog.get_logger(__name__)

LISTING_JOB = "listing"
# Claimed at a time (batch_size): at least this many per worker thread, ...
BATCH_PER_WORKER = 4
# ... and about this many seconds of reads at the rate cap, at most MAX_BATCH.
BATCH_SECONDS = 2.0
MAX_BATCH = 256
# A step hands back control at least this often so its caller can stop, report metrics and
# refresh the fleet's burn; the work left is due at once and the next step takes it.
STEP_BUDGET_SECONDS = 10.0
# How long an idle worker waits before looking again: bounded both ways so a due read waits
# at most a second, and an idle replica does not hammer the database.
IDLE_WAIT = (0.25, 1.0)


class QueueStore(AlertStore, WorkQueue, Protocol):
    """The store the adaptive schedule needs: the cycle's, plus the work queue."""


@dataclass
class StepReport:
    """What one step did; ``reads`` counts balance reads that came back (good or not)."""

    listing: ListingSync | None = None
    listing_failed: str | None = None
    reads: int = 0
    read_errors: int = 0
    breaches: int = 0
    rearmed: int = 0
    delivery: DeliveryReport = field(default_factory=DeliveryReport)
    batches: int = 0

    def add(self, other: StepReport) -> None:
        """Totals over several steps (`poller once`); the last listing's outcome wins."""
        self.listing = other.listing or self.listing
        self.listing_failed = other.listing_failed or self.listing_failed
        self.reads += other.reads
        self.read_errors += other.read_errors
        self.breaches += other.breaches
        self.rearmed += other.rearmed
        self.delivery.add(other.delivery)
        self.delivery.undelivered = other.delivery.undelivered  # what is still left now
        self.batches += other.batches

    @property
    def did_work(self) -> bool:
        return self.listing is not None or self.listing_failed is not None or self.batches > 0


def batch_size(settings: Settings) -> int:
    """Reads claimed at a time: enough to keep every worker busy and to spend about
    BATCH_SECONDS at the rate cap (the database's work per batch is then small beside the
    reads), at most MAX_BATCH (a batch's alerts are written when it ends)."""
    cap = settings.max_requests_per_second
    at_cap = MAX_BATCH if cap == 0 else int(cap * BATCH_SECONDS)
    return max(1, min(MAX_BATCH, max(settings.concurrency * BATCH_PER_WORKER, at_cap)))


class QueueWorker:
    """One process's share of the adaptive schedule's work."""

    def __init__(
        self,
        *,
        settings: Settings,
        client: Source,
        store: QueueStore,
        deliverer: Dispatcher | None,
        now_fn: Callable[[], datetime] = utc_now,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.deliverer = deliverer
        self.now_fn = now_fn
        self.name = name or worker_name()
        self.timing = ReadTiming.of(settings)
        self.lease = timedelta(seconds=settings.read_lease)
        self.batch_size = batch_size(settings)
        self._fleet_burn: float | None = None
        self._fleet_burn_at = float("-inf")

    def step(self, cancel: threading.Event, *, budget: float = STEP_BUDGET_SECONDS) -> StepReport:
        """The listing if due, then due reads batch by batch until none is due, ``cancel`` is
        set or ``budget`` seconds have passed."""
        report = StepReport()
        self._list_if_due(report, cancel)
        deadline = time.monotonic() + budget
        while not cancel.is_set() and time.monotonic() < deadline:
            now = self.now_fn()
            claimed = self.store.claim_due_reads(self.name, now, self.batch_size, self.lease)
            if not claimed:
                break
            self._read_batch(claimed, report, cancel)
        if self.deliverer is not None and not cancel.is_set():
            # Every step, not only one that read: emails due for a retry go out on time too.
            report.delivery = self.deliverer.deliver_due(cancel=cancel)
        return report

    def idle_wait(self) -> float:
        """Seconds to wait before the next step when the last one found nothing due."""
        due = self.store.next_due()
        if due is None:
            return IDLE_WAIT[1]
        seconds = (due - self.now_fn()).total_seconds()
        return min(max(seconds, IDLE_WAIT[0]), IDLE_WAIT[1])

    # --- the listing ---------------------------------------------------------------------

    def _list_if_due(self, report: StepReport, cancel: threading.Event) -> None:
        now = self.now_fn()
        if not self.store.claim_job(LISTING_JOB, self.name, now, self.lease):
            return
        # Recorded as a cycle: `poller status` and `poller health` read the last listing's.
        run_id = self.store.start_cycle(now, shard=None)
        # Until the listing has been synced, it failed: it is tried again soon, since until it
        # works no settings change or new org is seen.
        outcome, listed, failed = "abandoned", 0, 0
        next_due = now + timedelta(seconds=self.timing.min_interval)
        try:
            listing = self.client.list_organizations(cancel=cancel)
        except SourceError as exc:
            outcome = "abandoned" if cancel.is_set() else "list_failed"
            report.listing_failed = str(exc)
            log.error("listing.failed", error=str(exc))
        else:
            listed, failed = len(listing.organizations), len(listing.errors)
            for error in listing.errors:
                log.warning("org.read_failed", org_id=error.org_id, error=error.message)
            # An org named only in an error is listed all the same: while any entry failed,
            # none is dropped as unlisted (the next clean listing drops the gone ones).
            complete = listing.complete and not listing.errors
            report.listing = self.store.sync_listing(listing.organizations, now, complete=complete)
            if listing.snapshots:
                # Org-scoped API keys are read whole: their balances came with the listing.
                batch = CycleReport(cycle_id=uuid.uuid4().hex[:12], started_at=now)
                decide_and_persist(
                    batch, listing.snapshots, self.settings, self.store, now, batch=True
                )
                log_plans(batch)
            self.store.maintain_history(now, timedelta(days=self.settings.history_retention_days))
            outcome = "partial" if failed else "ok"
            next_due = now + timedelta(seconds=self.settings.interval)
            log.info(
                "listing.finished",
                organizations=listed,
                errors=failed,
                added=report.listing.added,
                changed=report.listing.changed,
                removed=report.listing.removed,
            )
        finally:
            self.store.finish_job(LISTING_JOB, self.name, next_due)
            self.store.finish_cycle(
                run_id, self.now_fn(), orgs_read=listed, orgs_failed=failed, outcome=outcome
            )

    # --- due reads -----------------------------------------------------------------------

    def _read_batch(
        self, claimed: Sequence[DueRead], report: StepReport, cancel: threading.Event
    ) -> None:
        fetched = self.client.read_balances([due.organization for due in claimed], cancel=cancel)
        now = self.now_fn()
        batch = CycleReport(cycle_id=uuid.uuid4().hex[:12], started_at=now)
        stopped = cancel.is_set()
        # Reads a stop broke off are no errors of their orgs (they are due again at once).
        batch.errors = [] if stopped else list(fetched.errors)
        for error in batch.errors:
            log.warning("org.read_failed", org_id=error.org_id, error=error.message)
        decide_and_persist(batch, fetched.snapshots, self.settings, self.store, now, batch=True)
        log_plans(batch)
        plans = {plan.snapshot.id: plan for plan in batch.plans}
        fleet_burn = self._fleet_burn_now()
        updates = [
            self._next(due, plans.get(due.organization.id), now, fleet_burn, stopped)
            for due in claimed
        ]
        self.store.reschedule(self.name, updates)
        report.batches += 1
        report.reads += len(claimed)
        report.read_errors += len(claimed) - len(plans)
        report.breaches += batch.breaches
        report.rearmed += batch.rearmed
        log.debug(
            "reads.batch",
            worker=self.name,
            reads=len(claimed),
            errors=len(claimed) - len(plans),
            breaches=batch.breaches,
        )

    def _next(
        self,
        due: DueRead,
        plan: OrgPlan | None,
        now: datetime,
        fleet_burn: float | None,
        stopped: bool,
    ) -> Reschedule:
        org_id = due.organization.id
        if plan is None and stopped:  # broken off by a stop: any process may read it now
            return Reschedule(org_id, now, "stopped before it was read: due at once", due.record)
        if plan is None:  # not read, or its decision or write failed: it is an error above
            retry = read_failed(self.timing)
            return Reschedule(
                org_id, now + timedelta(seconds=retry.delay), retry.reason, due.record
            )
        snapshot = plan.snapshot
        record = observe(due.record, snapshot.balance, now)
        when = next_read(
            alerted=plan.decision.state == AlertState.ALERTED,
            enabled=snapshot.enabled,
            headroom=snapshot.balance - snapshot.threshold,
            record=record,
            fleet_burn=fleet_burn,
            timing=self.timing,
        )
        return Reschedule(org_id, now + timedelta(seconds=when.delay), when.reason, record)

    def _fleet_burn_now(self) -> float | None:
        """The fleet's burn floor, read again once per interval (a scan of the queue)."""
        if time.monotonic() - self._fleet_burn_at >= self.settings.interval:
            self._fleet_burn = self.store.fleet_burn(MIN_BURN_SAMPLES)
            self._fleet_burn_at = time.monotonic()
        return self._fleet_burn

"""One cycle: fetch every organization → decide → persist → deliver.

The daemon (`poller run`), cron (`poller once`) and `poller check --org` all call
``run_cycle``; only how often and for which organizations differs. The decisions are pure
(``poller.engine.decide``); this module loads their inputs and hands their writes to the
store in one step.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from poller.config.settings import Settings
from poller.engine.decide import NOTHING_KNOWN, Known, OrgPlan, Policy, decide, needs_history
from poller.engine.forecast import WEEK, Forecast
from poller.engine.model import (
    CycleWrites,
    DeliveryReport,
    NotificationStatus,
    OrgError,
    OrgSnapshot,
    describe_failure,
    utc_now,
)
from poller.engine.ports import AlertStore, Dispatcher, Source, SourceError

log = structlog.get_logger(__name__)

# What a cycle does with an org that one of its steps failed on: (org id, step, exception or
# the reason already put in words). The org is then reported as an error, not written.
OrgFailure = Callable[[int, str, BaseException | str], None]


@dataclass
class CycleReport:
    cycle_id: str
    started_at: datetime
    plans: list[OrgPlan] = field(default_factory=list)
    errors: list[OrgError] = field(default_factory=list)
    # Set when the organization list itself could not be read: nothing was changed.
    fatal: str | None = None
    written: int = 0
    conflicts: int = 0
    # Orgs whose state write this process made (ApplyResult.applied); None when nothing was
    # written (a dry run): then the plans are what the cycle would have done.
    applied: frozenset[int] | None = None
    delivery: DeliveryReport | None = None
    duration: float = 0.0
    outcome: str = ""  # ok | partial | list_failed | abandoned, once the cycle has finished
    # Forecasts computed this cycle, and the outbox ids of the runway alerts and reminders.
    forecasts: dict[int, Forecast] = field(default_factory=dict)
    notices: list[int] = field(default_factory=list)
    # Seconds spent in each phase: fetch, diff (load states + rule), persist, deliver.
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def orgs_read(self) -> int:
        return len(self.plans)

    def wrote(self, plan: OrgPlan) -> bool:
        """Whether this process made the plan's state change (not a poller that won a race)."""
        return self.applied is None or plan.snapshot.id in self.applied

    def action(self, plan: OrgPlan) -> str:
        """What this cycle did for the organization, for people (``plan.action`` is the plan)."""
        if plan.change is not None and not self.wrote(plan):
            # Another poller wrote this change first: it, not this run, alerted or re-armed.
            return "no change (another poller recorded it first)"
        return plan.action

    @property
    def breaches(self) -> int:
        return sum(1 for plan in self.plans if plan.notification is not None and self.wrote(plan))

    @property
    def rearmed(self) -> int:
        return sum(1 for plan in self.plans if plan.decision.rearmed and self.wrote(plan))

    @property
    def ok(self) -> bool:
        """Every org read and every due email delivered: the exit status of `poller once`."""
        delivery = self.delivery or DeliveryReport()
        return (
            self.fatal is None
            and not self.errors
            and delivery.undelivered == 0
            and delivery.failed == 0
        )


def run_cycle(
    *,
    settings: Settings,
    client: Source,
    store: AlertStore,
    deliverer: Dispatcher | None,
    baseline: bool = False,
    only_org: int | None = None,
    dry_run: bool = False,
    cancel: threading.Event | None = None,
    now_fn: Callable[[], datetime] = utc_now,
) -> CycleReport:
    """One full cycle. Never raises for API trouble: it is reported on the CycleReport."""
    cancel = cancel or threading.Event()
    started = time.monotonic()
    report = CycleReport(cycle_id=uuid.uuid4().hex[:12], started_at=now_fn())
    cycle_log = log.bind(cycle_id=report.cycle_id)
    structlog.contextvars.bind_contextvars(cycle_id=report.cycle_id)
    try:
        shard = str(settings.shard) if settings.shard is not None and only_org is None else None
        cycle_log.info(
            "cycle.started", only_org=only_org, baseline=baseline, dry_run=dry_run, shard=shard
        )
        run_id = None if dry_run else store.start_cycle(report.started_at, shard=shard)
        _fetch_and_persist(
            report, settings, client, store, baseline, only_org, dry_run, cancel, now_fn
        )
        if deliverer is not None and not dry_run and not cancel.is_set():
            with _phase(report, "deliver"):
                report.delivery = deliverer.deliver_due(cancel=cancel)
        report.duration = time.monotonic() - started
        report.outcome = _outcome(report, cancel)
        if run_id is not None:
            store.finish_cycle(
                run_id,
                now_fn(),
                orgs_read=report.orgs_read,
                orgs_failed=len(report.errors),
                outcome=report.outcome,
            )
        _log_summary(cycle_log, report)
        return report
    finally:
        structlog.contextvars.unbind_contextvars("cycle_id")


def _fetch_and_persist(
    report: CycleReport,
    settings: Settings,
    client: Source,
    store: AlertStore,
    baseline: bool,
    only_org: int | None,
    dry_run: bool,
    cancel: threading.Event,
    now_fn: Callable[[], datetime],
) -> None:
    try:
        with _phase(report, "fetch"):
            fetched = client.fetch_snapshots(only_org=only_org, cancel=cancel)
    except SourceError as exc:
        if cancel.is_set():  # the listing was broken off by the stop request, not the API
            log.warning("cycle.abandoned", reason="stop requested while fetching")
            return
        # No list means no data: every stored state stays exactly as it was.
        report.fatal = str(exc)
        log.error("cycle.list_failed", error=str(exc))
        return
    report.errors = list(fetched.errors)
    for error in report.errors:
        log.warning("org.read_failed", org_id=error.org_id, error=error.message)
    if cancel.is_set():
        log.warning("cycle.abandoned", reason="stop requested before any write")
        return
    now = now_fn()
    with _no_garbage_collection():
        decide_and_persist(report, fetched.snapshots, settings, store, now, baseline, dry_run)
    if not dry_run:
        store.maintain_history(now, timedelta(days=settings.history_retention_days))
    log_plans(report)


def log_plans(report: CycleReport) -> None:
    """The log events of what a cycle (or a batch of due reads) decided and wrote."""
    for plan in report.plans:
        if report.wrote(plan):
            _log_plan(plan)
        if plan.notice is not None and report.applied is not None:
            for notice in plan.notice.notifications:
                log.info(
                    f"org.{notice.kind}_notice",
                    org_id=plan.snapshot.id,
                    number=notice.breach_number,
                    status=notice.status,
                )


def decide_and_persist(
    report: CycleReport,
    snapshots: list[OrgSnapshot],
    settings: Settings,
    store: AlertStore,
    now: datetime,
    baseline: bool = False,
    dry_run: bool = False,
    *,
    batch: bool = False,
) -> None:
    """Decide every snapshot's plan and write them in one persist step, into ``report``.

    ``batch``: the snapshots are a few of the fleet (the adaptive schedule's due reads), so
    only their stored state is loaded, not the whole fleet's.
    """
    # An exception about one org (a value no step expected, a bug it triggers) fails that org
    # only: it is reported like an org that could not be read, and nothing of it is written.
    failed_ids: set[int] = set()

    def failed(org_id: int, step: str, error: BaseException | str) -> None:
        failed_ids.add(org_id)
        why = error if isinstance(error, str) else describe_failure(error)
        report.errors.append(OrgError(org_id, f"{step} failed: {why}"))
        log.error("org.failed", org_id=org_id, step=step, error=why)

    policy = Policy.of(settings, baseline=baseline, now=now)
    with _phase(report, "diff"):
        known = _load_known(store, policy, [s.id for s in snapshots] if batch else None)
        report.plans = _decide_all(snapshots, known, store, policy, failed)
        report.forecasts = {
            p.snapshot.id: p.forecast for p in report.plans if p.forecast is not None
        }
    if dry_run:
        return
    with _phase(report, "persist"):
        writes = CycleWrites(
            states=[plan.change for plan in report.plans if plan.change],
            notices=[plan.notice for plan in report.plans if plan.notice],
            balances=[
                (p.snapshot.id, p.snapshot.balance) for p in report.plans if p.record_balance
            ],
        )
        result = store.persist(writes, now)
        report.written, report.conflicts = result.written, result.conflicts
        report.applied = result.applied
        report.notices = result.notices
        for org_id, why in result.failed.items():
            failed(org_id, "saving", why)
        if failed_ids:
            report.plans = [plan for plan in report.plans if plan.snapshot.id not in failed_ids]
        store.record_errors([(e.org_id, e.message) for e in report.errors if e.org_id], now)


def _load_known(store: AlertStore, policy: Policy, org_ids: list[int] | None) -> dict[int, Known]:
    """What the store holds of the organizations (None: all of them); notice state only where
    notices are on."""
    rows = store.load_states(org_ids)
    if not policy.notices:
        return {org_id: Known(row) for org_id, row in rows.items()}
    notices = store.load_notice_states(org_ids)
    last_alerts = store.last_alerts(org_ids) if policy.remind_every is not None else {}
    return {
        org_id: Known(row, notices.get(org_id), last_alerts.get(org_id))
        for org_id, row in rows.items()
    }


def _decide_all(
    snapshots: list[OrgSnapshot],
    known: dict[int, Known],
    store: AlertStore,
    policy: Policy,
    failed: OrgFailure,
) -> list[OrgPlan]:
    """Each org's plan; an org whose decision raises is handed to ``failed`` and left out."""
    wanted: set[int] = set()
    skipped: set[int] = set()
    for snapshot in snapshots:
        try:
            if needs_history(snapshot, known.get(snapshot.id, NOTHING_KNOWN), policy):
                wanted.add(snapshot.id)
        except Exception as error:
            skipped.add(snapshot.id)
            failed(snapshot.id, "deciding", error)
    # Only the organizations that alert or whose notices move read any history.
    series = store.balance_series(sorted(wanted), since=policy.now - WEEK) if wanted else {}
    plans = []
    for snapshot in snapshots:
        org_id = snapshot.id
        if org_id in skipped:
            continue
        history = series.get(org_id, []) if org_id in wanted else None
        try:
            plans.append(decide(snapshot, known.get(org_id, NOTHING_KNOWN), policy, history))
        except Exception as error:
            failed(org_id, "deciding", error)
    return plans


@contextmanager
def _no_garbage_collection() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector while the cycle diffs and persists.

    These phases allocate objects by the hundred thousand that all live until the cycle ends,
    which makes CPython run full collections over the whole fleet that find next to no garbage
    (docs/architecture.md). Reference counting still frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def _phase(report: CycleReport, name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        report.phases[name] = time.monotonic() - started


def _log_plan(plan: OrgPlan) -> None:
    notification = plan.notification
    if notification is not None:
        status = notification.status
        event = "org.alerted" if status == NotificationStatus.PENDING else f"org.{status}"
        level = "warning" if status == NotificationStatus.NO_RECIPIENTS else "info"
        getattr(log, level)(
            event,
            org_id=plan.snapshot.id,
            breach=notification.breach_number,
            balance=str(plan.snapshot.balance),
            threshold=str(plan.snapshot.threshold),
        )
    elif plan.decision.rearmed:
        log.info("org.rearmed", org_id=plan.snapshot.id, balance=str(plan.snapshot.balance))


def warn_on_overrun(report: CycleReport, interval: float, *, scheduled: bool) -> bool:
    """Log ``cycle.overrun`` when the cycle took longer than ``interval``: breaches then wait
    longer than the operator believes. ``scheduled`` False: `poller once`, whose real period
    is cron's, so the configured interval stands in for it."""
    if report.duration <= interval:
        return False
    log.warning(
        "cycle.overrun",
        cycle_id=report.cycle_id,
        seconds=round(report.duration, 3),
        interval=interval,
        compared_with="POLLER_INTERVAL"
        if scheduled
        else "POLLER_INTERVAL (set it to the cron period: poller once has no schedule of its own)",
        hint="raise max_requests_per_second and/or concurrency, or the interval; "
        "see Sizing in docs/operations.md",
    )
    return True


def _outcome(report: CycleReport, cancel: threading.Event) -> str:
    if report.fatal:
        return "list_failed"
    if cancel.is_set():
        return "abandoned"
    return "ok" if report.ok else "partial"


def _log_summary(cycle_log: Any, report: CycleReport) -> None:
    delivery = report.delivery or DeliveryReport()
    cycle_log.info(
        "cycle.finished",
        outcome=report.outcome,
        orgs_read=report.orgs_read,
        orgs_failed=len(report.errors),
        breaches=report.breaches,
        rearmed=report.rearmed,
        written=report.written,
        conflicts=report.conflicts,
        emails_sent=delivery.sent,
        emails_retrying=delivery.retried,
        emails_failed=delivery.failed,
        undelivered=delivery.undelivered,
        seconds=round(report.duration, 3),
        **{f"{name}_seconds": round(seconds, 3) for name, seconds in report.phases.items()},
    )

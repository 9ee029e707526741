"""Commands that run the cycle: `once`, `run` (the daemon) and `check` (one organization)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from poller.cekura.client import CekuraClient
from poller.cli.common import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    fail,
    open_store,
    shard_option,
    sharded,
)
from poller.cli.present import outlook_json, plan_json, print_plan
from poller.cli.progress import terminal_progress
from poller.cli.terminal import echo_json
from poller.config.settings import Settings
from poller.engine.cycle import CycleReport, run_cycle, warn_on_overrun
from poller.engine.decide import OrgPlan
from poller.engine.delivery import Deliverer
from poller.engine.model import NotificationKind
from poller.engine.notices import content_for
from poller.engine.outlook import outlooks
from poller.engine.sharding import Shard
from poller.mail import render_email
from poller.store import Store

if TYPE_CHECKING:
    from poller.cli.metrics import PollerMetrics


def _run(
    settings: Settings, *, deliver: bool, show_progress: bool = False, **cycle_args: Any
) -> CycleReport:
    store = open_store(settings)
    deliverer = Deliverer(store=store, settings=settings) if deliver else None
    progress = terminal_progress() if show_progress else None
    with CekuraClient(settings, on_progress=progress) as client:
        return run_cycle(
            settings=settings, client=client, store=store, deliverer=deliverer, **cycle_args
        )


@click.command()
@click.option(
    "--baseline",
    is_flag=True,
    help="Record every organization's current state without sending anything.",
)
@shard_option
@click.pass_obj
def once(settings: Settings, baseline: bool, shard: Shard | None) -> None:
    """Run one full cycle: fetch every organization, diff, persist, deliver.

    Exit status 0 when every organization was read and every due email delivered, 1 when
    something is left for the next run, 2 for usage or configuration errors.

    \b
    Example (first deployment, then every 5 minutes from cron):
      poller once --baseline
      poller once
    """
    from poller.engine.daemon import in_worker_thread, stop_on_signals

    settings = sharded(settings, shard)
    settings.require_credentials()
    if not baseline:
        settings.require_mail_from()
    # As the daemon does: stop at the next safe point, nothing half-written; the next run
    # carries on. A second signal exits at once.
    cancel = threading.Event()
    stop_on_signals(cancel, cancel, forced_status=EXIT_INCOMPLETE)
    if settings.schedule == "adaptive" and not baseline:
        _once_adaptive(settings, cancel)
    report = in_worker_thread(
        lambda: _run(
            settings, deliver=not baseline, show_progress=True, baseline=baseline, cancel=cancel
        )
    )
    warn_on_overrun(report, settings.interval, scheduled=False)
    if cancel.is_set():
        fail(
            "stopped by a signal before the cycle finished (nothing was left half-written)",
            EXIT_INCOMPLETE,
        )
    if report.fatal:
        # Cron mails stderr: say in one line why nothing happened, not only in the JSON log.
        fail(f"{report.fatal} (nothing was changed)", EXIT_INCOMPLETE)
    sys.exit(EXIT_OK if report.ok else EXIT_INCOMPLETE)


def _once_adaptive(settings: Settings, cancel: threading.Event) -> NoReturn:
    """The adaptive schedule's `poller once`: the listing if due, then the reads that are due,
    until none is (or POLLER_INTERVAL has passed), and their emails."""
    from poller.engine.daemon import in_worker_thread
    from poller.engine.queue import STEP_BUDGET_SECONDS, QueueWorker, StepReport

    store = open_store(settings)
    total = StepReport()
    with CekuraClient(settings) as client:
        worker = QueueWorker(
            settings=settings,
            client=client,
            store=store,
            deliverer=Deliverer(store=store, settings=settings),
        )

        def drain() -> bool:
            """Steps until one finds nothing due; False when POLLER_INTERVAL (the cron
            period) ran out first, so that runs from cron never pile up."""
            deadline = time.monotonic() + settings.interval
            while not cancel.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                step = worker.step(cancel, budget=min(left, STEP_BUDGET_SECONDS))
                total.add(step)
                if not step.did_work:
                    return True
            return True

        finished = in_worker_thread(drain)
    if cancel.is_set():
        fail("stopped by a signal (nothing was left half-written)", EXIT_INCOMPLETE)
    if not finished:
        fail(
            f"reads still due after POLLER_INTERVAL ({settings.interval:g} s); "
            "the next run carries on (see Sizing in docs/operations.md)",
            EXIT_INCOMPLETE,
        )
    if total.listing_failed:
        fail(f"{total.listing_failed} (the due reads were still made)", EXIT_INCOMPLETE)
    complete = not total.read_errors and total.delivery.undelivered == 0
    sys.exit(EXIT_OK if complete and total.delivery.failed == 0 else EXIT_INCOMPLETE)


@click.command()
@click.option(
    "--baseline",
    is_flag=True,
    help="First cycle records the current state without sending anything.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="Serve Prometheus /metrics and /healthz on PORT (POLLER_METRICS_PORT).",
)
@shard_option
@click.pass_obj
def run(settings: Settings, baseline: bool, metrics_port: int | None, shard: Shard | None) -> None:
    """Run as a daemon: a cycle at start and every POLLER_INTERVAL seconds.

    SIGTERM or Ctrl-C stops after the current step; a second one stops at once.

    \b
    Example (the second of three replicas, with metrics):
      POLLER_INTERVAL=300 poller run --shard 2/3 --metrics-port 9102
    """
    from poller.cli.metrics import MetricsServer, PollerMetrics
    from poller.engine.daemon import run_daemon

    settings = sharded(settings, shard)
    settings.require_credentials()
    settings.require_mail_from()
    store = open_store(settings)
    deliverer = Deliverer(store=store, settings=settings)
    first = {"baseline": baseline}
    port = metrics_port or settings.metrics_port
    adaptive = settings.schedule == "adaptive"
    metrics = (
        PollerMetrics(
            interval=settings.interval,
            max_read_interval=settings.max_read_interval if adaptive else None,
        )
        if port
        else None
    )
    serving = (
        MetricsServer(metrics, settings.metrics_host, port)
        if metrics is not None and port
        else contextlib.nullcontext()
    )
    on_request = metrics.count_request if metrics is not None else None

    with (
        serving,
        CekuraClient(settings, on_progress=terminal_progress(), on_request=on_request) as client,
    ):

        def cycle(cancel: threading.Event) -> CycleReport:
            use_baseline, first["baseline"] = first["baseline"], False
            report = run_cycle(
                settings=settings,
                client=client,
                store=store,
                deliverer=None if use_baseline else deliverer,
                baseline=use_baseline,
                cancel=cancel,
            )
            overran = warn_on_overrun(report, settings.interval, scheduled=True)
            if metrics is not None:
                metrics.record_cycle(report, store, overran=overran)
            return report

        if adaptive:
            # --baseline: one full cycle records every org's state, then the queue's work.
            _run_adaptive(settings, client, store, deliverer, metrics, cycle if baseline else None)
        else:
            run_daemon(cycle, interval=settings.interval, jitter=settings.jitter)


def _run_adaptive(
    settings: Settings,
    client: CekuraClient,
    store: Store,
    deliverer: Deliverer,
    metrics: PollerMetrics | None,
    baseline_cycle: Callable[[threading.Event], object] | None,
) -> None:
    from poller.engine.daemon import run_worker_loop
    from poller.engine.queue import QueueWorker

    worker = QueueWorker(settings=settings, client=client, store=store, deliverer=deliverer)
    first = [baseline_cycle]

    def step(cancel: threading.Event) -> float:
        baseline, first[0] = first[0], None
        if baseline is not None:
            baseline(cancel)
            return 0.0
        report = worker.step(cancel)
        if metrics is not None:
            metrics.record_step(report, store)
        return 0.0 if report.did_work else worker.idle_wait()

    run_worker_loop(step, name=worker.name)


@click.command()
@click.option("--org", "org_id", type=int, required=True, help="Organization id.")
@click.option(
    "--dry-run", is_flag=True, help="Print the decision and the email; write and send nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def check(settings: Settings, org_id: int, dry_run: bool, as_json: bool) -> None:
    """Run the cycle for one organization and say what it did.

    \b
    Example:
      poller check --org 37 --dry-run
    """
    settings.require_credentials()
    if not dry_run:
        settings.require_mail_from()
    report = _run(settings, deliver=not dry_run, only_org=org_id, dry_run=dry_run)
    if report.fatal or not report.plans:
        reason = report.fatal or "; ".join(e.message for e in report.errors) or "not found"
        fail(f"organization {org_id} could not be read: {reason}", EXIT_INCOMPLETE)
    plan = report.plans[0]
    email = _email_preview(plan, settings) if dry_run else None
    snap = plan.snapshot
    outlook = outlooks(
        open_store(settings),
        settings,
        [(snap.id, snap.balance, snap.threshold, report.started_at)],
    )[snap.id]
    if as_json:
        echo_json(plan_json(plan, report, dry_run, email) | outlook_json(outlook))
    else:
        print_plan(plan, report, dry_run, email, outlook)
    sys.exit(EXIT_OK if report.ok else EXIT_INCOMPLETE)


def _email_preview(plan: OrgPlan, settings: Settings) -> dict[str, Any] | None:
    notification = plan.notification
    if notification is None:
        return None
    content = content_for(
        plan.snapshot,
        kind=NotificationKind.LOW_CREDITS,
        number=notification.breach_number,
        billing_url=settings.billing_url,
        now=notification.detected_at,
    )
    rendered = render_email(
        dataclasses.replace(
            content, burn_per_day=notification.burn_per_day, runs_out_at=notification.runs_out_at
        )
    )
    return {
        "to": list(notification.recipients),
        "subject": rendered.subject,
        "text": rendered.text,
        "status": notification.status,
    }

"""Prometheus metrics and `/healthz` for the daemon (`poller run --metrics-port PORT`).

One registry per daemon, served with its health verdict by a small HTTP server on a thread.
Counts from the database are read once after each cycle, so a scrape never touches the
database. The metrics and the /healthz rules are listed in docs/operations.md (Monitor).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from poller.config.settings import ConfigError
from poller.engine.cycle import CycleReport
from poller.engine.health import Verdict, is_successful, judge, judge_reads
from poller.engine.model import NotificationStatus, QueueStats, utc_now
from poller.engine.queue import StepReport
from poller.store import DatabaseError, Store
from poller.store.schema import notification, org_state

log = structlog.get_logger(__name__)

# From a handful of organizations (well under a second) to 100,000 (minutes).
CYCLE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Seconds between the adaptive schedule's reads of the queue's state for metrics and health.
QUEUE_STATS_SECONDS = 5.0
_ORG_ID_IN_PATH = re.compile(r"/\d+(?=/|$)")


def endpoint_label(endpoint: str) -> str:
    """``/user/organizations/37/`` → ``/user/organizations/{id}/``: one series per endpoint."""
    return _ORG_ID_IN_PATH.sub("/{id}", endpoint)


@dataclass(frozen=True)
class StoreCounts:
    organizations: dict[tuple[str, bool], int] = field(default_factory=dict)
    notifications: dict[str, int] = field(default_factory=dict)


def read_store_counts(store: Store) -> StoreCounts:
    orgs = select(org_state.c.state, org_state.c.enabled, func.count()).group_by(
        org_state.c.state, org_state.c.enabled
    )
    notes = select(notification.c.status, func.count()).group_by(notification.c.status)
    with (
        store.database_errors("counting organizations for metrics"),
        store.engine.connect() as conn,
    ):
        return StoreCounts(
            organizations={(state, bool(enabled)): n for state, enabled, n in conn.execute(orgs)},
            notifications={status: n for status, n in conn.execute(notes)},
        )


class _StoreCollector(Collector):
    """Serves the counts read after the last cycle; replaced whole, so a scrape never sees
    half of an update."""

    def __init__(self) -> None:
        self.counts: StoreCounts | None = None

    def collect(self) -> Iterator[Metric]:
        counts = self.counts
        if counts is None:
            return
        orgs = GaugeMetricFamily(
            "poller_organizations",
            "Organizations in the database, by alert state and enabled",
            labels=["state", "enabled"],
        )
        for (state, enabled), number in sorted(counts.organizations.items()):
            orgs.add_metric([state, "true" if enabled else "false"], number)
        notes = GaugeMetricFamily(
            "poller_notifications", "Notifications in the database, by status", labels=["status"]
        )
        for status, number in sorted(counts.notifications.items()):
            notes.add_metric([status], number)
        pending = GaugeMetricFamily(
            "poller_outbox_pending",
            "Emails recorded and not delivered yet (due or retrying)",
            value=counts.notifications.get(NotificationStatus.PENDING, 0),
        )
        yield from (orgs, notes, pending)


class PollerMetrics:
    """The daemon's metrics and health; fed by the API client's hook and after each cycle."""

    def __init__(
        self,
        *,
        interval: float,
        max_read_interval: float | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._interval = interval
        # Set on the adaptive schedule: reads overdue by more than this are unhealthy.
        self._max_read_interval = max_read_interval
        self._queue: QueueStats | None = None
        self._queue_read_at = float("-inf")
        self._max_age = 2 * interval
        self._held: tuple[int, str | None] = (0, None)
        self._started_at = clock()
        self._last_success_at: datetime | None = None
        self._last_success_seconds: float | None = None
        self._cycle_duration = Histogram(
            "poller_cycle_duration_seconds",
            "Duration of complete cycles",
            buckets=CYCLE_BUCKETS,
            registry=self.registry,
        )
        self._last_cycle_duration = Gauge(
            "poller_last_cycle_duration_seconds",
            "Duration of the last finished cycle, any outcome",
            registry=self.registry,
        )
        Gauge(
            "poller_interval_seconds",
            "Configured seconds between cycle starts (POLLER_INTERVAL)",
            registry=self.registry,
        ).set(interval)
        self._overruns = Counter(
            "poller_cycle_overruns",
            "Cycles that took longer than the interval",
            registry=self.registry,
        )
        self._cycles = Counter(
            "poller_cycles",
            "Cycles finished, by outcome (ok, partial, list_failed, abandoned)",
            ["outcome"],
            registry=self.registry,
        )
        self._last_success = Gauge(
            "poller_last_success_timestamp_seconds",
            "Unix time this process last finished a successful cycle",
            registry=self.registry,
        )
        self._api_requests = Counter(
            "poller_api_requests",
            "HTTP requests to the Cekura API, retries included",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._api_errors = Counter(
            "poller_api_errors",
            "Cekura API requests that failed (not 2xx, timeout, connection)",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._reads = Counter(
            "poller_reads",
            "Balance reads of the adaptive schedule, by outcome (ok, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self._overdue = Gauge(
            "poller_orgs_overdue",
            "Organizations whose read is due and not yet claimed (adaptive schedule)",
            registry=self.registry,
        )
        self._oldest_overdue = Gauge(
            "poller_oldest_overdue_seconds",
            "How long the most overdue organization has waited past its due time",
            registry=self.registry,
        )
        self._staleness = Gauge(
            "poller_read_staleness_p95_seconds",
            "Seconds since the last read, at the 95th percentile of organizations",
            registry=self.registry,
        )
        self._store_counts = _StoreCollector()
        self.registry.register(self._store_counts)

    def count_request(self, endpoint: str, outcome: str) -> None:
        """The API client's ``on_request`` hook."""
        labels = (endpoint_label(endpoint), outcome)
        self._api_requests.labels(*labels).inc()
        if not outcome.startswith("2"):
            self._api_errors.labels(*labels).inc()

    def record_cycle(self, report: CycleReport, store: Store, *, overran: bool) -> None:
        # Database counts first: a scrape that sees this cycle counted also sees its effects.
        try:
            self._store_counts.counts = read_store_counts(store)
            self._held = store.held_back()
        except DatabaseError as exc:
            # Stale gauges are better than a daemon that stops polling over a metrics query.
            log.warning("metrics.store_unreadable", error=str(exc))
        if report.outcome in ("ok", "partial"):
            self._cycle_duration.observe(report.duration)
        self._last_cycle_duration.set(report.duration)
        if overran:
            self._overruns.inc()
        if is_successful(report.outcome, report.orgs_read, len(report.errors)):
            self._last_success_seconds = report.duration
            self._last_success_at = self._clock()
            self._last_success.set(self._last_success_at.timestamp())
        self._cycles.labels(report.outcome).inc()

    def record_step(self, report: StepReport, store: Store) -> None:
        """After each step of the adaptive schedule; the database is read at most every
        QUEUE_STATS_SECONDS, so an idle replica polling the queue stays cheap."""
        self._reads.labels("ok").inc(report.reads - report.read_errors)
        self._reads.labels("failed").inc(report.read_errors)
        if report.listing is not None:
            self._last_success_at = self._clock()
            self._last_success.set(self._last_success_at.timestamp())
            self._cycles.labels("ok").inc()
        elif report.listing_failed is not None:
            self._cycles.labels("list_failed").inc()
        if time.monotonic() - self._queue_read_at < QUEUE_STATS_SECONDS:
            return
        self._queue_read_at = time.monotonic()
        try:
            self._queue = stats = store.queue_stats(self._clock())
            self._store_counts.counts = read_store_counts(store)
            self._held = store.held_back()
        except DatabaseError as exc:
            log.warning("metrics.store_unreadable", error=str(exc))
            return
        self._overdue.set(stats.overdue)
        self._oldest_overdue.set(stats.oldest_overdue_seconds)
        if stats.p95_staleness_seconds is not None:
            self._staleness.set(stats.p95_staleness_seconds)

    def health(self) -> Verdict:
        verdict = self._judge_cycles()
        if self._max_read_interval is None:
            return verdict
        return judge_reads(verdict, self._queue, self._max_read_interval)

    def _judge_cycles(self) -> Verdict:
        return judge(
            self._last_success_at,
            now=self._clock(),
            max_age=self._max_age,
            running_since=self._started_at,
            held=self._held,
            cycle_seconds=self._last_success_seconds,
            interval=self._interval,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` on a background thread."""

    def __init__(self, metrics: PollerMetrics, host: str, port: int) -> None:
        try:
            self._server = ThreadingHTTPServer((host, port), _handler_for(metrics))
        except OSError as exc:
            raise ConfigError(
                f"metrics_port: cannot listen on {host}:{port} ({exc.strerror or exc})"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def __enter__(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics.serving", port=self.port, paths=["/metrics", "/healthz"])
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(metrics: PollerMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "poller"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, CONTENT_TYPE_LATEST, metrics.exposition())
            elif path == "/healthz":
                verdict = metrics.health()
                body = (verdict.status_line + "\n").encode()
                self._answer(200 if verdict.healthy else 503, "text/plain; charset=utf-8", body)
            else:
                self._answer(404, "text/plain; charset=utf-8", b"try /metrics or /healthz\n")

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Scrapes every 15 s would drown the event log; errors still reach the caller.
            pass

    return Handler

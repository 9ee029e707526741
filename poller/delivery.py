"""Delivery of recorded notifications: claim → render → SMTP → mark sent / retry / failed.

At least once, made effectively once: a row is claimed with a conditional update (so two
pollers never send the same row), marked sent only after the SMTP server accepted the message,
and every attempt for the same breach carries the same Message-ID. A send starts only with
enough of the lease left (``renewal_margin``: half the lease, at least four SMTP timeouts);
when less is left, the lease of the rest of the batch is renewed first, in one statement, so
a long batch never outlives its claim. The one duplicate window is a process dying (or one
send outlasting what was left of its lease) after the server has the message and before the
row is marked sent; the lease then expires and another poller sends it again, with the same
Message-ID.
"""

from __future__ import annotations

import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from poller.config import Settings
from poller.mail import (
    AlertContent,
    DeliveryError,
    SmtpTransport,
    build_message,
    message_id_for,
    render_email,
)
from poller.store import ClaimedNotification, DatabaseError, Store

log = structlog.get_logger(__name__)

CLAIM_BATCH = 50
RETRY_BASE_SECONDS = 60.0
RETRY_CAP_SECONDS = 3600.0
# Waits between attempts to record an accepted email as sent (see Deliverer._record_sent).
MARK_SENT_RETRY_DELAYS = (0.1, 0.5, 1.0)


@dataclass
class DeliveryReport:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    # Pending rows left after this run (waiting for a retry), not counting rows another
    # poller holds a live lease on: they are being delivered right now.
    undelivered: int = 0

    def add(self, other: DeliveryReport) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed


def retry_delay(attempts: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: ~1 min, 2, 4, ... capped at an hour."""
    rng = rng or random.Random()
    base = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2 ** max(0, attempts - 1))
    return base * rng.uniform(0.8, 1.2)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Deliverer:
    def __init__(
        self,
        *,
        store: Store,
        settings: Settings,
        transport_factory: Callable[[], SmtpTransport] | None = None,
        now_fn: Callable[[], datetime] = lambda: datetime.now(UTC),
        worker: str | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._transport_factory = transport_factory or (lambda: smtp_transport(settings))
        self._now = now_fn
        self.worker = worker or worker_name()

    def deliver_due(self, cancel: threading.Event | None = None) -> DeliveryReport:
        """Send every due notification over up to ``smtp_connections`` parallel connections."""
        report = DeliveryReport()
        cancel = cancel or threading.Event()
        connections = max(1, self._settings.smtp_connections)
        # Batches no bigger than a fair share, so a few due emails still use every connection.
        due = self._store.pending_count(self._now()) if connections > 1 else CLAIM_BATCH
        batch = max(1, min(CLAIM_BATCH, math.ceil(due / connections)))
        # The first unusable-server answer stops every connection, not only the one that saw it.
        halt = threading.Event()
        if connections == 1:
            report.add(self._deliver_loop(batch, cancel, halt))
        else:
            with ThreadPoolExecutor(connections, thread_name_prefix="smtp") as pool:
                parts = [
                    pool.submit(self._deliver_loop, batch, cancel, halt) for _ in range(connections)
                ]
                for part in parts:
                    report.add(part.result())
        report.undelivered = self._store.pending_count(self._now(), exclude_in_flight=True)
        return report

    def _deliver_loop(
        self, batch: int, cancel: threading.Event, halt: threading.Event
    ) -> DeliveryReport:
        """One connection's work: claim a batch, send it, repeat; claims keep rows exclusive."""
        report = DeliveryReport()
        while not cancel.is_set() and not halt.is_set():
            claimed = self._store.claim_due(
                worker=self.worker,
                now=self._now(),
                lease_seconds=self._settings.delivery_lease,
                limit=batch,
            )
            if not claimed:
                break
            if not self._send_batch(claimed, report, cancel):
                halt.set()
        return report

    def _send_batch(
        self, claimed: list[ClaimedNotification], report: DeliveryReport, cancel: threading.Event
    ) -> bool:
        """Send a claimed batch over one SMTP connection; False when the server is unusable."""
        lease = _BatchLease(claimed, store=self._store, worker=self.worker, settings=self._settings)
        with self._transport_factory() as transport:
            for index, row in enumerate(claimed):
                if cancel.is_set():
                    # Not the server's fault: due again at once for whichever poller runs next.
                    self._release(claimed[index:], "stopped before sending", report, backoff=False)
                    return False
                try:
                    message = self._message(row)
                except ValueError as exc:
                    # Nothing the server could say will fix an unbuildable message (an
                    # address the API gave us that is not an address): fail it loudly.
                    self._fail(
                        row, DeliveryError(f"cannot build the email: {exc}", permanent=True), report
                    )
                    continue
                if not lease.holds(index, self._now()):
                    # The batch outlasted our lease and another poller took this row over:
                    # sending it too would be a duplicate.
                    log.info("email.handed_over", org_id=row.org_id, breach=row.breach_number)
                    continue
                try:
                    refused = transport.send(message, row.recipients)
                except DeliveryError as exc:
                    if exc.permanent:
                        self._fail(row, exc, report)
                        continue
                    # A temporary failure (server down, 4xx) will hit the rest of the batch
                    # too: put them all back for later instead of timing out on each.
                    self._release(claimed[index:], str(exc), report)
                    return False
                self._mark_sent(row, refused, report)
        return True

    def _message(self, row: ClaimedNotification):
        mail_from = self._settings.mail_from
        assert mail_from, "callers check Settings.require_mail_from() before delivering"
        content = AlertContent(
            org_id=row.org_id,
            org_name=row.org_name,
            breach_number=row.breach_number,
            balance=row.balance,
            threshold=row.threshold,
            detected_at=row.detected_at,
            billing_url=self._settings.billing_url,
            auto_refill=row.auto_refill,
            kind=row.kind,
            burn_per_day=row.burn_per_day,
            runs_out_at=row.runs_out_at,
        )
        return build_message(
            render_email(content),
            mail_from=mail_from,
            recipients=row.recipients,
            message_id=self._message_id(row),
            date=row.detected_at,
        )

    def _message_id(self, row: ClaimedNotification) -> str:
        return message_id_for(
            row.org_id,
            row.breach_number,
            self._settings.mail_from or "",
            detected_at=row.detected_at,
            # Each kind numbers its notices separately: the kind keeps their IDs apart.
            kind=row.kind.replace("_", "-"),
        )

    def _mark_sent(self, row: ClaimedNotification, refused: dict, report: DeliveryReport) -> None:
        message_id = self._message_id(row)
        if not self._record_sent(row, message_id):
            # Our lease ran out while sending and someone else took the row over; they
            # will send it again with the same Message-ID. Say so: it is a duplicate.
            log.warning("email.lease_lost", org_id=row.org_id, breach=row.breach_number)
        report.sent += 1
        log.info(
            "email.sent",
            org_id=row.org_id,
            breach=row.breach_number,
            recipients=len(row.recipients) - len(refused),
            message_id=message_id,
        )
        for address, (code, answer) in refused.items():
            log.warning(
                "email.recipient_refused",
                org_id=row.org_id,
                breach=row.breach_number,
                recipient=address,
                smtp_code=code,
                answer=answer.decode("utf-8", "replace") if isinstance(answer, bytes) else answer,
            )

    def _record_sent(self, row: ClaimedNotification, message_id: str) -> bool:
        """Mark the row sent, trying again on a fresh connection if the database hiccups.

        The server has the message already: every failed attempt here widens the one window
        in which an email can be sent twice, so a dropped connection is worth a few retries.
        """
        for delay in MARK_SENT_RETRY_DELAYS:
            try:
                return self._store.mark_sent(
                    row.id, worker=self.worker, message_id=message_id, now=self._now()
                )
            except DatabaseError as exc:
                log.warning(
                    "email.mark_sent_retry",
                    org_id=row.org_id,
                    breach=row.breach_number,
                    error=str(exc),
                )
                time.sleep(delay)
        try:
            return self._store.mark_sent(
                row.id, worker=self.worker, message_id=message_id, now=self._now()
            )
        except DatabaseError:
            log.error(
                "email.unrecorded",
                org_id=row.org_id,
                breach=row.breach_number,
                message_id=message_id,
                hint="the SMTP server accepted this email but the database could not record "
                "it; it will be sent again, with the same Message-ID, once its lease expires",
            )
            raise

    def _fail(self, row: ClaimedNotification, exc: DeliveryError, report: DeliveryReport) -> None:
        self._store.mark_failed(row.id, worker=self.worker, error=str(exc), now=self._now())
        report.failed += 1
        log.error(
            "email.failed",
            org_id=row.org_id,
            breach=row.breach_number,
            error=str(exc),
            hint="this email will not be retried: check the admins' addresses in Cekura, "
            "POLLER_MAIL_FROM and the SMTP server's answer above",
        )

    def _release(
        self,
        rows: list[ClaimedNotification],
        error: str,
        report: DeliveryReport,
        *,
        backoff: bool = True,
    ) -> None:
        now = self._now()
        for row in rows:
            delay = retry_delay(row.attempts) if backoff else 0.0
            next_attempt = now + timedelta(seconds=delay)
            if not self._store.mark_retry(
                row.id, worker=self.worker, error=error, next_attempt_at=next_attempt, now=now
            ):
                continue  # taken over by another poller once our lease ran out: theirs now
            report.retried += 1
            log.warning(
                "email.retry",
                org_id=row.org_id,
                breach=row.breach_number,
                attempt=row.attempts,
                next_attempt_at=next_attempt.isoformat(),
                error=error,
            )


def renewal_margin(settings: Settings) -> float:
    """Seconds of lease a send must have left when it starts, else the batch's lease is renewed.

    Half the lease, and at least four SMTP timeouts: a send is a handful of SMTP exchanges,
    each given up after one timeout, so only a send that stalls almost to the timeout on
    several of them can outlast what is left (``email.lease_lost``, the documented duplicate).
    A lease too short for that margin is renewed before every send.
    """
    return max(settings.delivery_lease / 2, 4 * settings.smtp_timeout)


class _BatchLease:
    """The lease on one claimed batch: renewed in one statement when it runs low.

    A send starts only on a row this worker holds with at least ``renewal_margin`` seconds
    (or, for a lease shorter than that, a freshly renewed full lease) left. Renewing per batch
    instead of per email saves a write transaction per email; with the default lease (300 s)
    a batch of 50 fast sends never needs one.
    """

    def __init__(
        self, claimed: list[ClaimedNotification], *, store: Store, worker: str, settings: Settings
    ) -> None:
        self._rows = claimed
        self._store = store
        self._worker = worker
        self._lease = timedelta(seconds=settings.delivery_lease)
        self._margin = timedelta(seconds=renewal_margin(settings))
        # Claimed together by one UPDATE, the rows share one expiry.
        self._expires_at = min(row.claim_expires_at for row in claimed if row.claim_expires_at)
        self._lost: set[int] = set()  # taken over by another poller: never to be sent here

    def holds(self, index: int, now: datetime) -> bool:
        """Whether row ``index`` may be sent now; renews the rest of the batch if time is low."""
        if self._expires_at - now < self._margin:
            until = now + self._lease
            rest = [row.id for row in self._rows[index:] if row.id not in self._lost]
            held = self._store.renew_claims(rest, worker=self._worker, now=now, until=until)
            self._lost.update(set(rest) - held)
            self._expires_at = until
        return self._rows[index].id not in self._lost


def smtp_transport(settings: Settings) -> SmtpTransport:
    return SmtpTransport(
        host=settings.smtp_host,
        port=settings.smtp_port,
        security=settings.smtp_security,
        username=settings.smtp_username,
        password=settings.smtp_password,
        timeout=settings.smtp_timeout,
    )

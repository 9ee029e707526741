"""Delivery of recorded notifications: claim due rows → render → send → record each outcome.

At least once, made effectively once: rows are claimed with a lease (two pollers never send
the same row), marked sent only after the SMTP server accepted the message, and every attempt
carries the same Message-ID. The one duplicate window is described in docs/guarantees.md.
"""

from __future__ import annotations

import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta

import structlog

from poller.config.settings import Settings
from poller.engine.addresses import InvalidAddress, checked_address, needs_smtputf8
from poller.engine.cancellation import on_cancel
from poller.engine.model import DeliveryReport, NotificationKind, NotificationStatus, utc_now
from poller.engine.outcomes import (
    FAILED,
    RETRYING,
    SENT,
    delivery_summary,
    row_status,
    still_to_send,
)
from poller.mail import (
    NO_SMTPUTF8,
    AlertContent,
    DeliveryError,
    OutgoingMessage,
    SmtpTransport,
    build_message,
    is_permanent,
    message_id_for,
    render_email,
    reply_text,
    smtp_transport,
)
from poller.store import ClaimedNotification, DatabaseError, Store

log = structlog.get_logger(__name__)

CLAIM_BATCH = 50
# How long a stop waits for the sends under way before breaking their connections.
SEND_STOP_GRACE_SECONDS = 3.0
RETRY_BASE_SECONDS = 60.0
RETRY_CAP_SECONDS = 3600.0
# Waits between attempts to record an accepted email as sent (see Deliverer._record_sent).
MARK_SENT_RETRY_DELAYS = (0.1, 0.5, 1.0)


def retry_delay(attempts: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: ~1 min, 2, 4, ... capped at an hour."""
    rng = rng or random.Random()
    base = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2.0 ** max(0, attempts - 1))
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
        now_fn: Callable[[], datetime] = utc_now,
        worker: str | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._transport_factory = transport_factory or (lambda: smtp_transport(settings))
        self._now = now_fn
        self.worker = worker or worker_name()
        # The connections sending right now, for a stop to break (``_abort_sends``).
        self._open: set[SmtpTransport] = set()
        self._open_lock = threading.Lock()

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
        # A stop lets the sends under way finish for a moment (they take milliseconds), then
        # breaks their connections: a stalled server would otherwise hold the stop for up to
        # smtp_timeout per exchange, past a container's or systemd's stop timeout.
        with on_cancel(cancel, self._abort_sends, grace=SEND_STOP_GRACE_SECONDS):
            if connections == 1:
                report.add(self._deliver_loop(batch, cancel, halt))
            else:
                with ThreadPoolExecutor(connections, thread_name_prefix="smtp") as pool:
                    parts = [
                        pool.submit(self._deliver_loop, batch, cancel, halt)
                        for _ in range(connections)
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
        with self._transport_factory() as transport, self._sending_over(transport):
            for index, row in enumerate(claimed):
                if cancel.is_set():
                    # Not the server's fault: due again at once for whichever poller runs next.
                    self._release(claimed[index:], None, report, backoff=False)
                    return False
                if not lease.holds(index, self._now()):
                    # The batch outlasted our lease and another poller took this row over:
                    # sending it too would be a duplicate.
                    log.info("email.handed_over", org_id=row.org_id, breach=row.breach_number)
                    continue
                try:
                    self._send_row(row, transport, report)
                except DeliveryError as exc:
                    if exc.maybe_delivered:
                        # The one duplicate no lease can prevent: the server may have this
                        # message; its retry carries the same Message-ID.
                        log.warning(
                            "email.maybe_delivered",
                            org_id=row.org_id,
                            breach=row.breach_number,
                            message_id=self._message_id(row),
                        )
                    if cancel.is_set():
                        # Broken off by a stop (_abort_sends): not the server's fault, so due
                        # again at once for whichever poller runs next.
                        self._release(claimed[index:], None, report, backoff=False)
                        return False
                    # Not about this message's recipients (server down, login, sender refused,
                    # 4xx to MAIL or DATA): the rest of the batch would meet it too, so put
                    # them all back for later instead of timing out on each.
                    self._release(claimed[index:], exc, report)
                    return False
        return True

    @contextmanager
    def _sending_over(self, transport: SmtpTransport) -> Iterator[None]:
        with self._open_lock:
            self._open.add(transport)
        try:
            yield
        finally:
            with self._open_lock:
                self._open.discard(transport)

    def _abort_sends(self) -> None:
        with self._open_lock:
            sending = list(self._open)
        for transport in sending:
            log.warning("email.send_aborted", reason="stop requested during a send")
            transport.abort()

    def _send_row(
        self, row: ClaimedNotification, transport: SmtpTransport, report: DeliveryReport
    ) -> None:
        """Send ``row`` to its recipients still to send, and record each one's outcome.

        Raises DeliveryError for a failure that is not about the recipients and would hit the
        next message too; the caller releases the batch.
        """
        outcomes = _Outcomes(row, self._now())
        # Addresses recorded before poller checked them as the builder does: one bad address
        # costs its own recipient only.
        addressable = []
        for address in row.recipients:
            try:
                checked_address(address)
            except InvalidAddress as problem:
                outcomes.settle(address, FAILED, str(problem))
            else:
                addressable.append(address)
        if any(map(needs_smtputf8, addressable)) and not transport.smtputf8():
            for address in filter(needs_smtputf8, addressable):
                outcomes.settle(address, FAILED, reply_text(*NO_SMTPUTF8))
            addressable = [address for address in addressable if not needs_smtputf8(address)]
        envelope = still_to_send(addressable, outcomes.deliveries)
        if envelope:
            try:
                # Every attempt says the same To (all the recipients this server can
                # address), whichever of them it goes to: it is the same email.
                message = self._message(row, addressable)
            except ValueError as exc:
                # Not about the recipients (a setting, a template): failing it would lose the
                # alert, so it waits, loudly, for the fix.
                self._hold(row, f"cannot build the email: {exc}", outcomes, report)
                return
            try:
                refused = transport.send(message, envelope)
            except DeliveryError as exc:
                if exc.refused:
                    refused = exc.refused
                elif exc.permanent:
                    # The server refuses this message itself (5xx to DATA): others may pass.
                    self._hold(row, str(exc), outcomes, report)
                    return
                else:
                    raise
            outcomes.record_answers(envelope, refused)
        self._finish(row, outcomes, report)

    def _message(self, row: ClaimedNotification, recipients: list[str]) -> OutgoingMessage:
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
            kind=NotificationKind(row.kind),
            burn_per_day=row.burn_per_day,
            runs_out_at=row.runs_out_at,
        )
        return build_message(
            render_email(content),
            mail_from=mail_from,
            recipients=recipients,
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

    def _finish(
        self, row: ClaimedNotification, outcomes: _Outcomes, report: DeliveryReport
    ) -> None:
        """Record the outcomes of this attempt and the row status they add up to."""
        for address, (outcome, answer) in outcomes.new_refusals.items():
            log.warning(
                "email.recipient_refused",
                org_id=row.org_id,
                breach=row.breach_number,
                recipient=address,
                outcome=outcome,
                answer=answer,
            )
        deliveries = outcomes.deliveries
        status = row_status(row.recipients, deliveries)
        message_id = self._message_id(row)
        now = self._now()
        if status == NotificationStatus.SENT:
            held = self._record(
                row,
                outcomes,
                lambda: self._store.mark_sent(
                    row.id,
                    worker=self.worker,
                    message_id=message_id,
                    now=now,
                    deliveries=deliveries,
                ),
            )
            report.sent += 1
            log.info(
                "email.sent",
                org_id=row.org_id,
                breach=row.breach_number,
                recipients=outcomes.accepted,
                message_id=message_id,
                outcome=delivery_summary(status, row.recipients, deliveries),
            )
        elif status == NotificationStatus.FAILED:
            error = "; ".join(
                f"{address}: {deliveries[address]['answer']}" for address in row.recipients
            )
            held = self._record(
                row,
                outcomes,
                lambda: self._store.mark_failed(
                    row.id, worker=self.worker, error=error, now=now, deliveries=deliveries
                ),
            )
            report.failed += 1
            log.error(
                "email.failed",
                org_id=row.org_id,
                breach=row.breach_number,
                error=error,
                hint="every recipient was refused for good: check the admins' addresses "
                "in Cekura; `poller requeue --failed` sends it again",
            )
        else:
            next_attempt = now + timedelta(seconds=retry_delay(row.attempts))
            # No message-level error: only some recipients are to be tried again.
            held = self._record(
                row,
                outcomes,
                lambda: self._store.mark_retry(
                    row.id,
                    worker=self.worker,
                    error=None,
                    next_attempt_at=next_attempt,
                    now=now,
                    deliveries=deliveries,
                ),
            )
            report.retried += 1
            log.warning(
                "email.retry",
                org_id=row.org_id,
                breach=row.breach_number,
                attempt=row.attempts,
                next_attempt_at=next_attempt.isoformat(),
                outcome=delivery_summary(status, row.recipients, deliveries),
            )
        if not held and outcomes.accepted:
            # Our lease ran out while sending and someone else took the row over; they
            # will send it again with the same Message-ID. Say so: it is a duplicate.
            log.warning("email.lease_lost", org_id=row.org_id, breach=row.breach_number)

    def _record(
        self, row: ClaimedNotification, outcomes: _Outcomes, mark: Callable[[], bool]
    ) -> bool:
        """Record an attempt, trying again on a fresh connection if the database hiccups.

        When the server accepted the message for someone, every failed attempt here widens
        the one window in which an email can be sent twice, so a dropped connection is worth
        a few retries.
        """
        if not outcomes.accepted:
            return mark()
        for delay in MARK_SENT_RETRY_DELAYS:
            try:
                return mark()
            except DatabaseError as exc:
                log.warning(
                    "email.mark_sent_retry",
                    org_id=row.org_id,
                    breach=row.breach_number,
                    error=str(exc),
                )
                time.sleep(delay)
        try:
            return mark()
        except DatabaseError:
            log.error(
                "email.unrecorded",
                org_id=row.org_id,
                breach=row.breach_number,
                message_id=self._message_id(row),
                hint="the SMTP server accepted this email but the database could not record "
                "it; it will be sent again, with the same Message-ID, once its lease expires",
            )
            raise

    def _hold(
        self, row: ClaimedNotification, error: str, outcomes: _Outcomes, report: DeliveryReport
    ) -> None:
        """Keep one row pending with backoff for a problem that is not about its recipients."""
        now = self._now()
        next_attempt = now + timedelta(seconds=retry_delay(row.attempts))
        if self._store.mark_retry(
            row.id,
            worker=self.worker,
            error=error,
            next_attempt_at=next_attempt,
            now=now,
            deliveries=outcomes.deliveries,
        ):
            report.retried += 1
        log.error(
            "email.held",
            org_id=row.org_id,
            breach=row.breach_number,
            error=error,
            next_attempt_at=next_attempt.isoformat(),
            hint=HELD_HINT,
        )

    def _release(
        self,
        rows: list[ClaimedNotification],
        error: DeliveryError | None,
        report: DeliveryReport,
        *,
        backoff: bool = True,
    ) -> None:
        """Put rows back to pending; ``error`` None: not tried, keeping what each row said."""
        now = self._now()
        for row in rows:
            delay = retry_delay(row.attempts) if backoff else 0.0
            next_attempt = now + timedelta(seconds=delay)
            text = row.last_error if error is None else str(error)
            if not self._store.mark_retry(
                row.id,
                worker=self.worker,
                error=text,
                next_attempt_at=next_attempt,
                now=now,
                deliveries=row.deliveries,
            ):
                continue  # taken over by another poller once our lease ran out: theirs now
            report.retried += 1
            log.warning(
                "email.retry",
                org_id=row.org_id,
                breach=row.breach_number,
                attempt=row.attempts,
                next_attempt_at=next_attempt.isoformat(),
                error=text,
            )
        if error is not None and (error.smtp_code or 0) >= 500:
            # A 5xx that is not about the recipients (sender refused, login rejected): no
            # retry fixes it by itself, someone must.
            log.error("email.held", error=str(error), emails=len(rows), hint=HELD_HINT)


HELD_HINT = (
    "not about the recipients: the emails stay pending and go out once fixed; check "
    "POLLER_MAIL_FROM, POLLER_SMTP_USERNAME / PASSWORD and the SMTP server's answer"
)


class _Outcomes:
    """One attempt's view of a row's per-recipient outcomes, started from what is stored."""

    def __init__(self, row: ClaimedNotification, now: datetime) -> None:
        self.deliveries = {address: dict(entry) for address, entry in row.deliveries.items()}
        self._pending = set(still_to_send(row.recipients, row.deliveries))
        self._at = now.isoformat()
        self.accepted = 0
        self.new_refusals: dict[str, tuple[str, str]] = {}

    def settle(self, address: str, outcome: str, answer: str) -> None:
        """Record an outcome for a recipient that did not have a final one yet."""
        if address not in self._pending:
            return
        self.deliveries[address] = {"outcome": outcome, "answer": answer, "at": self._at}
        if outcome == SENT:
            self.accepted += 1
        else:
            self.new_refusals[address] = (outcome, answer)

    def record_answers(self, envelope: list[str], refused: dict[str, tuple[int, bytes]]) -> None:
        for address in envelope:
            if address not in refused:
                self.settle(address, SENT, "accepted")
                continue
            code, text = refused[address]
            outcome = FAILED if is_permanent(code) else RETRYING
            self.settle(address, outcome, reply_text(code, text))


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

"""Leases during delivery: a send never starts on a lease that ran out or was taken over, however
long a batch takes, although leases are renewed per batch (when they run low), not per email.

Real SMTP server, real SQLite and PostgreSQL; the clock is passed in and moved by the sends
themselves, so a "slow" send takes as long as the test says without the test waiting for it.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from datetime import datetime, timedelta
from types import TracebackType

import pytest

from poller.config.settings import Settings, load_settings
from poller.engine.delivery import Deliverer
from poller.mail import OutgoingMessage, SmtpTransport, smtp_transport
from poller.store import Store
from tests.store.test_store import NOW, count_writes, seed_pending

_ORG_IN_MESSAGE_ID = re.compile(r"<low-credits\.(\d+)\.")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


class WatchedTransport:
    """The real SMTP transport; before each send it writes down what the database says about
    the lease of the row being sent, then the send "takes" ``seconds_per_send`` on the clock."""

    def __init__(
        self,
        real: SmtpTransport,
        store: Store,
        clock: Clock,
        worker: str,
        seconds_per_send: float,
        least_left: float,
    ) -> None:
        self._real = real
        self._store = store
        self._clock = clock
        self._worker = worker
        self._seconds_per_send = seconds_per_send
        self._least_left = timedelta(seconds=least_left)
        self.violations: list[str] = []
        self.sent_orgs: list[int] = []
        self.after_send: list = []  # callables run after the n-th send (index n - 1)

    def __enter__(self) -> WatchedTransport:
        self._real.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._real.__exit__(exc_type, exc, traceback)

    def send(self, message: OutgoingMessage, recipients: list[str]) -> dict:
        match = _ORG_IN_MESSAGE_ID.search(message.message["Message-ID"])
        assert match is not None
        org_id = int(match.group(1))
        [row] = self._store.notifications_for(org_id)
        left = (row.claim_expires_at - self._clock.now) if row.claim_expires_at else None
        if row.claimed_by != self._worker or left is None or left < self._least_left:
            self.violations.append(
                f"org {org_id}: sending with claimed_by={row.claimed_by!r}, lease left {left}"
            )
        refused = self._real.send(message, recipients)
        self.sent_orgs.append(org_id)
        self._clock.now += timedelta(seconds=self._seconds_per_send)
        if len(self.after_send) >= len(self.sent_orgs):
            self.after_send[len(self.sent_orgs) - 1]()
        return refused


def settings_for(smtp_port: int, database_url: str, lease: float, timeout: float) -> Settings:
    return load_settings(
        env={
            "POLLER_DATABASE_URL": database_url,
            "POLLER_SMTP_HOST": "127.0.0.1",
            "POLLER_SMTP_PORT": str(smtp_port),
            "POLLER_SMTP_SECURITY": "none",
            "POLLER_MAIL_FROM": "alerts@poller.example.com",
            "POLLER_SMTP_CONNECTIONS": "1",
            "POLLER_DELIVERY_LEASE": str(lease),
            "POLLER_SMTP_TIMEOUT": str(timeout),
        }
    )


def watched_deliverer(
    store: Store,
    settings: Settings,
    clock: Clock,
    seconds_per_send: float,
    least_left: float = 150,
) -> tuple[Deliverer, WatchedTransport]:
    """``least_left``: the lease a send must still have when it starts (by default half the
    default 300 s lease, which is more than four 30 s SMTP timeouts)."""
    worker = "poller-under-test"
    watched = WatchedTransport(
        smtp_transport(settings), store, clock, worker, seconds_per_send, least_left
    )
    deliverer = Deliverer(
        store=store,
        settings=settings,
        transport_factory=lambda: watched,
        now_fn=clock,
        worker=worker,
    )
    return deliverer, watched


@pytest.mark.parametrize(
    ("lease", "timeout", "seconds_per_send", "least_left"),
    [
        (300, 30, 1, 150),  # the defaults, fast sends: the claim's own lease covers the batch
        (300, 30, 90, 150),  # a third of the lease per send: renewed every couple of sends
        (300, 30, 210, 150),  # more than the margin per send: renewed before every send
        (300, 30, 450, 150),  # each send outlasts the lease (nobody else takes the rows)
        (300, 100, 90, 300),  # four SMTP timeouts exceed the lease: a full lease every send
        (2, 5, 0.7, 2),  # the crash harness's short lease: a full lease for every send
    ],
)
def test_a_send_never_starts_without_a_live_lease_however_long_the_batch(
    store: Store,
    database_url: str,
    smtp_server,
    lease: float,
    timeout: float,
    seconds_per_send: float,
    least_left: float,
) -> None:
    seed_pending(store, 12)
    settings = settings_for(smtp_server.port, database_url, lease, timeout)
    clock = Clock()
    deliverer, watched = watched_deliverer(store, settings, clock, seconds_per_send, least_left)

    report = deliverer.deliver_due()

    assert watched.violations == []
    assert report.sent == 12
    assert sorted(watched.sent_orgs) == list(range(1, 13))
    assert Counter(len(m.rcpt_tos) for m in smtp_server.received) == {2: 12}


def test_a_batch_that_outlives_no_lease_costs_one_write_per_email(
    store: Store, database_url: str, smtp_server
) -> None:
    seed_pending(store, 12)
    settings = settings_for(smtp_server.port, database_url, lease=300, timeout=30)
    deliverer, watched = watched_deliverer(store, settings, Clock(), seconds_per_send=1)
    writes = count_writes(store)

    assert deliverer.deliver_due().sent == 12

    assert watched.violations == []
    assert writes == {"UPDATE": 1 + 12}  # the batch's claim, then one mark per email


def test_rows_another_poller_took_over_while_a_batch_ran_are_never_sent_by_the_first(
    store: Store, database_url: str, smtp_server
) -> None:
    seed_pending(store, 6)
    settings = settings_for(smtp_server.port, database_url, lease=300, timeout=30)
    clock = Clock()
    deliverer, watched = watched_deliverer(store, settings, clock, seconds_per_send=1)
    taken_over: list[int] = []

    def lease_runs_out_and_another_poller_claims() -> None:
        # The second send stalls past the whole lease; meanwhile another poller claims what
        # is due, the row being sent included (it is not marked sent yet).
        clock.now += timedelta(seconds=301)
        claimed = store.claim_due(worker="other poller", now=clock.now, lease_seconds=300)
        taken_over.extend(row.org_id for row in claimed)

    watched.after_send.extend([lambda: None, lease_runs_out_and_another_poller_claims])

    report = deliverer.deliver_due()

    assert watched.violations == []
    assert watched.sent_orgs == [1, 2]
    assert taken_over == [2, 3, 4, 5, 6]
    assert len(smtp_server.received) == 2
    # Org 2's email reached the server after its lease ran out: the documented duplicate
    # (email.lease_lost); the other poller will send it again with the same Message-ID.
    assert report.sent == 2
    for org_id in taken_over:
        [row] = store.notifications_for(org_id)
        assert (row.status, row.claimed_by) == ("pending", "other poller")
    [first] = store.notifications_for(1)
    assert first.status == "sent"


def test_renewing_a_lease_keeps_only_the_rows_the_worker_still_holds(store: Store) -> None:
    ids = seed_pending(store, 3)
    store.claim_due(worker="a", now=NOW, lease_seconds=60)
    later = NOW + timedelta(seconds=61)
    [taken] = store.claim_due(worker="b", now=later, lease_seconds=60, limit=1)
    store.mark_sent(ids[2], worker="a", message_id="<x@y>", now=later)
    until = later + timedelta(seconds=60)

    held = store.renew_claims(ids, worker="a", now=later, until=until)

    assert held == {ids[1]}
    assert taken.id == ids[0]
    [renewed] = store.notifications_for(2)
    assert (renewed.claimed_by, renewed.claim_expires_at) == ("a", until)
    [other] = store.notifications_for(1)
    assert other.claimed_by == "b"


def test_a_stopped_batch_puts_back_only_the_rows_it_still_holds(
    store: Store, database_url: str, smtp_server
) -> None:
    seed_pending(store, 4)
    settings = settings_for(smtp_server.port, database_url, lease=300, timeout=30)
    clock = Clock()
    deliverer, watched = watched_deliverer(store, settings, clock, seconds_per_send=1)
    stop = threading.Event()

    def lease_runs_out_another_poller_claims_and_a_stop_arrives() -> None:
        clock.now += timedelta(seconds=301)
        store.claim_due(worker="other poller", now=clock.now, lease_seconds=300)
        stop.set()

    watched.after_send.append(lease_runs_out_another_poller_claims_and_a_stop_arrives)

    report = deliverer.deliver_due(cancel=stop)

    assert watched.sent_orgs == [1]
    # The three unsent rows are the other poller's now: nothing of ours to put back.
    assert (report.sent, report.retried) == (1, 0)
    for org_id in (2, 3, 4):
        [row] = store.notifications_for(org_id)
        assert (row.status, row.claimed_by, row.last_error) == ("pending", "other poller", None)

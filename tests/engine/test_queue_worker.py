"""The adaptive schedule end to end: the queue worker against the simulator over HTTP, a real
SMTP server and SQLite and PostgreSQL, with the clock it is handed moved by the test."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal

import pytest

from poller.cekura.client import CekuraClient
from poller.devtools.simulator import Fault
from poller.engine.delivery import Deliverer
from poller.engine.queue import QueueWorker, StepReport
from tests.engine_world import ACME, ACME_ADMINS, GLOBEX, INITECH, World, run_poller
from tests.fixtures.api import FixedClock

ADAPTIVE = {
    "POLLER_SCHEDULE": "adaptive",
    "POLLER_INTERVAL": "300",
    "POLLER_MIN_READ_INTERVAL": "30",
    "POLLER_MAX_READ_INTERVAL": "3600",
    "POLLER_READ_LEASE": "60",
}


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


@pytest.fixture
def worker_for(world: World, clock: FixedClock) -> Callable[..., QueueWorker]:
    clients: list[CekuraClient] = []

    def make(name: str = "worker-a", **extra: str) -> QueueWorker:
        settings = world.settings(**{**ADAPTIVE, **extra})
        client = CekuraClient(settings, sleep=lambda _seconds: None)
        clients.append(client)
        return QueueWorker(
            settings=settings,
            client=client,
            store=world.store,
            deliverer=Deliverer(store=world.store, settings=settings, now_fn=clock),
            now_fn=clock,
            name=name,
        )

    yield make
    for client in clients:
        client.close()


def step(worker: QueueWorker) -> StepReport:
    return worker.step(threading.Event())


def reasons(world: World) -> dict[int, str]:
    return {org_id: read.reason for org_id, read in world.store.scheduled_reads().items()}


def test_the_first_step_lists_and_reads_every_organization_once(world, worker_for, clock):
    worker = worker_for()
    report = step(worker)
    assert report.listing is not None and report.listing.added == 3
    assert report.reads == 3 and report.read_errors == 0
    assert world.state(ACME) == ("armed", 0)
    scheduled = world.store.scheduled_reads()
    # No burn seen yet: read as the fixed schedule would until it is; alerts off: hourly.
    assert scheduled[ACME].due_at == clock.now + timedelta(seconds=300)
    assert scheduled[ACME].reason == (
        "new: read every 5 min until its burn is known (0 of 3 reads apart)"
    )
    assert scheduled[GLOBEX].due_at == clock.now + timedelta(hours=1)
    assert scheduled[GLOBEX].reason.startswith("alerts off")
    assert not step(worker).did_work  # nothing due, the listing not either


def test_a_breach_is_alerted_once_and_the_org_is_then_read_every_interval(
    world, worker_for, clock, smtp_server
):
    worker = worker_for()
    step(worker)
    world.set_balance(ACME, "999.99")
    clock.advance(3600)
    report = step(worker)
    assert report.breaches == 1
    [email] = smtp_server.received
    assert sorted(email.rcpt_tos) == sorted(ACME_ADMINS)
    assert world.state(ACME) == ("alerted", 1)
    assert reasons(world)[ACME] == "alerted: read every 5 min to see a top-up"
    clock.advance(300)
    assert step(worker).breaches == 0
    assert len(smtp_server.received) == 1


def test_a_falling_balance_is_read_sooner_as_it_nears_its_threshold(world, worker_for, clock):
    worker = worker_for()
    step(worker)
    balance = Decimal(5000)
    due_in = []
    for _ in range(5):  # half a credit a second, read when due
        wait = (world.store.scheduled_reads()[ACME].due_at - clock.now).total_seconds()
        clock.advance(wait)
        balance -= (Decimal(wait) / 2).quantize(Decimal("0.01"))
        world.set_balance(ACME, str(balance))
        step(worker)
        due_in.append((world.store.scheduled_reads()[ACME].due_at - clock.now).total_seconds())
    # Every 5 minutes until three intervals have shown the burn; then each next read fits a
    # third of the headroom left at that burn, so they come closer (4,550 - 1,000 left at
    # the third: 3,550 / 1.5 s).
    assert due_in[:2] == [300, 300]
    assert due_in[2:] == sorted(due_in[2:], reverse=True)
    assert due_in[2] == pytest.approx(3550 / 1.5, abs=1)
    assert world.state(ACME) == ("armed", 0)
    assert "at peak burn 1,800/h ×3" in reasons(world)[ACME]


def test_a_settings_change_in_the_listing_makes_the_org_due_at_once(world, worker_for, clock):
    worker = worker_for()
    step(worker)
    world.api.update_org(GLOBEX, notify_low_credits=True)
    clock.advance(60)
    # The listing made due now (as if its interval had passed), the other reads not yet.
    assert world.store.claim_job("listing", "test", clock.now + timedelta(days=1), worker.lease)
    world.store.finish_job("listing", "test", clock.now)
    report = step(worker)
    assert report.listing is not None and report.listing.changed == 1
    assert report.reads == 1
    assert not reasons(world)[GLOBEX].startswith("alerts off")


def test_a_failed_read_costs_that_org_only_and_is_retried_soon(world, worker_for, clock):
    worker = worker_for()
    world.api.add_fault(Fault("status", org_id=INITECH, endpoint="billing", status=500))
    report = step(worker)
    assert report.reads == 3 and report.read_errors == 1
    assert reasons(world)[INITECH] == "the last read failed: retry"
    assert world.store.scheduled_reads()[INITECH].due_at == clock.now + timedelta(seconds=30)
    assert world.state(ACME) == ("armed", 0)


def test_workers_share_the_due_reads_and_take_over_a_dead_ones_claims(world, worker_for, clock):
    a, b = worker_for("worker-a"), worker_for("worker-b")
    step(a)
    clock.advance(3600)
    # worker-a claims every due read and dies before reading them.
    claimed = world.store.claim_due_reads("worker-a", clock.now, 10, a.lease)
    assert len(claimed) == 3
    assert step(b).reads == 0  # live claims are nobody else's
    clock.advance(61)  # the lease has run out
    assert step(b).reads == 3
    # worker-a's late reschedule is refused: the rows are worker-b's now.
    assert world.store.reschedule("worker-a", []) == 0


def test_poller_once_and_status_on_the_adaptive_schedule(world, smtp_server):
    env = {**world.env, **ADAPTIVE}
    first = run_poller(env, "once")
    assert first.returncode == 0, first.stderr
    world.set_balance(ACME, "10.00")
    # A second run right away: Acme is not due yet (5 minutes), so no email.
    assert run_poller(env, "once").returncode == 0
    assert smtp_server.received == []
    status = run_poller(env, "status")
    assert status.returncode == 0, status.stderr
    assert "NEXT READ" in status.stdout and "until its burn is known" in status.stdout
    health = run_poller(env, "health")
    assert health.returncode == 0 and "reads on time" in health.stdout


def test_a_shard_is_refused_on_the_adaptive_schedule_and_deprecated_on_the_fixed(world):
    adaptive = run_poller({**world.env, **ADAPTIVE}, "once", "--shard", "1/2")
    assert adaptive.returncode == 2
    assert "does not apply to schedule = adaptive" in adaptive.stderr
    fixed = run_poller(world.env, "once", "--shard", "1/1")
    assert fixed.returncode == 0, fixed.stderr
    assert "deprecated" in fixed.stderr


def test_reads_broken_off_by_a_stop_are_due_again_at_once(world, worker_for, clock):
    worker = worker_for()
    step(worker)
    clock.advance(3600)
    stop = threading.Event()
    read_balances = worker.client.read_balances

    def stopped_while_reading(organizations, *, cancel=None):
        stop.set()  # SIGTERM arrives as the batch's reads start
        return read_balances(organizations, cancel=cancel)

    worker.client.read_balances = stopped_while_reading
    report = worker.step(stop)
    assert report.reads == 3 and report.breaches == 0
    scheduled = world.store.scheduled_reads()
    assert {read.due_at for read in scheduled.values()} == {clock.now}
    assert {read.reason for read in scheduled.values()} == {
        "stopped before it was read: due at once"
    }
    assert {read.claimed_by for read in scheduled.values()} == {None}

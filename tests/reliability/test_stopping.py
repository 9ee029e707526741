"""SIGTERM stops the real `poller run` (and `poller once`) within seconds from the fetch phase,
whatever it is waiting for (a slow answer, a long Retry-After, a backoff), and from delivery
however long the SMTP server stalls, with exit 0 for the daemon, no traceback, and a database
where nothing is half-written."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import pytest

from poller.devtools.simulator import Fault
from tests.fixtures.smtp import SmtpTestServer
from tests.reliability.world import ProcessWorld, add_orgs

# Far below systemd's TimeoutStopSec=90 and the minutes the old code took; generous for a
# loaded machine (the process's own start-up is not counted).
STOP_WITHIN = 10.0


def wait_for_requests(world: ProcessWorld, endpoint: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while world.api.request_counts().get(endpoint, 0) == 0:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "poller never reached the fetch phase"
        time.sleep(0.05)
    time.sleep(0.5)  # into the wait itself


def stop(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> tuple[float, str]:
    sent = time.monotonic()
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"poller did not stop within 60 s of {signal.Signals(signum).name}")
    return time.monotonic() - sent, stderr


FETCH_FAULTS = {
    "slow_billing_answers": Fault("latency", endpoint="billing", seconds=120),
    "slow_listing_answer": Fault("latency", endpoint="list_v2", seconds=120),
    "long_retry_after": Fault("rate_limit", endpoint="billing", retry_after=120),
    "503_backoff": Fault("status", endpoint="billing", status=503),
}


@pytest.mark.parametrize("fault", FETCH_FAULTS.values(), ids=FETCH_FAULTS.keys())
def test_sigterm_during_the_fetch_stops_the_daemon_within_seconds(
    world: ProcessWorld, fault: Fault
) -> None:
    add_orgs(world.api, range(1, 6))
    world.api.add_fault(fault)
    endpoint = fault.endpoint or "billing"
    process = world.start(
        "run",
        POLLER_API_RETRIES="8",
        POLLER_API_READ_TIMEOUT="300",
        POLLER_API_REQUEST_TIMEOUT="300",
    )
    wait_for_requests(world, endpoint, process)

    seconds, stderr = stop(process)

    assert seconds < STOP_WITHIN, stderr
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    events = [line for line in stderr.splitlines() if line.startswith("{")]
    after_stop = events[next(i for i, e in enumerate(events) if "daemon.stopping" in e) :]
    assert not any('"api.retry"' in e for e in after_stop), after_stop
    assert world.states() == {}  # the cycle was abandoned before any write
    world.assert_states_and_notifications_agree()


def test_sigterm_during_due_reads_stops_the_adaptive_daemon_and_releases_its_claims(
    world: ProcessWorld,
) -> None:
    add_orgs(world.api, range(1, 6))
    world.api.add_fault(Fault("latency", endpoint="billing", seconds=120))
    process = world.start(
        "run",
        POLLER_SCHEDULE="adaptive",
        POLLER_API_READ_TIMEOUT="300",
        POLLER_API_REQUEST_TIMEOUT="300",
    )
    wait_for_requests(world, "billing", process)

    seconds, stderr = stop(process)

    assert seconds < STOP_WITHIN, stderr
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert '"daemon.stopped"' in stderr
    scheduled = world.store.scheduled_reads()
    assert set(scheduled) == set(range(1, 6))
    # Broken off, not failed: nobody's claim, due again at once, no error recorded.
    assert {read.claimed_by for read in scheduled.values()} == {None}
    assert {read.reason for read in scheduled.values()} == {
        "stopped before it was read: due at once"
    }
    assert world.states() == {}


def test_sigterm_during_the_fetch_stops_poller_once_with_one_line(world: ProcessWorld) -> None:
    add_orgs(world.api, range(1, 6))
    world.api.add_fault(Fault("latency", endpoint="billing", seconds=120))
    process = world.start("once", POLLER_API_READ_TIMEOUT="300", POLLER_API_REQUEST_TIMEOUT="300")
    wait_for_requests(world, "billing", process)

    seconds, stderr = stop(process, signal.SIGINT)

    assert seconds < STOP_WITHIN, stderr
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("poller: error:")]
    assert "stopped by a signal before the cycle finished" in line
    assert world.states() == {}


def test_sigterm_during_a_stalled_smtp_send_stops_the_daemon_within_seconds(
    world: ProcessWorld, smtp_server: SmtpTestServer
) -> None:
    add_orgs(world.api, range(1, 4))
    assert world.poller("once").status == 0
    for org_id in range(1, 4):
        world.api.set_balance(org_id, Decimal("10"))
    smtp_server.delay_data(60)  # the default 30 s SMTP timeout would hold the stop that long
    process = world.start("run", POLLER_SMTP_TIMEOUT="30")
    deadline = time.monotonic() + 30
    while len(world.notifications()) < 3:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # into the sends

    seconds, stderr = stop(process)

    assert seconds < STOP_WITHIN, stderr
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    # Broken off, not failed: each email is pending, due again at once, no server error kept.
    rows = world.notifications()
    assert {(row.status, row.last_error) for row in rows} == {("pending", None)}, rows
    assert '"email.maybe_delivered"' in stderr  # the sends under way: the server may have them
    world.assert_states_and_notifications_agree()

    smtp_server.delay_data(0)
    assert world.poller("once").status == 0
    assert {row.status for row in world.notifications()} == {"sent"}
    ids = {email.message["Message-ID"] for email in smtp_server.received}
    assert ids == {row.message_id for row in world.notifications()}


def signal_a_thread_other_than_main(pid: int, signum: int) -> None:
    """What the kernel may do with any signal: hand it to whichever thread of the process."""
    others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    assert others, "the process has no other thread"
    assert ctypes.CDLL(None, use_errno=True).tgkill(pid, others[-1], signum) == 0


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["run", "once"])
def test_a_sigterm_the_kernel_hands_to_another_thread_still_stops_poller(
    world: ProcessWorld, command: str
) -> None:
    add_orgs(world.api, range(1, 6))
    world.api.add_fault(Fault("latency", endpoint="billing", seconds=120))
    process = world.start(command, POLLER_API_READ_TIMEOUT="300", POLLER_API_REQUEST_TIMEOUT="300")
    wait_for_requests(world, "billing", process)

    sent = time.monotonic()
    signal_a_thread_other_than_main(process.pid, signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"poller {command} did not stop within 60 s: {process.communicate()[1]}")

    assert time.monotonic() - sent < STOP_WITHIN, stderr
    assert process.returncode == (0 if command == "run" else 1), stderr
    assert "Traceback" not in stderr
    assert world.states() == {}

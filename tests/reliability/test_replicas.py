"""Issue 15's replica scenario at a small size: three adaptive `poller run` replicas share one
PostgreSQL database while the simulator's usage model burns credits; one replica is SIGKILLed
mid-run.

What must hold (docs/operations.md, "Several replicas on PostgreSQL"):

- every organization is still read at most ``max_read_interval + read_lease`` (plus a second
  of idle wait, and ``SLACK`` for the batch that takes it over, about 2 s of reads at the
  cap, on a loaded machine) after its previous read, across the kill: the dead replica's
  claims expire and the others take them. Reads are
  timed by the simulator itself (``ReadLog``), whoever made them;
- no breach missed: every crossing of an organization that alerts by email, early enough to be
  detected before the run ends, has its email (matched as the detection benchmark does);
- duplicates only within the documented window: at most the killed replica's sends in flight
  (``SMTP_CONNECTIONS``), each with a copy accepted before the kill (the harness's rule);
- the reads after the kill are spread over the two survivors (their ``reads.batch`` events).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.detection import Crossing, Run, Schedule, TimedCapture, count, emails_of
from poller.devtools.simulator import SimulatedApi, SimulatorServer
from poller.devtools.smtp_capture import SmtpCapture
from poller.store import open_database
from tests.engine_world import TOKEN, poller_env
from tests.reliability.harness import ACK_DELAY_SECONDS, SMTP_CONNECTIONS, _unattributed
from tests.reliability.world import THRESHOLD

ORGS = 60
USAGE_SEED, USAGE_SCALE = 3, 20_000  # a model day in 4.3 s: about a dozen breaches a run
MIN_READ, MAX_READ, LEASE, LISTING = 1, 8, 5, 4  # seconds
DELIVERY_LEASE = 3  # seconds: the killed replica's claimed emails go out within the run
KILL_AFTER = 5  # seconds after the usage model starts, then as soon as it holds claims
CLAIM_WAIT = 5  # seconds: the longest that wait may take
RUN_SECONDS = 28  # from the usage model's start to SIGTERM
BILLING_LATENCY = 0.1  # seconds per balance read: a batch holds its claims about 2 s
SLACK = 3  # seconds: a batch of reads (2 s at the cap, poller.engine.queue) on a loaded machine
GAP = MAX_READ + LEASE + 1 + SLACK
REPLICAS = 3


class ReadLog(SimulatedApi):
    """The simulator, noting when each organization's balance is read (time.time())."""

    def __init__(self, *, token: str) -> None:
        super().__init__(token=token)
        self.reads: list[tuple[float, int]] = []
        self._reads_lock = threading.Lock()

    def billing_body(self, org_id: int) -> bytes:
        with self._reads_lock:
            self.reads.append((time.time(), org_id))
        return super().billing_body(org_id)


class SlowAck(TimedCapture):
    """Takes a moment before answering 250, as a disk commit would: a replica killed then
    leaves a message the server has but nobody recorded as sent (the duplicate window)."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        answer = await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(ACK_DELAY_SECONDS)
        return answer


def _fleet(api: ReadLog) -> set[int]:
    """Organizations 50 to 3,000 credits above a 1,000 threshold; every tenth with alerts off.
    Returns those whose alert goes out by email."""
    rng = random.Random(USAGE_SEED)
    emailed = set()
    for org_id in range(1, ORGS + 1):
        notify = org_id % 10 != 0
        api.add_org(
            f"Org {org_id}",
            org_id=org_id,
            credits_remaining=str(1000 + rng.randint(50, 3000)),
            notify_low_credits=notify,
            low_credits_threshold=THRESHOLD,
            members=[{"name": "Admin", "email": f"admin@org{org_id}.example", "role": "admin"}],
        )
        if notify:
            emailed.add(org_id)
    return emailed


def _wait_until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _sleep_until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))


def _worker(log: Path) -> str:
    """The worker name a replica claims under, from its ``daemon.started`` event."""
    for event in _events(log):
        if event.get("event") == "daemon.started":
            return str(event["worker"])
    raise AssertionError(f"no daemon.started in {log.name}")


def _wait_for_claims(url: str, worker: str, seconds: float) -> int:
    """Wait until ``worker`` holds a claim on some reads; how many (0: it held none in time)."""
    store = open_database(url)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            held = sum(1 for read in store.scheduled_reads().values() if read.claimed_by == worker)
            if held:
                return held
            time.sleep(0.02)
        return 0
    finally:
        store.close()


def _events(log: Path) -> list[dict]:
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


@pytest.mark.postgres
def test_three_replicas_share_the_reads_and_one_killed_loses_nothing(
    postgres_url: str, tmp_path: Path
) -> None:
    api = ReadLog(token=TOKEN)
    emailed = _fleet(api)
    handler = SlowAck()
    schedule = Schedule.adaptive(MIN_READ, MAX_READ, 3, LISTING, LEASE)
    processes: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"replica-{index}.log" for index in range(REPLICAS)]
    with SimulatorServer(api) as sim, SmtpCapture(handler) as smtp:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
        env = {
            **clean,
            **poller_env(sim.url, postgres_url, smtp.port),
            **schedule.settings,
            # Batches of 20 (2 s of reads at the cap): the survivors both find work, each
            # able to read 10 organizations a second where the fleet needs about 13 in all.
            "POLLER_CONCURRENCY": "2",
            "POLLER_MAX_REQUESTS_PER_SECOND": "10",
            "POLLER_DELIVERY_LEASE": str(DELIVERY_LEASE),
            "POLLER_SMTP_CONNECTIONS": str(SMTP_CONNECTIONS),
        }
        try:
            # The schema once, before three processes start on the empty database together.
            subprocess.run(  # noqa: S603 - our own command
                [sys.executable, "-m", "poller", "db", "upgrade"], env=env, check=True, timeout=60
            )
            for log in logs:
                with open(log, "w") as output:
                    processes.append(
                        subprocess.Popen(  # noqa: S603 - our own command
                            [sys.executable, "-m", "poller", "-v", "run"],
                            env=env,
                            stdout=output,
                            stderr=subprocess.STDOUT,
                        )
                    )
            requests.post(
                sim.url + "/_sim/faults",
                json={"kind": "latency", "endpoint": "billing", "seconds": BILLING_LATENCY},
                timeout=5,
            ).raise_for_status()
            # Burn only once every organization has been read: no crossing before first sight.
            _wait_until(lambda: len({org for _at, org in list(api.reads)}) == ORGS, 20)
            requests.post(
                sim.url + "/_sim/usage", json={"seed": USAGE_SEED, "scale": USAGE_SCALE}, timeout=5
            ).raise_for_status()
            started = datetime.now(UTC)
            time.sleep(KILL_AFTER)
            # Killed while it holds claims, so that others must take them over.
            held = _wait_for_claims(postgres_url, _worker(logs[0]), CLAIM_WAIT)
            processes[0].kill()
            killed = datetime.now(UTC)
            _sleep_until(started + timedelta(seconds=RUN_SECONDS))
            ended = datetime.now(UTC)
            for process in processes[1:]:
                process.send_signal(signal.SIGTERM)
            statuses = [process.wait(timeout=30) for process in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        crossings = api.crossings()
        reads = list(api.reads)

    outputs = [log.read_text(errors="replace") for log in logs]
    assert held > 0, "the killed replica held no claim: nothing was taken over"
    assert statuses[1:] == [0, 0], outputs[1][-2000:] + outputs[2][-2000:]
    assert not any("Traceback" in output for output in outputs)

    # Every organization read again within the bound, across the kill, to the end.
    by_org: dict[int, list[float]] = {}
    for at, org_id in sorted(reads):
        by_org.setdefault(org_id, []).append(at)
    late, gaps = [], []
    for org_id, times in by_org.items():
        before = [t for t in times if t <= killed.timestamp()]
        points = [before[-1], *[t for t in times if t > killed.timestamp()], ended.timestamp()]
        worst = max(b - a for a, b in zip(points, points[1:], strict=False))
        gaps.append(worst)
        if worst > GAP:
            late.append((org_id, round(worst, 1)))
    assert sorted(by_org) == list(range(1, ORGS + 1))
    assert late == [], f"read more than {GAP} s apart after the kill: {late}"

    # No breach missed: each crossing early enough to be detected has its org's email.
    run = Run(
        schedule=schedule,
        started=started,
        ended=ended,
        requests={},
        crossings=[Crossing(c.org_id, c.at, bool(c.notify_low_credits)) for c in crossings],
        drops=[],
        emails=emails_of(handler),
        emailed_orgs=emailed,
        poller_cpu_seconds=0.0,
        stopped_cleanly=True,
        tracebacks=0,
        load_average=os.getloadavg(),
    )
    figures = count(run, (0, RUN_SECONDS - GAP))
    assert figures.breaches.count >= 3, "the usage model made too few breaches to judge"
    assert figures.breaches.missed == []
    assert figures.unexplained == 0

    # Duplicates: only the killed replica's sends in flight, each with a copy before the kill.
    arrivals = [
        (captured, accepted.timestamp())
        for captured, accepted in zip(handler.received, handler.accepted, strict=True)
    ]
    lost_leases = sum(output.count('"email.lease_lost"') for output in outputs)
    unknown = sum(output.count('"email.maybe_delivered"') for output in outputs)
    assert figures.duplicates <= SMTP_CONNECTIONS + lost_leases + unknown
    assert _unattributed(arrivals, [killed.timestamp()]) <= lost_leases + unknown

    # The reads after the kill went to both survivors.
    after = []
    for log in logs[1:]:
        after.append(
            sum(
                int(event.get("reads", 0))
                for event in _events(log)
                if event.get("event") == "reads.batch"
                and datetime.fromisoformat(event["timestamp"]) > killed
            )
        )
    print(
        f"replicas: killed holding {held} claims; "
        f"longest gap after the kill {max(gaps):.1f} s (bound {GAP} s); "
        f"breaches {figures.breaches.count}, delays up to {max(figures.breaches.detected):.1f} s; "
        f"duplicates {figures.duplicates}; reads after the kill by survivor {after}"
    )
    assert min(after) >= 0.2 * sum(after) > 0, f"reads after the kill by survivor: {after}"
    # The killed one had its share before it died.
    assert any(event.get("event") == "reads.batch" for event in _events(logs[0]))

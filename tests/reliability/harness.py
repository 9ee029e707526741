"""Crash/concurrency harness: several real `poller` processes at once over one database while
balances move at random and processes are SIGKILLed at random moments; then the invariants,
checked against the simulator's balance history, the database and the SMTP server's inbox.

    python -m tests.reliability.harness --processes 4 --cycles 20 --orgs 60 --kill-rate 0.3

``--processes K``: K-1 cron-style loops of `poller once` (each runs C cycles, one after the
other) and one daemon (`poller run`, 1 s interval) alive for the whole run. ``--kill-rate R``:
each `poller once` process is SIGKILLed with probability R at a moment drawn uniformly from
its first 2 seconds (import, fetch, write or delivery); each second the daemon is SIGKILLed
with probability R/3 (and restarted). The SMTP server waits 200 ms between storing a message
and answering 250, the way a real server commits to disk before answering: a kill inside
that window leaves a message the server has but the poller never recorded as sent. That is
the one duplicate window, open on each of a poller's SMTP connections at once, so one kill
can leave up to ``SMTP_CONNECTIONS`` duplicates; the harness gives each duplicate a kill that
happened between its two copies (at most that many per kill) and shows they carry the same
Message-ID.

What "should have alerted" means: polling sees balances only at poll times, so a dip shorter
than the gap between two reads can pass unseen. The harness therefore counts the breaches that
*happened* (downward crossings of the threshold in the simulator's history) and checks the
breaches *recorded* against them (never more, each at a balance the org really had below its
threshold); the guarantee it checks is about recorded breaches: each one is delivered, exactly
once or as a counted duplicate with the same Message-ID, and none is lost. A last cycle after
the balances stop moving proves that no breach still standing was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TextIO

from aiosmtpd.smtp import SMTP, Envelope, Session

from poller.devtools.simulator import SimulatedApi, SimulatorServer
from poller.devtools.smtp_capture import CapturedMessage, CaptureHandler, SmtpCapture
from poller.store import NotificationRecord, open_database
from tests.engine_world import TOKEN, poller_env
from tests.fixtures.database import fresh_postgres_database

THRESHOLD = Decimal("1000.00")
LEASE_SECONDS = 2
ACK_DELAY_SECONDS = 0.2
_MESSAGE_ID = re.compile(r"<low-credits\.(\d+)\.(\d+)\.")


# Each poller delivers over this many SMTP connections at once (the default).
SMTP_CONNECTIONS = 2


class SlowAckHandler(CaptureHandler):
    """Stores the message, then takes a moment before saying 250 (as a disk commit would)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[float] = []  # time.monotonic() of each message in ``received``

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.capture(envelope)
        self.arrived.append(time.monotonic())
        await asyncio.sleep(ACK_DELAY_SECONDS)
        return "250 2.0.0 OK: queued"


@dataclass
class Figures:
    processes: int
    cycles: int
    orgs: int
    kill_rate: float
    database: str
    balance_changes: int = 0
    breaches_happened: int = 0
    breaches_recorded: int = 0
    emails_delivered: int = 0
    distinct_message_ids: int = 0
    duplicates: int = 0
    duplicates_sharing_message_id: int = 0
    rows_claimed_more_than_once: int = 0
    lost: int = 0
    kills_once: int = 0
    kills_daemon: int = 0
    once_exits: Counter[int] = field(default_factory=Counter)
    tracebacks: int = 0
    leases_lost: int = 0
    # Sends whose connection failed before the server answered the message (email.maybe_delivered):
    # the server may have it, so its retry may be a duplicate with no kill behind it.
    maybe_delivered: int = 0
    # Duplicates no kill between the two copies accounts for (each kill accounts for at most
    # SMTP_CONNECTIONS); only a send that outlasted its lease may explain those.
    unattributed_duplicates: int = 0
    kill_times: list[float] = field(default_factory=list)
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)

    def report(self) -> str:
        exits = ", ".join(f"exit {k}: {v}" for k, v in sorted(self.once_exits.items()))
        lines = [
            f"poller crash/concurrency harness: {self.processes} processes "
            f"({max(0, self.processes - 1)} cron loops x {self.cycles} `poller once` "
            f"+ 1 daemon), {self.orgs} orgs, kill rate {self.kill_rate}, {self.database}, "
            f"{self.seconds:.0f} s",
            f"  balance changes                 {self.balance_changes}",
            f"  breaches that happened          {self.breaches_happened}"
            "  (downward crossings of the threshold in the simulator's history)",
            f"  breaches recorded               {self.breaches_recorded}"
            f"  (not seen: {self.breaches_happened - self.breaches_recorded},"
            " dips shorter than the gap between two polls)",
            f"  emails delivered                {self.emails_delivered}"
            f"  ({self.distinct_message_ids} distinct Message-IDs)",
            f"  duplicates                      {self.duplicates}"
            f"  (sharing the original's Message-ID: {self.duplicates_sharing_message_id};"
            f" rows claimed again after a lease expired: {self.rows_claimed_more_than_once};"
            f" each after a kill, at most {SMTP_CONNECTIONS} per kill:"
            f" {self.duplicates - self.unattributed_duplicates})",
            f"  leases lost during a send       {self.leases_lost}",
            f"  sends with an unknown outcome   {self.maybe_delivered}"
            "  (connection lost before the server answered the message)",
            f"  lost alerts                     {self.lost}",
            f"  processes SIGKILLed             {self.kills_once + self.kills_daemon}"
            f"  (once: {self.kills_once}, daemon: {self.kills_daemon})",
            f"  `poller once` runs              {sum(self.once_exits.values())}  ({exits};"
            " -9 = killed)",
            f"  tracebacks in any output        {self.tracebacks}",
            "  invariants                      "
            + ("all hold" if not self.violations else "VIOLATED"),
        ]
        lines += [f"    - {violation}" for violation in self.violations]
        return "\n".join(lines)


class _Chaos:
    """The moving parts: poller processes, the balance mover and the killer."""

    def __init__(
        self,
        env: dict[str, str],
        logs: Path,
        rng: random.Random,
        kill_rate: float,
        api: SimulatedApi,
        figures: Figures,
    ) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
        self.env = {**clean, **env}
        self.logs = logs
        self.rng = rng
        self.kill_rate = kill_rate
        self.api = api
        self.figures = figures
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self._log_files: list[TextIO] = []
        self._processes: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        with self.lock:
            log = (self.logs / f"{len(self._log_files):04d}.log").open("w")
            self._log_files.append(log)
        process = subprocess.Popen(  # noqa: S603 - our own command, no shell
            [sys.executable, "-m", "poller", "-q", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        with self.lock:
            self._processes.append(process)
        return process

    def cron_loop(self, cycles: int) -> None:
        for _ in range(cycles):
            process = self.start("once")
            if self.rng.random() < self.kill_rate:
                timer = threading.Timer(self.rng.uniform(0, 2.0), self._kill, (process, "once"))
                timer.start()
            status = process.wait()
            with self.lock:
                self.figures.once_exits[status] += 1

    def daemon_loop(self) -> None:
        process = self.start("run")
        while not self.stop.wait(1.0):
            if process.poll() is not None or self.rng.random() < self.kill_rate / 3:
                self._kill(process, "daemon")
                process.wait()
                process = self.start("run")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)

    def move_balances(self) -> None:
        ids = self.api.org_ids()
        while not self.stop.wait(self.rng.uniform(0.02, 0.1)):
            low = self.rng.random() < 0.5
            amount = self.rng.randint(0, 999) if low else self.rng.randint(1001, 3000)
            self.api.set_balance(self.rng.choice(ids), Decimal(amount))

    def _kill(self, process: subprocess.Popen[str], kind: str) -> None:
        if process.poll() is not None:
            return
        process.kill()
        with self.lock:
            self.figures.kill_times.append(time.monotonic())
            if kind == "once":
                self.figures.kills_once += 1
            else:
                self.figures.kills_daemon += 1

    def close(self) -> None:
        """Leave nothing behind, even when the harness itself is interrupted."""
        self.stop.set()
        for process in self._processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in self._log_files:
            log.close()


def run_harness(
    *,
    processes: int,
    cycles: int,
    orgs: int,
    kill_rate: float,
    database_url: str | None = None,
    seed: int = 0,
) -> Figures:
    started = time.monotonic()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="poller-harness-") as workdir:
        url = database_url or f"sqlite:///{Path(workdir) / 'poller.db'}"
        figures = Figures(processes, cycles, orgs, kill_rate, url.split(":", 1)[0])
        api = SimulatedApi(token=TOKEN)
        admins = _add_orgs(api, orgs, rng)
        logs = Path(workdir) / "logs"
        logs.mkdir()
        handler = SlowAckHandler()
        with SimulatorServer(api) as sim, SmtpCapture(handler) as smtp:
            env = poller_env(
                sim.url,
                url,
                smtp.port,
                POLLER_DELIVERY_LEASE=str(LEASE_SECONDS),
                POLLER_INTERVAL="1",
                POLLER_JITTER="0",
                POLLER_API_RETRIES="1",
                POLLER_SMTP_CONNECTIONS=str(SMTP_CONNECTIONS),
            )
            chaos = _Chaos(env, logs, rng, kill_rate, api, figures)
            try:
                _run_phases(chaos, processes, cycles)
            finally:
                chaos.close()
            received = list(zip(handler.received, handler.arrived, strict=True))
        outputs = [log.read_text() for log in logs.iterdir()]
        figures.tracebacks = sum(output.count("Traceback") for output in outputs)
        figures.leases_lost = sum(output.count('"email.lease_lost"') for output in outputs)
        figures.maybe_delivered = sum(output.count('"email.maybe_delivered"') for output in outputs)
        _check(figures, api, admins, url, received)
    figures.seconds = time.monotonic() - started
    return figures


def _add_orgs(api: SimulatedApi, count: int, rng: random.Random) -> dict[int, set[str]]:
    admins: dict[int, set[str]] = {}
    for org_id in range(1, count + 1):
        emails = [f"admin{n}@org{org_id}.example" for n in range(rng.randint(1, 2))]
        members = [{"name": "Admin", "email": email, "role": "admin"} for email in emails]
        # Members from other domains and roles must never receive this org's alert.
        members.append(
            {"name": "Viewer", "email": f"viewer@other{org_id}.example", "role": "member"}
        )
        api.add_org(
            f"Org {org_id}",
            org_id=org_id,
            credits_remaining="5000.00",
            notify_low_credits=True,
            low_credits_threshold=str(THRESHOLD),
            members=members,
        )
        admins[org_id] = set(emails)
    return admins


def _run_phases(chaos: _Chaos, processes: int, cycles: int) -> None:
    # The first cycle alone: every org is recorded armed before the chaos starts.
    chaos.start("once").wait()
    workers = [
        threading.Thread(target=chaos.cron_loop, args=(cycles,))
        for _ in range(max(1, processes - 1))
    ]
    background = [threading.Thread(target=chaos.move_balances)]
    if processes > 1:
        background.append(threading.Thread(target=chaos.daemon_loop))
    for thread in workers + background:
        thread.start()
    for thread in workers:
        thread.join()
    chaos.stop.set()
    for thread in background:
        thread.join()
    # Settle: claims of killed processes expire, then clean cycles deliver what is left and
    # see the final balances (exit 0: everything read and delivered).
    time.sleep(LEASE_SECONDS + 0.5)
    for _ in range(3):
        if chaos.start("once").wait() == 0:
            break


def _check(
    figures: Figures,
    api: SimulatedApi,
    admins: dict[int, set[str]],
    url: str,
    arrivals: list[tuple[CapturedMessage, float]],
) -> None:
    received = [message for message, _at in arrivals]
    violations = figures.violations
    history: dict[int, list[Decimal]] = {}
    for _at, org_id, balance in api.balance_history():
        history.setdefault(org_id, []).append(balance)
    figures.balance_changes = sum(len(values) - 1 for values in history.values())
    happened = {
        org_id: sum(
            1
            for before, after in zip(values, values[1:], strict=False)
            if before >= THRESHOLD > after
        )
        for org_id, values in history.items()
    }
    figures.breaches_happened = sum(happened.values())

    store = open_database(url)
    try:
        states = store.load_states()
        rows: list[NotificationRecord] = [
            row for org_id in states for row in store.notifications_for(org_id)
        ]
    finally:
        store.close()
    figures.breaches_recorded = len(rows)
    by_org: dict[int, list[NotificationRecord]] = {}
    for row in rows:
        by_org.setdefault(row.org_id, []).append(row)
    for org_id, stored in states.items():
        numbers = sorted(row.breach_number for row in by_org.get(org_id, []))
        if numbers != list(range(1, stored.stored.breach_count + 1)):
            violations.append(
                f"org {org_id}: breach counter {stored.stored.breach_count} "
                f"but notifications for breaches {numbers}"
            )
        if len(numbers) > happened.get(org_id, 0):
            violations.append(
                f"org {org_id}: {len(numbers)} breaches recorded, "
                f"only {happened.get(org_id, 0)} happened"
            )
        final = history[org_id][-1]
        if (final < THRESHOLD) != (stored.stored.state.value == "alerted"):
            violations.append(
                f"org {org_id}: final balance {final} but state {stored.stored.state.value}"
            )
    for row in rows:
        if not (row.balance < THRESHOLD and row.balance in history.get(row.org_id, [])):
            violations.append(
                f"org {row.org_id} breach {row.breach_number}: recorded at "
                f"{row.balance}, not a balance below the threshold it had"
            )
        if set(row.recipients) - admins[row.org_id]:
            violations.append(f"org {row.org_id}: recipients {row.recipients} are not its admins")

    copies = Counter(message.message["Message-ID"] for message in received)
    figures.emails_delivered = len(received)
    figures.distinct_message_ids = len(copies)
    sent = {row.message_id: row for row in rows if row.status == "sent"}
    unsent = [row for row in rows if row.status != "sent" or row.message_id not in copies]
    figures.lost = len(unsent)
    for row in unsent:
        violations.append(
            f"org {row.org_id} breach {row.breach_number} never delivered "
            f"({row.status}, next attempt {row.next_attempt_at:%H:%M:%S}, "
            f"last error: {row.last_error})"
        )
    phantom = set(copies) - set(sent)
    if phantom:
        violations.append(f"emails no sent notification accounts for: {sorted(phantom)}")
    figures.rows_claimed_more_than_once = sum(1 for row in rows if row.attempts > 1)
    for message_id, count in copies.items():
        if count > 1:
            figures.duplicates += count - 1
            figures.duplicates_sharing_message_id += count - 1
            row = sent.get(message_id)
            if row is None or row.attempts < 2:
                violations.append(f"{message_id} was sent {count} times without a retaken claim")
    for message in received:
        match = _MESSAGE_ID.match(message.message["Message-ID"] or "")
        if match is None or set(message.rcpt_tos) - admins.get(int(match.group(1)), set()):
            violations.append(
                f"email {message.message['Message-ID']} went to "
                f"{message.rcpt_tos}, not only to its org's admins"
            )
    # A process that dies can leave one message in the server's hands per SMTP connection it
    # was delivering over: each duplicate needs a kill between its copy and the next copy
    # (or a send that outlasted the whole lease, which logs email.lease_lost, or one whose
    # connection failed before the server answered, which logs email.maybe_delivered).
    figures.unattributed_duplicates = _unattributed(arrivals, figures.kill_times)
    if figures.unattributed_duplicates > figures.leases_lost + figures.maybe_delivered:
        violations.append(
            f"{figures.unattributed_duplicates} duplicates that no kill (at most "
            f"{SMTP_CONNECTIONS} each, {len(figures.kill_times)} kills), no "
            f"lost lease ({figures.leases_lost}) and no send of unknown outcome "
            f"({figures.maybe_delivered}) accounts for"
        )
    if figures.tracebacks:
        violations.append(f"{figures.tracebacks} tracebacks in the pollers' output")


def _unattributed(arrivals: list[tuple[CapturedMessage, float]], kills: list[float]) -> int:
    """How many duplicates cannot each be given a kill of their own, each kill taking at most
    SMTP_CONNECTIONS: a copy followed by another copy of the same message was left unrecorded
    by a process that died after the server had it and before the next copy was sent.

    Greedy by the end of each copy's window, to the earliest kill still free in it: that
    attributes as many duplicates as any assignment can.
    """
    by_id: dict[str, list[float]] = {}
    for message, at in arrivals:
        by_id.setdefault(message.message["Message-ID"], []).append(at)
    windows = sorted(
        (ends[index + 1], ends[index])
        for ends in (sorted(times) for times in by_id.values())
        for index in range(len(ends) - 1)
    )
    left = dict.fromkeys(range(len(kills)), SMTP_CONNECTIONS)
    ordered = sorted(range(len(kills)), key=lambda index: kills[index])
    unattributed = 0
    for end, start in windows:
        free = next((k for k in ordered if left[k] and start <= kills[k] <= end), None)
        if free is None:
            unattributed += 1
        else:
            left[free] -= 1
    return unattributed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--orgs", type=int, default=60)
    parser.add_argument("--kill-rate", type=float, default=0.3)
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="a fresh database on the server of POLLER_TEST_DATABASE_URL",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the poller processes started here are stopped too.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    fresh = fresh_postgres_database() if args.postgres else None
    database_url = next(fresh) if fresh is not None else args.database_url
    try:
        figures = run_harness(
            processes=args.processes,
            cycles=args.cycles,
            orgs=args.orgs,
            kill_rate=args.kill_rate,
            database_url=database_url,
            seed=args.seed,
        )
    finally:
        if fresh is not None:
            fresh.close()  # drops the database
    print(figures.report())
    return 1 if figures.violations else 0


if __name__ == "__main__":
    sys.exit(main())

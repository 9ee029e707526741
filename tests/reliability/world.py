"""The real `poller` process against a simulated Cekura API, a real SMTP server and a real
database, with the checks every fault test repeats: one clear line instead of a traceback,
and a store whose states and notifications still belong together."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update

from poller.simulator import SimulatedApi
from poller.store import NotificationRecord, notification, open_database, org_state
from tests.engine_world import run_poller

THRESHOLD = "1000.00"


def add_orgs(api: SimulatedApi, ids: range | list[int], *, balance: str = "5000.00") -> None:
    """Enabled organizations with one admin each (and a member from another domain)."""
    for org_id in ids:
        api.add_org(
            f"Org {org_id}", org_id=org_id, credits_remaining=balance,
            notify_low_credits=True, low_credits_threshold=THRESHOLD,
            members=[
                {"name": "Admin", "email": f"admin@org{org_id}.example", "role": "admin"},
                {"name": "Outsider", "email": f"viewer@elsewhere{org_id}.example",
                 "role": "member"},
            ],
        )


@dataclass
class Run:
    """A finished `poller` process: its exit status and everything it printed."""

    status: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def error_lines(self) -> list[str]:
        """The human lines (`poller: error: ...`), not the JSON log events."""
        return [line for line in self.stderr.splitlines() if line.startswith("poller: error:")]

    def events(self) -> list[str]:
        names = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                names.append(json.loads(line)["event"])
        return names


@dataclass
class ProcessWorld:
    api: SimulatedApi
    database_url: str
    env: dict[str, str]

    def poller(self, *args: str, timeout: float = 60, **extra_env: str) -> Run:
        started = datetime.now(UTC)
        done: subprocess.CompletedProcess[str] = run_poller(
            {**self.env, **extra_env}, *args, timeout=timeout
        )
        seconds = (datetime.now(UTC) - started).total_seconds()
        return Run(done.returncode, done.stdout, done.stderr, seconds)

    def states(self) -> dict[int, tuple[str, int]]:
        store = open_database(self.database_url)
        try:
            return {
                org_id: (row.stored.state.value, row.stored.breach_count)
                for org_id, row in store.load_states().items()
            }
        finally:
            store.close()

    def notifications(self) -> list[NotificationRecord]:
        store = open_database(self.database_url)
        try:
            with store.engine.connect() as connection:
                ids = connection.execute(select(org_state.c.org_id)).scalars().all()
            return [record for org_id in ids for record in store.notifications_for(org_id)]
        finally:
            store.close()

    def make_retries_due(self) -> None:
        """Fast-forward the delivery backoff instead of waiting minutes for it."""
        store = open_database(self.database_url)
        try:
            with store.engine.begin() as connection:
                connection.execute(
                    update(notification)
                    .where(notification.c.status == "pending")
                    .values(next_attempt_at=datetime.now(UTC), claim_expires_at=None)
                )
        finally:
            store.close()

    def assert_states_and_notifications_agree(self) -> None:
        """No state change without its notification row, and no row without its state change:
        an org with breach counter n has exactly the notifications for breaches 1..n."""
        states = self.states()
        recorded: dict[int, list[int]] = {}
        for row in self.notifications():
            recorded.setdefault(row.org_id, []).append(row.breach_number)
        for org_id, (_state, breaches) in states.items():
            assert sorted(recorded.get(org_id, [])) == list(range(1, breaches + 1)), org_id
        assert set(recorded) <= set(states)


def assert_one_clear_line(run: Run) -> None:
    """A failure a user must act on: one `poller: error:` line and no traceback anywhere."""
    assert "Traceback" not in run.output
    assert len(run.error_lines()) == 1, run.stderr

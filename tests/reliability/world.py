"""The real `poller` process against a simulated Cekura API, a real SMTP server and a real
database, with the checks every fault test repeats: one clear line instead of a traceback,
and a store whose states and notifications still belong together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from poller.devtools.simulator import SimulatedApi
from poller.store import NotificationRecord, Store, open_database
from poller.store.schema import notification, org_state
from tests.engine_world import run_poller

THRESHOLD = "1000.00"


def add_orgs(api: SimulatedApi, ids: range | list[int], *, balance: str = "5000.00") -> None:
    """Enabled organizations with one admin each (and a member from another domain)."""
    for org_id in ids:
        api.add_org(
            f"Org {org_id}",
            org_id=org_id,
            credits_remaining=balance,
            notify_low_credits=True,
            low_credits_threshold=THRESHOLD,
            members=[
                {"name": "Admin", "email": f"admin@org{org_id}.example", "role": "admin"},
                {
                    "name": "Outsider",
                    "email": f"viewer@elsewhere{org_id}.example",
                    "role": "member",
                },
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
        return [event["event"] for event in self.log()]

    def log(self) -> list[dict[str, Any]]:
        """The JSON log events, in order."""
        return [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]


@dataclass
class ProcessWorld:
    api: SimulatedApi
    database_url: str
    env: dict[str, str]
    _store: Store | None = field(default=None, repr=False)

    @property
    def store(self) -> Store:
        """The test's own view of the database (opened after poller created the schema)."""
        if self._store is None:
            self._store = open_database(self.database_url)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def poller(self, *args: str, timeout: float = 60, **extra_env: str) -> Run:
        started = datetime.now(UTC)
        done: subprocess.CompletedProcess[str] = run_poller(
            {**self.env, **extra_env}, *args, timeout=timeout
        )
        seconds = (datetime.now(UTC) - started).total_seconds()
        return Run(done.returncode, done.stdout, done.stderr, seconds)

    def start(self, *args: str, **extra_env: str) -> subprocess.Popen[str]:
        """The real `poller` started in the background (for faults injected while it runs)."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
        return subprocess.Popen(  # noqa: S603 - our own command, no shell
            [sys.executable, "-m", "poller", *args],
            env={**clean, **self.env, **extra_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def states(self) -> dict[int, tuple[str, int]]:
        return {
            org_id: (row.stored.state.value, row.stored.breach_count)
            for org_id, row in self.store.load_states().items()
        }

    def notifications(self) -> list[NotificationRecord]:
        with self.store.engine.connect() as connection:
            ids = connection.execute(select(org_state.c.org_id)).scalars().all()
        return [record for org_id in ids for record in self.store.notifications_for(org_id)]

    def make_retries_due(self) -> None:
        """Fast-forward the delivery backoff instead of waiting minutes for it."""
        with self.store.engine.begin() as connection:
            connection.execute(
                update(notification)
                .where(notification.c.status == "pending")
                .values(next_attempt_at=datetime.now(UTC), claim_expires_at=None)
            )

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

"""A small world for engine tests: a simulated Cekura API with known organizations, a real
SMTP server and a real database, wired into Settings the way a user would configure them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal

from poller.cekura.client import CekuraClient
from poller.config.settings import Settings, load_settings
from poller.devtools.simulator import SimulatedApi, SimulatorServer
from poller.engine.cycle import CycleReport, run_cycle
from poller.engine.delivery import Deliverer
from poller.store import Store, open_database

TOKEN = "engine-test-token-0123456789"
MAIL_FROM = "alerts@poller.example.com"

ACME, GLOBEX, INITECH = 11, 12, 13
ACME_ADMINS = ["dana@acme.example", "sam@acme.example"]


def seed_organizations(api: SimulatedApi) -> None:
    api.add_org(
        "Acme Voice",
        org_id=ACME,
        credits_remaining="5000.00",
        notify_low_credits=True,
        low_credits_threshold="1000.00",
        members=[
            {"name": "Dana", "email": ACME_ADMINS[0], "role": "admin"},
            {"name": "Sam", "email": ACME_ADMINS[1], "role": "admin"},
            {"name": "Lee", "email": "lee@acme.example", "role": "member"},
            {
                "name": "Quiet",
                "email": "quiet@acme.example",
                "role": "admin",
                "is_email_notify_enabled": False,
            },
        ],
    )
    api.add_org(
        "Globex",
        org_id=GLOBEX,
        credits_remaining="5000.00",
        notify_low_credits=False,
        low_credits_threshold="1000.00",
        members=[{"name": "Hank", "email": "hank@globex.example", "role": "admin"}],
    )
    api.add_org(
        "Initech",
        org_id=INITECH,
        credits_remaining="5000.00",
        notify_low_credits=True,
        low_credits_threshold="500.00",
        members=[{"name": "Bill", "email": "bill@initech.example", "role": "admin"}],
    )


def poller_env(api_url: str, database_url: str, smtp_port: int, **extra: str) -> dict[str, str]:
    env = {
        "POLLER_API_URL": api_url,
        "POLLER_API_TOKEN": TOKEN,
        "POLLER_DATABASE_URL": database_url,
        "POLLER_SMTP_HOST": "127.0.0.1",
        "POLLER_SMTP_PORT": str(smtp_port),
        "POLLER_SMTP_SECURITY": "none",
        "POLLER_SMTP_TIMEOUT": "5",
        "POLLER_MAIL_FROM": MAIL_FROM,
        "POLLER_API_RETRIES": "1",
        "POLLER_API_READ_TIMEOUT": "5",
        "POLLER_LOG_FORMAT": "json",
    }
    env.update(extra)
    return env


@dataclass
class World:
    sim: SimulatorServer
    store: Store
    env: dict[str, str]

    @property
    def api(self) -> SimulatedApi:
        return self.sim.api

    def settings(self, **extra: str) -> Settings:
        return load_settings(env={**self.env, **extra})

    def cycle(self, *, baseline: bool = False, deliver: bool = True, **extra: str) -> CycleReport:
        settings = self.settings(**extra)
        deliverer = Deliverer(store=self.store, settings=settings) if deliver else None
        with CekuraClient(settings, sleep=lambda _seconds: None) as client:
            return run_cycle(
                settings=settings,
                client=client,
                store=self.store,
                deliverer=deliverer,
                baseline=baseline,
            )

    def set_balance(self, org_id: int, amount: str) -> None:
        self.api.set_balance(org_id, Decimal(amount))

    def state(self, org_id: int) -> tuple[str, int]:
        row = self.store.load_states()[org_id]
        return row.stored.state.value, row.stored.breach_count


@contextmanager
def open_world(
    database_url: str, smtp_port: int, seed: Callable[[SimulatedApi], None] = seed_organizations
) -> Iterator[World]:
    """A simulator seeded by ``seed``, serving over HTTP, and an opened store, closed after."""
    api = SimulatedApi(token=TOKEN)
    seed(api)
    store = open_database(database_url)
    try:
        with SimulatorServer(api) as sim:
            yield World(sim=sim, store=store, env=poller_env(sim.url, database_url, smtp_port))
    finally:
        store.close()


def run_poller(
    env: Mapping[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The real `poller` command in a subprocess, with only the given POLLER_ settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
    return subprocess.run(
        [sys.executable, "-m", "poller", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

"""Fixtures of the fault suite: a ProcessWorld on each database, or on SQLite only where the
behaviour under test does not involve the database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from poller.devtools.simulator import SimulatedApi, SimulatorServer
from tests.engine_world import TOKEN, poller_env
from tests.fixtures.smtp import SmtpTestServer
from tests.reliability.world import ProcessWorld


def _world(database_url: str, smtp_server: SmtpTestServer) -> Iterator[ProcessWorld]:
    api = SimulatedApi(token=TOKEN)
    with SimulatorServer(api) as sim:
        world = ProcessWorld(api, database_url, poller_env(sim.url, database_url, smtp_server.port))
        yield world
        world.close()


@pytest.fixture
def world(database_url: str, smtp_server: SmtpTestServer) -> Iterator[ProcessWorld]:
    yield from _world(database_url, smtp_server)


@pytest.fixture
def sqlite_world(tmp_path: Path, smtp_server: SmtpTestServer) -> Iterator[ProcessWorld]:
    yield from _world(f"sqlite:///{tmp_path / 'poller.db'}", smtp_server)

"""Bounded parallel delivery: smtp_connections connections, each reused, each email sent once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from poller.config.settings import ConfigError, load_settings
from poller.devtools.simulator import SimulatedApi
from poller.engine.delivery import Deliverer
from tests.engine_world import World, open_world

ORGS = 6


def seed_alike_orgs(api: SimulatedApi) -> None:
    for number in range(1, ORGS + 1):
        api.add_org(
            f"Org {number}",
            org_id=number,
            credits_remaining="5000.00",
            notify_low_credits=True,
            low_credits_threshold="1000.00",
            members=[{"name": "Ops", "email": f"ops@org{number}.example"}],
        )


@pytest.fixture
def world(database_url: str, smtp_server) -> Iterator[World]:
    with open_world(database_url, smtp_server.port, seed=seed_alike_orgs) as opened:
        yield opened


def every_org_drops_below(world: World) -> None:
    world.cycle(baseline=True, deliver=False)
    for org_id in range(1, ORGS + 1):
        world.set_balance(org_id, "10.00")


def message_ids(smtp_server) -> Counter:
    return Counter(m.message["Message-ID"] for m in smtp_server.received)


@pytest.mark.parametrize("connections", [1, 3])
def test_due_emails_are_shared_out_over_smtp_connections_connections(
    world: World, smtp_server, connections: int
) -> None:
    every_org_drops_below(world)

    report = world.cycle(POLLER_SMTP_CONNECTIONS=str(connections))

    assert report.ok and report.delivery is not None and report.delivery.sent == ORGS
    assert smtp_server.connections == connections
    assert sorted(message_ids(smtp_server).values()) == [1] * ORGS


def test_two_pollers_delivering_in_parallel_still_send_each_email_once(
    world: World, smtp_server
) -> None:
    every_org_drops_below(world)
    world.cycle(deliver=False)
    settings = world.settings(POLLER_SMTP_CONNECTIONS="3")
    deliverers = [Deliverer(store=world.store, settings=settings) for _ in range(2)]

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda d: d.deliver_due(), deliverers))

    assert sum(r.sent for r in reports) == ORGS
    assert sorted(message_ids(smtp_server).values()) == [1] * ORGS


def test_smtp_connections_must_be_at_least_one() -> None:
    with pytest.raises(ConfigError, match="^POLLER_SMTP_CONNECTIONS: must be between 1 and 64"):
        load_settings(env={"POLLER_SMTP_CONNECTIONS": "0"})

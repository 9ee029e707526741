"""Two pollers racing on the same states: only the one whose write won logs and counts it.

Real cycles on SQLite and PostgreSQL, each poller with its own store (connections): poller B
loads the states, poller A runs a whole cycle (alerts, re-arms, delivers), then B writes what
it planned from the states it loaded; its guarded writes lose.
"""

from __future__ import annotations

from structlog.testing import capture_logs

from poller.cekura.client import CekuraClient
from poller.engine.cycle import CycleReport, run_cycle
from poller.engine.delivery import Deliverer
from poller.store import open_database
from tests.engine_world import ACME, INITECH, World


def cycle_losing_the_race(world: World) -> tuple[CycleReport, list[dict]]:
    """Poller B's cycle, with poller A's whole cycle run between B's load and B's write."""
    other = open_database(world.env["POLLER_DATABASE_URL"])
    load_states = other.load_states

    def load_then_let_the_other_poller_win(org_ids=None):
        loaded = load_states(org_ids)
        with capture_logs():  # poller A's own log lines are not B's
            world.cycle()
        return loaded

    other.load_states = load_then_let_the_other_poller_win
    settings = world.settings()
    try:
        with CekuraClient(settings, sleep=lambda _seconds: None) as client, capture_logs() as logs:
            report = run_cycle(
                settings=settings,
                client=client,
                store=other,
                deliverer=Deliverer(store=other, settings=settings),
            )
    finally:
        other.close()
    return report, logs


def test_the_poller_that_lost_the_race_neither_logs_nor_counts_the_change(
    world: World, smtp_server
) -> None:
    world.set_balance(INITECH, "100")  # alerted from the start, so that a top-up re-arms it
    world.cycle()
    world.set_balance(ACME, "999.99")
    world.set_balance(INITECH, "3000")

    report, logs = cycle_losing_the_race(world)

    assert report.conflicts == 2
    assert [e for e in logs if e["event"] in ("org.alerted", "org.rearmed")] == []
    [finished] = [e for e in logs if e["event"] == "cycle.finished"]
    assert (finished["breaches"], finished["rearmed"], finished["conflicts"]) == (0, 0, 2)
    assert (report.breaches, report.rearmed) == (0, 0)
    # What `poller check` prints for each: this run did nothing to them.
    assert {report.action(p) for p in report.plans if p.snapshot.id in (ACME, INITECH)} == {
        "no change (another poller recorded it first)"
    }
    # Poller A did both, once.
    assert (world.state(ACME), world.state(INITECH)) == (("alerted", 1), ("armed", 1))
    assert len([m for m in smtp_server.received if "dana@acme.example" in m.rcpt_tos]) == 1


def test_the_poller_that_won_logs_and_counts_it(world: World) -> None:
    world.set_balance(INITECH, "100")
    world.cycle()
    world.set_balance(ACME, "999.99")
    world.set_balance(INITECH, "3000")

    with capture_logs() as logs:
        report = world.cycle()

    assert sorted(e["event"] for e in logs if e["event"].startswith("org.")) == [
        "org.alerted",
        "org.rearmed",
    ]
    assert (report.breaches, report.rearmed, report.conflicts) == (1, 1, 0)
    assert {report.action(p) for p in report.plans if p.snapshot.id in (ACME, INITECH)} == {
        "alerted",
        "re-armed",
    }

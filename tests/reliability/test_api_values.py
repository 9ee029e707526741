"""Values the API serves that are well-formed JSON but outside what poller can store, compute
with or print, against the real `poller` process: ids beyond 64 bits, balances whose run-out
date lies beyond any calendar, and names full of terminal control sequences."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from poller.history import History
from tests.reliability.world import ProcessWorld, add_orgs

TOO_BIG = 2**63  # one more than PostgreSQL's bigint (and SQLite's integer) holds


def test_an_org_id_beyond_64_bits_is_that_org_s_error_and_the_others_are_alerted(
    world: ProcessWorld, smtp_server
) -> None:
    api = world.api
    add_orgs(api, range(1, 5), balance="10")
    # Two ids that SQLite would round to the same REAL, and a negative one.
    api.corrupt_organization(2, "id", TOO_BIG)
    api.corrupt_organization(3, "id", TOO_BIG + 1)
    api.corrupt_organization(4, "id", -5)
    add_orgs(api, [5], balance="10")

    run = world.poller("once")

    assert run.status == 1, run.stderr  # three orgs could not be read
    assert "Traceback" not in run.output
    assert world.states() == {1: ("alerted", 1), 5: ("alerted", 1)}
    assert sorted(m.rcpt_tos[0] for m in smtp_server.received) == [
        "admin@org1.example",
        "admin@org5.example",
    ]
    assert f"id: {TOO_BIG} is out of range" in run.stderr
    assert f"id: {TOO_BIG + 1} is out of range" in run.stderr
    assert "id: -5 is out of range" in run.stderr
    world.assert_states_and_notifications_agree()

    # The next run is no different: the bad ids never reached the database.
    run = world.poller("once")
    assert run.status == 1 and "Traceback" not in run.output
    assert len(smtp_server.received) == 2
    assert world.states() == {1: ("alerted", 1), 5: ("alerted", 1)}


def test_a_near_idle_org_with_a_large_balance_runs_out_beyond_the_horizon_without_a_crash(
    sqlite_world: ProcessWorld, smtp_server
) -> None:
    world, api = sqlite_world, sqlite_world.api
    add_orgs(api, [1, 2], balance="90000.01")
    assert world.poller("once", "--baseline").status == 0
    # 0.02 credits used in five days: a run-out date millions of years away.
    now = datetime.now(UTC)
    history = History(world.store, retention=timedelta(days=30))
    for days_ago, balance in ((5, "90000.03"), (3, "90000.02"), (1, "90000.01")):
        history.record([(2, Decimal(balance))], now - timedelta(days=days_ago))
    api.update_org(2, low_credits_threshold="100000.00")
    api.set_balance(1, Decimal("10"))

    run = world.poller("once")

    assert run.status == 0, run.stderr
    assert "Traceback" not in run.output
    by_recipient = {
        m.rcpt_tos[0]: m.message.get_body(("plain",)).get_content() for m in smtp_server.received
    }
    assert sorted(by_recipient) == ["admin@org1.example", "admin@org2.example"]
    assert "will last more than 10 years" in by_recipient["admin@org2.example"]
    for args in (
        ["status"],
        ["status", "--json"],
        ["forecast", "--org", "2"],
        ["forecast", "--org", "2", "--json"],
        ["check", "--org", "2"],
        ["check", "--org", "2", "--json"],
        ["check", "--org", "2", "--dry-run"],
    ):
        shown = world.poller(*args)
        assert shown.status == 0 and "Traceback" not in shown.output, (args, shown.output)
        assert (
            "more than 10 years" in shown.stdout or '"runway_beyond_horizon": true' in shown.stdout
        ), (args, shown.stdout)

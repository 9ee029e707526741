"""Values the API serves that are well-formed JSON but outside what poller can store, compute
with or print, against the real `poller` process: ids beyond 64 bits, balances whose run-out
date lies beyond any calendar, and names full of terminal control sequences."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from poller.store.history import History
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
    history = History(world.store)
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


EVIL_NAME = "Evil\x1b]52;c;AAAA\x07\x1b[2K\rfake row\x9b31m\u202eknil\x7f"
TERMINAL_CONTROLS = ["\x1b", "\x07", "\r", "\x9b", "\u202e", "\x7f"]


def test_text_from_the_api_reaches_the_terminal_without_control_characters(
    sqlite_world: ProcessWorld,
) -> None:
    world, api = sqlite_world, sqlite_world.api
    add_orgs(api, [1], balance="10")
    api.update_org(1, name=EVIL_NAME)
    api.corrupt_organization(
        1,
        "members",
        [
            {
                "id": 1,
                "role": "admin",
                "is_email_notify_enabled": True,
                "user": {"id": 2, "name": "Ann\x1b[2J", "email": "ann\x1b[2J@org1.example"},
            },
            {"id": 3, "role": "admin", "user": {"id": 4, "name": "Bo", "email": "bo@org1.example"}},
        ],
    )
    assert world.poller("once", "--baseline").status == 0

    for args in (
        ["check", "--org", "1", "--dry-run"],
        ["check", "--org", "1"],
        ["status"],
        ["preview", "--org", "1"],
        ["forecast", "--org", "1"],
        ["configure", "--org", "1", "--enable"],
    ):
        run = world.poller(*args)
        assert "Traceback" not in run.output, (args, run.output)
        human = run.stdout + "".join(  # the JSON log lines are escaped by json.dumps
            line for line in run.stderr.splitlines(keepends=True) if not line.startswith("{")
        )
        for control in TERMINAL_CONTROLS:
            assert control not in human, (args, control, human)
        if args[0] in ("check", "status", "configure"):  # preview: the email flattens it
            assert "Evil\\x1b]52;c;AAAA\\x07" in human, (args, human)  # shown, not obeyed

    for args in (["status", "--json"], ["check", "--org", "1", "--dry-run", "--json"]):
        run = world.poller(*args)
        for control in TERMINAL_CONTROLS:
            assert control not in run.stdout, (args, control)
        shown = json.loads(run.stdout)
        assert (shown[0] if isinstance(shown, list) else shown)["name"] == EVIL_NAME


def test_the_email_and_status_show_the_exact_amounts_the_rule_compared(
    sqlite_world: ProcessWorld, smtp_server
) -> None:
    world, api = sqlite_world, sqlite_world.api
    add_orgs(api, [1, 2], balance="5000")
    api.corrupt_organization(1, "low_credits_threshold", "999.999")
    # Served raw: the simulator keeps balances to the cent, as the API documents them.
    api.corrupt_billing(1, "credits_remaining", "999.998")
    api.corrupt_billing(2, "credits_remaining", "-0.00")
    add_orgs(api, [3], balance="5000")
    api.corrupt_billing(3, "credits_remaining", "\u0665")  # an Arabic-Indic five

    run = world.poller("once")

    assert run.status == 1, run.stderr  # org 3's balance is not a number
    # (the JSON log writes the digit as an escape)
    assert "credits_remaining: '\\u0665' is not a decimal number" in run.stderr
    messages = {m.rcpt_tos[0]: m.message for m in smtp_server.received}
    first = messages["admin@org1.example"]
    assert "999.998 credits" in first["Subject"] and "999.999 credits" in first["Subject"]
    assert "1,000.00" not in first.get_body(("plain",)).get_content()
    status = world.poller("status").stdout
    assert "999.998" in status and "999.999" in status
    assert "-0.00" not in status and " 0.00 " in status

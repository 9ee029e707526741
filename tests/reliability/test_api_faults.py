"""API faults against the real `poller once` process: every organization's failure is its own,
an organization that could not be read keeps its stored state, and when the list itself fails
nothing changes and the exit status says so."""

from __future__ import annotations

from decimal import Decimal

from poller.devtools.simulator import Fault
from tests.reliability.world import ProcessWorld, add_orgs, assert_one_clear_line

(
    HEALTHY,
    TIMEOUT,
    RESET,
    E500,
    E502,
    E503,
    THROTTLED,
    TRUNCATED,
    BAD_THRESHOLD,
    NULL_BALANCE,
    VANISHED,
) = range(1, 12)
RECOVERING = {HEALTHY, E500, E502, E503, THROTTLED}
UNREADABLE = {TIMEOUT, RESET, TRUNCATED, BAD_THRESHOLD, NULL_BALANCE}


def test_each_org_failure_is_isolated_and_an_unread_org_keeps_its_state(
    world: ProcessWorld, smtp_server
) -> None:
    api = world.api
    add_orgs(api, range(1, 12))
    assert world.poller("once").status == 0
    for org_id in api.org_ids():
        api.set_balance(org_id, Decimal("10"))
    # Transient faults hit the first attempt only: the retry reads the org.
    api.add_fault(Fault("status", status=500, org_id=E500, endpoint="billing", times=1))
    api.add_fault(Fault("status", status=502, org_id=E502, endpoint="billing", times=1))
    api.add_fault(Fault("status", status=503, org_id=E503, endpoint="billing", times=1))
    api.add_fault(Fault("rate_limit", retry_after=1, org_id=THROTTLED, endpoint="billing", times=1))
    # Lasting faults: every attempt fails, so the org is an error of its own.
    api.add_fault(Fault("latency", seconds=2.5, org_id=TIMEOUT, endpoint="billing"))
    api.add_fault(Fault("drop", org_id=RESET, endpoint="billing"))
    api.add_fault(Fault("malformed", org_id=TRUNCATED, endpoint="billing"))
    api.corrupt_organization(BAD_THRESHOLD, "low_credits_threshold", "abc")
    api.corrupt_billing(NULL_BALANCE, "credits_remaining", None)
    api.remove_org(VANISHED)

    run = world.poller("once", POLLER_API_READ_TIMEOUT="1", POLLER_API_RETRIES="1")

    assert run.status == 1, run.stderr
    assert "Traceback" not in run.output
    states = world.states()
    for org_id in RECOVERING:
        assert states[org_id] == ("alerted", 1), org_id
    for org_id in UNREADABLE | {VANISHED}:
        assert states[org_id] == ("armed", 0), org_id  # no data is not a zero balance
    alerted = sorted(m.rcpt_tos[0] for m in smtp_server.received)
    assert alerted == sorted(f"admin@org{org_id}.example" for org_id in RECOVERING)
    failed = [line for line in run.stderr.splitlines() if '"org.read_failed"' in line]
    assert {int(line.split('"org_id": ')[1].split(",")[0]) for line in failed} == UNREADABLE
    assert "low_credits_threshold: 'abc' is not a decimal number" in run.stderr
    assert "credits_remaining: null is not a decimal number" in run.stderr
    world.assert_states_and_notifications_agree()

    # Once the API behaves, the orgs that could not be read are alerted, each once.
    api.clear_faults()
    api.clear_corruption()
    assert world.poller("once").status == 0
    assert len(smtp_server.received) == len(RECOVERING | UNREADABLE)
    assert world.states()[BAD_THRESHOLD] == ("alerted", 1)


def test_a_429_storm_is_waited_out_as_retry_after_asks(
    sqlite_world: ProcessWorld, smtp_server
) -> None:
    add_orgs(sqlite_world.api, range(1, 4), balance="10")
    # Four 429s for the billing requests of two organizations read in parallel: each needs
    # two waits of Retry-After before the API lets it through.
    sqlite_world.api.add_fault(Fault("rate_limit", retry_after=1, endpoint="billing", times=4))

    run = sqlite_world.poller("once", POLLER_API_RETRIES="4", POLLER_CONCURRENCY="2")

    assert run.status == 0, run.stderr
    assert run.events().count("api.retry") == 4
    assert run.seconds >= 2  # it waited as asked instead of hammering the API
    assert len(smtp_server.received) == 3


def test_when_the_list_fails_nothing_changes_and_the_exit_status_says_so(
    sqlite_world: ProcessWorld, smtp_server
) -> None:
    world = sqlite_world
    add_orgs(world.api, range(1, 4))
    assert world.poller("once").status == 0
    for org_id in world.api.org_ids():
        world.api.set_balance(org_id, Decimal("10"))
    world.api.add_fault(Fault("status", status=503, endpoint="list_v2"))

    run = world.poller("once")

    assert run.status == 1
    assert_one_clear_line(run)
    assert "HTTP 503 (nothing was changed)" in run.error_lines()[0]
    assert world.states() == {1: ("armed", 0), 2: ("armed", 0), 3: ("armed", 0)}
    assert smtp_server.received == []


def test_a_bad_credential_is_one_clear_line_and_exit_1(sqlite_world: ProcessWorld) -> None:
    add_orgs(sqlite_world.api, range(1, 3))
    run = sqlite_world.poller("once", POLLER_API_TOKEN="not-the-token-0000")
    assert run.status == 1
    assert_one_clear_line(run)
    assert "rejected the API token (401)" in run.error_lines()[0]
    assert sqlite_world.states() == {}

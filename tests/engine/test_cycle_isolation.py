"""An exception about one organization, at any step of a cycle, fails that organization only.

Real cycles (simulator over HTTP, real SMTP, SQLite and PostgreSQL) with one step made to
raise for Initech alone, the way an unforeseen value or a bug would: Acme still gets exactly
its alert, Initech is reported as an error (``org.failed``, ``orgs_failed``) with nothing of
it written, and the next cycle reads it again and alerts it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

import poller.engine.cycle
import poller.engine.decide
import poller.engine.notices
import poller.store.states
from tests.engine_world import ACME, ACME_ADMINS, INITECH, World

INITECH_LOW = "333.00"  # below Initech's threshold of 500, and a balance no other org has


class Injected(Exception):
    """The fault a test injects."""


def failing_for_initech(original: Callable, is_initech: Callable[..., bool]) -> Callable:
    def step(*args, **kwargs):
        if is_initech(*args, **kwargs):
            raise Injected("injected for Initech")
        return original(*args, **kwargs)

    return step


# what fails -> (module, attribute, how to tell the call is about Initech, the step reported;
# the alert's subject is rendered while planning)
STEPS = {
    "decide": (
        poller.engine.cycle,
        "decide",
        lambda snapshot, *a, **k: snapshot.id == INITECH,
        "deciding",
    ),
    "render": (
        poller.engine.notices,
        "render_subject",
        lambda content: content.org_id == INITECH,
        "deciding",
    ),
    "forecast": (
        poller.engine.decide,
        "forecast",
        lambda points: str(points[-1].balance) == INITECH_LOW,
        "deciding",
    ),
    "persist": (
        poller.store.states,
        "_new_state_row",
        lambda change: change.observed.org_id == INITECH,
        "saving",
    ),
}


def emails_to(smtp_server, address: str) -> list:
    return [m for m in smtp_server.received if address in m.rcpt_tos]


@pytest.mark.parametrize("fault", STEPS)
def test_a_failure_for_one_org_at_any_step_fails_that_org_only(
    fault: str, world: World, smtp_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.cycle()
    world.set_balance(ACME, "999.99")
    world.set_balance(INITECH, INITECH_LOW)
    module, name, is_initech, step = STEPS[fault]
    monkeypatch.setattr(module, name, failing_for_initech(getattr(module, name), is_initech))

    with capture_logs() as logs:
        report = world.cycle()

    assert [(error.org_id, error.message) for error in report.errors] == [
        (INITECH, f"{step} failed: Injected: injected for Initech")
    ]
    [failed] = [event for event in logs if event["event"] == "org.failed"]
    assert (failed["org_id"], failed["step"], failed["log_level"]) == (INITECH, step, "error")
    [finished] = [event for event in logs if event["event"] == "cycle.finished"]
    assert (finished["orgs_failed"], finished["breaches"], finished["outcome"]) == (1, 1, "partial")
    assert len(emails_to(smtp_server, ACME_ADMINS[0])) == 1
    assert world.state(ACME) == ("alerted", 1)
    assert emails_to(smtp_server, "bill@initech.example") == []
    assert world.state(INITECH) == ("armed", 0)
    assert world.store.notifications_for(INITECH) == []

    monkeypatch.undo()
    report = world.cycle()

    assert report.ok and report.breaches == 1
    assert world.state(INITECH) == ("alerted", 1)
    assert len(emails_to(smtp_server, "bill@initech.example")) == 1
    assert len(emails_to(smtp_server, ACME_ADMINS[0])) == 1


def test_a_failing_recovery_notice_fails_that_org_only_and_leaves_it_alerted(
    world: World, smtp_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    recovery = {"POLLER_RECOVERY_NOTICE": "true"}
    world.cycle(**recovery)
    world.set_balance(INITECH, INITECH_LOW)
    world.cycle(**recovery)
    world.set_balance(INITECH, "5000.00")  # a top-up: Initech re-arms with a recovery notice
    world.set_balance(ACME, "999.99")
    monkeypatch.setattr(
        poller.engine.decide,
        "content_for",
        failing_for_initech(
            poller.engine.decide.content_for, lambda snapshot, **kwargs: snapshot.id == INITECH
        ),
    )

    report = world.cycle(**recovery)

    [error] = report.errors
    assert (error.org_id, error.message) == (
        INITECH,
        "deciding failed: Injected: injected for Initech",
    )
    assert world.state(INITECH) == ("alerted", 1)
    assert len(emails_to(smtp_server, ACME_ADMINS[0])) == 1

    monkeypatch.undo()
    report = world.cycle(**recovery)

    assert report.ok and report.rearmed == 1
    assert world.state(INITECH) == ("armed", 1)
    kinds = [row.kind for row in world.store.notifications_for(INITECH)]
    assert kinds == ["low_credits", "recovery"]

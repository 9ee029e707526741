"""Delivery per recipient (issue 12): one admin's address costs that admin's copy only, and
a problem that is not about the recipients never fails an email.

Simulator over HTTP, a real SMTP server (aiosmtpd), SQLite and PostgreSQL (``world``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from poller.devtools.smtp_capture import SmtpCapture
from poller.store.schema import notification
from tests.engine_world import ACME, ACME_ADMINS, INITECH, World, open_world, run_poller

DANA, SAM = ACME_ADMINS


def set_acme_admins(world: World, *emails: str) -> None:
    world.api.update_org(
        ACME,
        members=[
            {"name": f"Admin {index}", "email": email, "role": "admin"}
            for index, email in enumerate(emails)
        ],
    )


def make_retries_due(world: World) -> None:
    with world.store.engine.begin() as connection:
        connection.execute(
            notification.update()
            .where(notification.c.status == "pending")
            .values(next_attempt_at=datetime.now(UTC))
        )


def outcomes(world: World, org_id: int) -> dict[str, str]:
    [row] = world.store.notifications_for(org_id)
    return {address: entry["outcome"] for address, entry in row.deliveries.items()}


def status_json(world: World) -> dict[int, dict]:
    run = run_poller(world.env, "status", "--json")
    assert run.returncode == 0, run.stderr
    return {row["org_id"]: row for row in json.loads(run.stdout)}


# --- fault 4: an address the recipient filter took but the builder refused ---------------------


@pytest.mark.parametrize(
    "bad",
    [
        "a(b)@example.com",
        "x" * 250 + "@example.com",
        "del\x7f@example.com",
        "ctl\x01@example.com",
        "a..b@example.com",
        "bidi\u202e@example.com",
    ],
    ids=["comment", "250-char-local-part", "DEL", "control", "double-dot", "bidi-override"],
)
def test_one_admin_address_the_builder_cannot_take_costs_only_that_admin(
    world: World, smtp_server, bad: str
) -> None:
    set_acme_admins(world, DANA, bad, SAM)
    world.cycle()
    world.set_balance(ACME, "10")

    with capture_logs() as logs:
        report = world.cycle()

    assert report.ok
    [email] = smtp_server.received
    assert email.rcpt_tos == (DANA, SAM)
    [row] = world.store.notifications_for(ACME)
    assert row.status == "sent" and row.recipients == (DANA, SAM)
    [warning] = [e for e in logs if e["event"] == "recipient.invalid_address"]
    assert warning["org_id"] == ACME and warning["log_level"] == "warning"


def test_an_address_recorded_before_it_was_checked_fails_alone(world: World, smtp_server) -> None:
    # A row written by an older poller may hold an address the builder refuses.
    world.cycle()
    world.set_balance(ACME, "10")
    world.cycle(deliver=False)
    with world.store.engine.begin() as connection:
        connection.execute(notification.update().values(recipients=[DANA, "a(b)@example.com"]))

    assert world.cycle().ok

    [email] = smtp_server.received
    assert email.rcpt_tos == (DANA,)
    assert outcomes(world, ACME) == {DANA: "sent", "a(b)@example.com": "failed"}
    assert world.store.notifications_for(ACME)[0].status == "sent"


# --- fault 5: addresses that are not ASCII on a server without SMTPUTF8 -------------------------


@pytest.fixture
def ascii_only_world(database_url: str) -> Iterator[tuple[World, SmtpCapture]]:
    with SmtpCapture(enable_SMTPUTF8=False) as server:
        with open_world(database_url, server.port) as opened:
            yield opened, server


def test_without_smtputf8_an_idn_domain_is_punycode_and_a_utf8_local_part_costs_only_its_admin(
    ascii_only_world: tuple[World, SmtpCapture],
) -> None:
    world, server = ascii_only_world
    set_acme_admins(world, "admin@bücher.de", "jürgen@example.com", DANA)
    world.cycle()
    world.set_balance(ACME, "10")
    world.set_balance(INITECH, "10")

    report = world.cycle()

    assert report.ok, report.delivery
    by_org = {tuple(email.rcpt_tos): email for email in server.received}
    assert set(by_org) == {("admin@xn--bcher-kva.de", DANA), ("bill@initech.example",)}
    acme = by_org[("admin@xn--bcher-kva.de", DANA)].message
    assert str(acme["To"]) == f"admin@xn--bcher-kva.de, {DANA}"
    assert outcomes(world, ACME) == {
        "admin@bücher.de": "sent",
        "jürgen@example.com": "failed",
        DANA: "sent",
    }
    [row] = world.store.notifications_for(ACME)
    assert row.status == "sent" and "SMTPUTF8" in row.deliveries["jürgen@example.com"]["answer"]
    assert world.store.notifications_for(INITECH)[0].status == "sent"


# --- fault 6: a temporary refusal of one admin ------------------------------------------------


def test_a_temporary_refusal_of_one_admin_retries_that_admin_only(
    world: World, smtp_server
) -> None:
    world.set_balance(ACME, "10")
    smtp_server.reject_recipient(SAM, "450 4.2.1 mailbox busy")

    report = world.cycle()

    assert not report.ok and report.delivery.retried == 1
    [first] = smtp_server.received
    assert first.rcpt_tos == (DANA,)
    [row] = world.store.notifications_for(ACME)
    assert row.status == "pending" and row.last_error is None
    assert outcomes(world, ACME) == {DANA: "sent", SAM: "retrying"}
    assert status_json(world)[ACME]["delivery"] == "pending 1/2 sent, 1 retrying"

    smtp_server.accept_again()
    make_retries_due(world)
    assert world.cycle().ok

    first_copy, second = smtp_server.received
    assert second.rcpt_tos == (SAM,)  # only the admin who did not have it
    assert second.message["Message-ID"] == first_copy.message["Message-ID"]
    assert str(second.message["To"]) == f"{DANA}, {SAM}"
    assert world.store.notifications_for(ACME)[0].status == "sent"
    assert status_json(world)[ACME]["delivery"] == "sent 2/2"


def test_permanent_temporary_and_accepted_recipients_each_get_their_own_outcome(
    world: World, smtp_server
) -> None:
    gone = "gone@acme.example"
    set_acme_admins(world, DANA, gone, SAM)
    world.cycle()
    world.set_balance(ACME, "10")
    smtp_server.reject_recipient(gone, "550 5.1.1 no such user")
    smtp_server.reject_recipient(SAM, "451 4.7.1 greylisted")

    assert not world.cycle().ok
    assert outcomes(world, ACME) == {DANA: "sent", gone: "failed", SAM: "retrying"}

    smtp_server.accept_again()  # greylisting over; gone's refusal is final already
    make_retries_due(world)
    assert world.cycle().ok

    assert [email.rcpt_tos for email in smtp_server.received] == [(DANA,), (SAM,)]
    [row] = world.store.notifications_for(ACME)
    assert row.status == "sent"
    assert status_json(world)[ACME]["delivery"] == "sent 2/3, 1 failed"


def test_every_recipient_refused_for_good_fails_the_email_and_requeue_sends_it_again(
    world: World, smtp_server
) -> None:
    for address in ACME_ADMINS:
        smtp_server.reject_recipient(address, "550 5.1.1 no such user")
    world.set_balance(ACME, "10")
    assert not world.cycle().ok
    assert world.store.notifications_for(ACME)[0].status == "failed"
    smtp_server.accept_again()

    run = run_poller(world.env, "requeue", "--failed", "--org", str(ACME))

    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "requeued 1 notification (2 recipients)"
    assert world.cycle().ok
    [email] = smtp_server.received
    assert email.rcpt_tos == tuple(ACME_ADMINS)
    assert world.store.notifications_for(ACME)[0].status == "sent"


def test_requeue_sends_again_to_the_failed_recipients_of_a_sent_email_only(
    world: World, smtp_server
) -> None:
    smtp_server.reject_recipient(SAM, "550 5.1.1 no such user")
    world.set_balance(ACME, "10")
    assert world.cycle().ok
    smtp_server.accept_again()

    run = run_poller(world.env, "requeue", "--failed")
    assert run.stdout.strip() == "requeued 1 notification (1 recipient)"
    assert world.cycle().ok

    assert [email.rcpt_tos for email in smtp_server.received] == [(DANA,), (SAM,)]
    assert outcomes(world, ACME) == {DANA: "sent", SAM: "sent"}
    assert run_poller(world.env, "requeue", "--failed").stdout.strip() == (
        "requeued 0 notifications (0 recipients)"
    )


# --- fault 7: sender-level problems -----------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "reply"),
    [("mail", "554 5.7.1 sender address not verified"), ("data", "554 5.7.1 sender rejected")],
)
def test_a_refusal_that_is_not_about_the_recipients_keeps_the_email_pending_until_fixed(
    world: World, smtp_server, where: str, reply: str
) -> None:
    world.set_balance(ACME, "10")
    world.set_balance(INITECH, "10")
    (smtp_server.answer_mail if where == "mail" else smtp_server.answer_data)(reply)

    with capture_logs() as logs:
        report = world.cycle()

    assert not report.ok and report.delivery.failed == 0
    rows = world.store.notifications_for(ACME) + world.store.notifications_for(INITECH)
    assert {row.status for row in rows} == {"pending"}
    assert all(reply in row.last_error for row in rows)
    assert any(e["event"] == "email.held" and e["log_level"] == "error" for e in logs)
    health = run_poller(world.env, "health")
    assert health.returncode == 1 and "held back" in health.stderr

    smtp_server.accept_again()
    make_retries_due(world)
    assert world.cycle().ok
    assert len(smtp_server.received) == 2
    assert run_poller(world.env, "health").returncode == 0


def test_a_rejected_smtp_login_keeps_the_email_pending_and_health_unhealthy(
    world: World, smtp_server
) -> None:
    world.set_balance(ACME, "10")
    report = world.cycle(POLLER_SMTP_USERNAME="poller", POLLER_SMTP_PASSWORD="wrong")
    assert not report.ok
    [row] = world.store.notifications_for(ACME)
    assert row.status == "pending" and "535" in row.last_error
    assert run_poller(world.env, "health").returncode == 1

    make_retries_due(world)
    assert world.cycle().ok
    assert len(smtp_server.received) == 1


def test_a_sender_with_brackets_in_its_display_name_is_quoted_and_delivered(
    world: World, smtp_server
) -> None:
    world.set_balance(ACME, "10")
    assert world.cycle(POLLER_MAIL_FROM="Cekura Alerts [bot] <alerts@example.com>").ok
    [email] = smtp_server.received
    assert email.mail_from == "alerts@example.com"
    assert email.message["From"].addresses[0].display_name == "Cekura Alerts [bot]"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("POLLER_MAIL_FROM", "x\x01@y.com"),
        ("POLLER_MAIL_FROM", "Alerts\x01 <alerts@example.com>"),
        ("POLLER_BILLING_URL", "https://dashboard.cekura.ai/billing page"),
    ],
)
def test_a_setting_the_email_cannot_be_built_with_stops_the_start_with_exit_2(
    world: World, smtp_server, setting: str, value: str
) -> None:
    world.set_balance(ACME, "10")
    run = run_poller({**world.env, setting: value}, "once")
    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    assert setting in line and "Traceback" not in run.stderr
    assert world.store.notifications_for(ACME) == [] and smtp_server.received == []

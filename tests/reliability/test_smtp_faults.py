"""SMTP faults against the real `poller once` process: nothing is marked sent that the server
did not accept, every timeout is bounded, and what is pending goes out, once, when the server
is back."""

from __future__ import annotations

from decimal import Decimal

from tests.fixtures.smtp import SmtpTestServer
from tests.reliability.world import ProcessWorld, add_orgs

SMTP_TIMEOUT = 2


def test_temporary_smtp_faults_keep_each_email_pending_until_the_server_is_back(
    sqlite_world: ProcessWorld, smtp_server: SmtpTestServer, refusing_port: int
) -> None:
    world = sqlite_world
    faults = {
        "connection refused": lambda: {"POLLER_SMTP_PORT": str(refusing_port)},
        "421 to MAIL FROM": lambda: smtp_server.answer_mail("421 4.3.2 closing channel"),
        "451 to DATA": lambda: smtp_server.answer_data("451 4.7.1 greylisted"),
        "connection dropped mid-DATA": smtp_server.drop_connection_during_data,
        "server slower than the timeout": lambda: smtp_server.delay_data(SMTP_TIMEOUT + 3),
    }
    add_orgs(world.api, range(1, len(faults) + 1))
    assert world.poller("once").status == 0

    # One fault per run, each for a new breach: the earlier ones wait for their backoff.
    for org_id, (fault, inject) in enumerate(faults.items(), 1):
        world.api.set_balance(org_id, Decimal("10"))
        extra = inject() or {}
        run = world.poller("once", POLLER_SMTP_TIMEOUT=str(SMTP_TIMEOUT), **extra)
        smtp_server.accept_again()

        assert run.status == 1, fault
        assert "Traceback" not in run.output, fault
        assert run.events().count("email.retry") == 1, fault
        # A connection lost before the server answered the message: it may have it, and the
        # retry may be a duplicate, which is said (the harness counts these).
        ambiguous = fault in ("connection dropped mid-DATA", "server slower than the timeout")
        assert run.events().count("email.maybe_delivered") == ambiguous, fault
        # Bounded: one refused connection or one timed-out wait, never a hang. Measured on the
        # delivery phase itself: process start-up varies with the machine's load.
        [finished] = [event for event in run.log() if event["event"] == "cycle.finished"]
        assert finished["deliver_seconds"] < SMTP_TIMEOUT + 1.5, fault
        row = next(r for r in world.notifications() if r.org_id == org_id)
        assert row.status == "pending" and row.last_error and row.sent_at is None, fault
        assert smtp_server.received == [], fault
    world.assert_states_and_notifications_agree()

    world.make_retries_due()
    assert world.poller("once").status == 0
    assert world.poller("once").status == 0
    sent = {row.message_id: row for row in world.notifications()}
    assert all(row.status == "sent" for row in sent.values())
    ids = [email.message["Message-ID"] for email in smtp_server.received]
    assert sorted(ids) == sorted(sent)  # every one delivered, exactly once


def test_a_permanent_refusal_fails_that_email_only_and_a_partial_refusal_delivers(
    sqlite_world: ProcessWorld, smtp_server: SmtpTestServer
) -> None:
    world = sqlite_world
    all_refused, one_refused = 1, 2
    add_orgs(world.api, [all_refused, one_refused])
    world.api.update_org(
        one_refused,
        members=[
            {"name": "Gone", "email": "gone@org2.example", "role": "admin"},
            {"name": "Here", "email": "here@org2.example", "role": "admin"},
        ],
    )
    assert world.poller("once").status == 0
    smtp_server.reject_recipient("admin@org1.example", "550 5.1.1 no such user")
    smtp_server.reject_recipient("gone@org2.example", "550 5.1.1 no such user")
    world.api.set_balance(all_refused, Decimal("1"))
    world.api.set_balance(one_refused, Decimal("1"))

    run = world.poller("once")

    assert run.status == 1
    assert "email.failed" in run.events() and "email.recipient_refused" in run.events()
    [email] = smtp_server.received
    assert email.rcpt_tos == ("here@org2.example",)
    status = {row.org_id: row.status for row in world.notifications()}
    assert status == {all_refused: "failed", one_refused: "sent"}

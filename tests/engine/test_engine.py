"""The alert engine end to end: simulator over HTTP, real SMTP, SQLite and PostgreSQL."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from poller.devtools.simulator import Fault
from poller.store import DatabaseError
from poller.store.schema import notification
from tests.engine_world import (
    ACME,
    ACME_ADMINS,
    GLOBEX,
    INITECH,
    MAIL_FROM,
)


def acme_emails(smtp_server) -> list:
    return [m for m in smtp_server.received if "dana@acme.example" in m.rcpt_tos]


def test_it_emails_every_eligible_admin_once_when_the_balance_drops_below(world, smtp_server):
    world.cycle()
    assert smtp_server.received == []
    world.set_balance(ACME, "999.99")

    report = world.cycle()

    assert report.ok and report.breaches == 1
    [email] = smtp_server.received
    assert sorted(email.rcpt_tos) == sorted(ACME_ADMINS)
    assert "Acme Voice" in email.message["Subject"]
    assert email.message["From"] == MAIL_FROM
    assert world.state(ACME) == ("alerted", 1)
    [row] = world.store.notifications_for(ACME)
    assert row.status == "sent" and row.message_id == email.message["Message-ID"]


def test_it_does_not_resend_while_still_below(world, smtp_server):
    world.set_balance(ACME, "900")
    world.cycle()
    world.set_balance(ACME, "100")
    world.cycle()
    world.set_balance(ACME, "-50")
    world.cycle()
    assert len(acme_emails(smtp_server)) == 1
    assert world.state(ACME) == ("alerted", 1)


def test_balance_exactly_at_the_threshold_does_not_alert(world, smtp_server):
    world.set_balance(ACME, "1000.00")
    world.cycle()
    assert acme_emails(smtp_server) == []
    assert world.state(ACME) == ("armed", 0)


def test_a_top_up_rearms_and_the_next_drop_alerts_again(world, smtp_server):
    world.set_balance(ACME, "500")
    world.cycle()
    world.set_balance(ACME, "3000")
    report = world.cycle()
    assert report.rearmed == 1 and world.state(ACME) == ("armed", 1)
    world.set_balance(ACME, "400")
    world.cycle()
    emails = acme_emails(smtp_server)
    assert len(emails) == 2
    assert emails[0].message["Message-ID"] != emails[1].message["Message-ID"]
    assert world.state(ACME) == ("alerted", 2)


def test_rearm_margin_keeps_an_org_hovering_at_the_threshold_quiet(world, smtp_server):
    margin = {"POLLER_REARM_MARGIN": "100"}
    world.set_balance(ACME, "990")
    world.cycle(**margin)
    world.set_balance(ACME, "1050")  # above the threshold, not above threshold + margin
    world.cycle(**margin)
    world.set_balance(ACME, "980")
    world.cycle(**margin)
    assert len(acme_emails(smtp_server)) == 1
    world.set_balance(ACME, "1100.01")
    world.cycle(**margin)
    assert world.state(ACME) == ("armed", 1)


def test_raising_the_threshold_above_the_balance_alerts(world, smtp_server):
    world.cycle()
    world.api.update_org(ACME, low_credits_threshold="6000.00")
    world.cycle()
    assert len(acme_emails(smtp_server)) == 1


def test_lowering_the_threshold_below_the_balance_rearms(world):
    world.set_balance(ACME, "800")
    world.cycle()
    world.api.update_org(ACME, low_credits_threshold="500.00")
    world.cycle()
    assert world.state(ACME) == ("armed", 1)


def test_a_disabled_org_is_never_emailed_and_turning_alerts_on_while_below_alerts_once(
    world, smtp_server
):
    world.set_balance(GLOBEX, "10")
    world.cycle()
    world.cycle()
    assert world.state(GLOBEX) == ("armed", 0)
    assert not [m for m in smtp_server.received if "hank@globex.example" in m.rcpt_tos]

    world.api.update_org(GLOBEX, notify_low_credits=True)
    world.cycle()
    world.cycle()
    assert len([m for m in smtp_server.received if "hank@globex.example" in m.rcpt_tos]) == 1


def test_turning_alerts_off_while_alerted_does_not_rearm(world, smtp_server):
    world.set_balance(ACME, "10")
    world.cycle()
    world.api.update_org(ACME, notify_low_credits=False)
    world.cycle()
    world.api.update_org(ACME, notify_low_credits=True)
    world.cycle()
    assert world.state(ACME) == ("alerted", 1)
    assert len(acme_emails(smtp_server)) == 1


def test_baseline_records_orgs_already_below_without_sending(world, smtp_server):
    world.set_balance(ACME, "10")
    report = world.cycle(baseline=True, deliver=False)
    assert report.ok
    world.cycle()
    assert smtp_server.received == []
    assert world.state(ACME) == ("alerted", 1)
    [row] = world.store.notifications_for(ACME)
    assert row.status == "baseline"


def test_an_org_that_could_not_be_read_keeps_its_state(world, smtp_server):
    world.set_balance(ACME, "10")
    world.cycle()
    world.api.add_fault(Fault(kind="status", status=500, org_id=ACME, endpoint="billing"))
    world.set_balance(ACME, "5000")

    report = world.cycle()

    assert not report.ok and [e.org_id for e in report.errors] == [ACME]
    assert world.state(ACME) == ("alerted", 1)  # not re-armed by a balance it never saw
    assert {p.snapshot.id for p in report.plans} == {GLOBEX, INITECH}
    world.api.clear_faults()
    world.set_balance(ACME, "5")
    world.cycle()
    assert len(acme_emails(smtp_server)) == 1


def test_when_the_list_fails_nothing_changes_and_the_cycle_says_so(world, smtp_server):
    world.cycle()
    world.api.add_fault(Fault(kind="status", status=503, endpoint="list_v2"))
    world.set_balance(ACME, "10")

    report = world.cycle()

    assert report.fatal and not report.ok
    assert world.state(ACME) == ("armed", 0)
    assert smtp_server.received == []


def test_an_org_with_emails_switched_off_gets_its_breach_recorded_as_suppressed(world, smtp_server):
    world.api.update_org(INITECH, is_send_emails_enabled=False)
    world.set_balance(INITECH, "10")
    world.cycle()
    assert smtp_server.received == []
    [row] = world.store.notifications_for(INITECH)
    assert row.status == "suppressed" and world.state(INITECH) == ("alerted", 1)


def test_an_org_without_an_eligible_admin_is_recorded_as_such(world, smtp_server):
    world.api.update_org(
        INITECH, members=[{"name": "M", "email": "m@initech.example", "role": "member"}]
    )
    world.set_balance(INITECH, "10")
    world.cycle()
    [row] = world.store.notifications_for(INITECH)
    assert row.status == "no_recipients" and row.recipients == ()
    assert smtp_server.received == []


def test_smtp_down_leaves_the_email_pending_and_it_goes_out_when_the_server_is_back(
    world, smtp_server, refusing_port
):
    world.set_balance(ACME, "10")
    report = world.cycle(POLLER_SMTP_PORT=str(refusing_port))
    assert not report.ok and report.delivery.retried == 1
    [row] = world.store.notifications_for(ACME)
    assert row.status == "pending" and row.attempts == 1 and row.last_error
    assert row.next_attempt_at > datetime.now(UTC) + timedelta(seconds=30)

    # Not due yet: the next cycle does not hammer the server.
    world.cycle()
    assert smtp_server.received == []

    with world.store.engine.begin() as connection:  # fast-forward the backoff
        connection.execute(notification.update().values(next_attempt_at=datetime.now(UTC)))
    assert world.cycle().ok
    assert len(acme_emails(smtp_server)) == 1
    assert world.store.notifications_for(ACME)[0].status == "sent"


def test_a_temporary_smtp_answer_keeps_the_email_pending(world, smtp_server):
    smtp_server.answer_data("451 4.3.0 try again later")
    world.set_balance(ACME, "10")
    report = world.cycle()
    assert not report.ok
    assert world.store.notifications_for(ACME)[0].status == "pending"


def test_a_permanent_refusal_of_every_recipient_marks_the_email_failed(world, smtp_server):
    for address in ACME_ADMINS:
        smtp_server.reject_recipient(address, "550 5.1.1 no such user")
    world.set_balance(ACME, "10")
    report = world.cycle()
    assert not report.ok and report.delivery.failed == 1
    [row] = world.store.notifications_for(ACME)
    assert row.status == "failed" and "550" in row.last_error
    smtp_server.accept_again()
    world.cycle()
    assert smtp_server.received == []  # failed is final, not retried forever


def test_one_refused_recipient_does_not_stop_the_others(world, smtp_server):
    smtp_server.reject_recipient(ACME_ADMINS[0], "550 5.1.1 no such user")
    world.set_balance(ACME, "10")
    assert world.cycle().ok
    [email] = smtp_server.received
    assert email.rcpt_tos == (ACME_ADMINS[1],)


def test_the_garbage_collector_runs_again_after_a_cycle_the_database_failed(world):
    # Diff and persist pause the collector; a failure must not leave it off for good.
    world.cycle()
    with world.store.engine.begin() as connection:
        connection.execute(text("DROP TABLE balance_history"))
    world.set_balance(ACME, "10")

    with pytest.raises(DatabaseError, match="no such table|does not exist"):
        world.cycle()

    assert gc.isenabled()


def test_a_cycle_leaves_a_collector_its_caller_turned_off_turned_off(world):
    gc.disable()
    try:
        world.cycle()
        assert not gc.isenabled()
    finally:
        gc.enable()

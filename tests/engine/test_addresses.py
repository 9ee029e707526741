"""The one address check (poller.engine.addresses) and the row status per-recipient outcomes make:
tables, and properties against a real SMTP server (aiosmtpd)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from poller.devtools.smtp_capture import SmtpCapture
from poller.engine.addresses import InvalidAddress, checked_address, checked_sender, smtp_address
from poller.engine.model import Member, Organization
from poller.engine.outcomes import delivery_summary, row_status
from poller.mail import RenderedEmail, SmtpTransport, build_message
from poller.store import MIGRATIONS_LOCATION, create_configured_engine, open_database
from poller.store import upgrade_database as upgrade
from poller.store.schema import org_state

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("address", "wire"),
    [
        ("ops@acme.example", "ops@acme.example"),
        ("o'brien+alerts@acme.example", "o'brien+alerts@acme.example"),
        ("first.last@sub.acme.example", "first.last@sub.acme.example"),
        ("admin@bücher.de", "admin@xn--bcher-kva.de"),
        ("jürgen@example.com", "jürgen@example.com"),
        ("x" * 64 + "@example.com", "x" * 64 + "@example.com"),
    ],
)
def test_deliverable_addresses_and_how_they_go_on_the_wire(address: str, wire: str) -> None:
    assert checked_address(address) == address
    assert smtp_address(address) == wire


@pytest.mark.parametrize(
    "address",
    [
        "a(b)@example.com", "x" * 65 + "@example.com", "del\x7f@example.com",
        "ctl\x01@example.com", "a b@example.com", "a..b@example.com", ".a@example.com",
        "a.@example.com", '"q"@example.com', "a@b@c.example", "@example.com", "a@",
        "a@-x.example", "a@x_y.example", "a@[127.0.0.1]", "bidi\u202e@example.com",
        "Evil <ops@acme.example>", "ops@acme.example\r\nBcc: x@y",
        "a@" + ".".join(["x" * 63] * 4),
    ],
)  # fmt: skip
def test_undeliverable_addresses_are_refused_with_the_reason(address: str) -> None:
    with pytest.raises(InvalidAddress, match="is not a deliverable email address"):
        checked_address(address)


def test_the_recipient_filter_uses_the_same_check() -> None:
    good, bad = "ops@acme.example", "a(b)@example.com"
    members = tuple(
        Member(index, index, "n", email, "admin", None) for index, email in enumerate([bad, good])
    )
    org = Organization(1, "Org", True, Decimal(1), True, False, members)
    assert [r.email for r in org.alert_recipients()] == [good]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alerts@example.com", ("", "alerts@example.com")),
        ("Cekura Alerts [bot] <alerts@example.com>", ("Cekura Alerts [bot]", "alerts@example.com")),
        ('"Q \\"uote\\"" <alerts@example.com>', ('Q "uote"', "alerts@example.com")),
    ],
)
def test_senders_the_builder_takes(value: str, expected: tuple[str, str]) -> None:
    assert checked_sender(value) == expected


@pytest.mark.parametrize("value", ["x\x01@y.com", "A\x01 <a@example.com>", "a(b)@example.com"])
def test_senders_the_builder_refuses(value: str) -> None:
    with pytest.raises(InvalidAddress):
        checked_sender(value)


# Characters that make addresses interesting: every atext symbol, dots, non-ASCII letters,
# and what must be refused (controls, specials, spaces, a second @).
_LOCAL_ATEXT = "ab9!#$%&'*+/=?^_`{|}~-.üß中"
_LOCAL_CHARS = _LOCAL_ATEXT + '()<>[]:;,"\\ @\x00\x01\x7f\u202e\u00a0'
_DOMAIN_LDH = "abz09-.üö中"
_DOMAIN_CHARS = _DOMAIN_LDH + "_ @\x7f"


@pytest.fixture(scope="module")
def rcpt_server() -> Iterator[SmtpCapture]:
    with SmtpCapture() as server:
        yield server


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    local=st.text(alphabet=_LOCAL_ATEXT, min_size=1, max_size=70)
    | st.text(alphabet=_LOCAL_CHARS, min_size=1, max_size=70),
    domain=st.text(alphabet=_DOMAIN_LDH, min_size=1, max_size=30)
    | st.text(alphabet=_DOMAIN_CHARS, min_size=1, max_size=30),
)
def test_any_address_the_check_accepts_can_be_built_and_is_accepted_at_rcpt(
    rcpt_server: SmtpCapture, local: str, domain: str
) -> None:
    address = f"{local}@{domain}"
    try:
        checked_address(address)
    except InvalidAddress:
        event("refused")
        return
    event("accepted")
    message = build_message(
        RenderedEmail(subject="s", text="t", html="<p>h</p>"),
        mail_from="alerts@poller.example.com",
        recipients=[address],
        message_id="<x@poller.example.com>",
        date=NOW,
    )
    transport = SmtpTransport(
        host=rcpt_server.host, port=rcpt_server.port, security="none",
        username=None, password=None, timeout=5,
    )  # fmt: skip
    with transport:
        assert transport.send(message, [address]) == {}
    assert rcpt_server.received[-1].rcpt_tos == (smtp_address(address),)


# --- the row status per-recipient outcomes add up to -------------------------------------------


def entry(outcome: str) -> dict[str, str]:
    return {"outcome": outcome, "answer": "x", "at": NOW.isoformat()}


@pytest.mark.parametrize(
    ("outcomes", "status", "summary"),
    [
        ({}, "pending", None),
        ({"a": "sent"}, "pending", "pending 1/2 sent, 1 not tried yet"),
        ({"a": "sent", "b": "retrying"}, "pending", "pending 1/2 sent, 1 retrying"),
        ({"a": "failed", "b": "retrying"}, "pending", "pending 0/2 sent, 1 failed, 1 retrying"),
        ({"a": "sent", "b": "sent"}, "sent", "sent 2/2"),
        ({"a": "sent", "b": "failed"}, "sent", "sent 1/2, 1 failed"),
        ({"a": "failed", "b": "failed"}, "failed", "failed 0/2, 2 failed"),
    ],
)
def test_the_row_status_and_its_summary(
    outcomes: dict[str, str], status: str, summary: str | None
) -> None:
    deliveries = {address: entry(outcome) for address, outcome in outcomes.items()}
    assert row_status(["a", "b"], deliveries) == status
    assert delivery_summary(status, ["a", "b"], deliveries) == (summary or status)


@given(st.lists(st.sampled_from([None, "sent", "failed", "retrying"]), min_size=1, max_size=6))
def test_a_row_is_final_only_when_every_recipient_is(outcomes: list[str | None]) -> None:
    recipients = [f"r{index}@x.example" for index in range(len(outcomes))]
    deliveries = {r: entry(o) for r, o in zip(recipients, outcomes, strict=True) if o}
    status = row_status(recipients, deliveries)
    if None in outcomes or "retrying" in outcomes:
        assert status == "pending"
    elif "sent" in outcomes:
        assert status == "sent"
    else:
        assert status == "failed"


# --- revision 0003 ------------------------------------------------------------------------------


def test_db_upgrade_from_0002_keeps_notifications_and_delivers_a_pending_one_to_all(
    database_url: str,
) -> None:
    engine = create_configured_engine(database_url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", MIGRATIONS_LOCATION)
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
        connection.execute(org_state.insert().values(
            org_id=1, name="Org", enabled=True, threshold=Decimal(1000), balance=Decimal(5),
            state="alerted", breach_count=3, first_seen_at=NOW, changed_at=NOW))  # fmt: skip
        for breach, status in ((1, "sent"), (2, "failed"), (3, "pending")):
            connection.execute(text(
                "INSERT INTO notification (org_id, breach_number, kind, org_name, recipients, "
                "subject, balance, threshold, auto_refill, detected_at, status, attempts, "
                "next_attempt_at, created_at, updated_at) VALUES (1, :breach, 'low_credits', "
                "'Org', :recipients, 'Low', '5', '1000', false, :now, :status, 0, :now, :now, "
                ":now)"
            ), {"breach": breach, "status": status, "now": NOW,
                "recipients": '["a@x.example", "b@x.example"]'})  # fmt: skip
    engine.dispose()

    assert upgrade(database_url) == ("0002", "0004")

    store = open_database(database_url)
    try:
        rows = store.notifications_for(1)
        assert [(row.status, row.deliveries) for row in rows] == [
            ("sent", {}),
            ("failed", {}),
            ("pending", {}),
        ]
        assert row_status(rows[2].recipients, rows[2].deliveries) == "pending"
        # A failed row from before per-recipient outcomes is requeued for all its recipients.
        assert store.requeue_failed(NOW) == (1, 2)
    finally:
        store.close()

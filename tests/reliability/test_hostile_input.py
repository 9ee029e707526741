"""Hostile input, fuzzed with hypothesis: any organization name renders safely in the text,
the HTML and the Subject; any value the API serves for an organization's field yields a
parsed organization or an error for that organization alone; recipients only ever come from
the organization's own admin list."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.cekura.client import CekuraClient
from poller.config.settings import load_settings
from poller.devtools.simulator import SimulatedApi, SimulatorServer
from poller.engine.model import Member, Organization
from poller.mail import AlertContent, build_message, render_email

HOSTILE_NAMES = st.one_of(
    st.text(min_size=1, max_size=300),
    st.lists(
        st.sampled_from(
            [
                "\r\n",
                "\n",
                "\r",
                "Bcc: evil@x.example",
                "<script>",
                "&amp;",
                '"',
                "'",
                "=?utf-8?b?SGk=?=",
                "\u202e",
                "\x00",
                "Org",
                " ",
                "\u00e9\u4e2d\U0001f600",
                "x" * 120,
            ]
        ),
        min_size=1,
        max_size=12,
    ).map("".join),
)
EXPECTED_HEADERS = [
    "Subject",
    "From",
    "To",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "X-Auto-Response-Suppress",
    "MIME-Version",
    "Content-Type",
]


@settings(max_examples=80, deadline=None)
@given(name=HOSTILE_NAMES)
def test_any_org_name_renders_safely_in_text_html_and_subject(name: str) -> None:
    content = AlertContent(
        org_id=7,
        org_name=name,
        breach_number=1,
        balance=Decimal("12.5"),
        threshold=Decimal("1000"),
        detected_at=datetime(2026, 1, 2, tzinfo=UTC),
        billing_url="https://dashboard.cekura.ai/billing",
        auto_refill=False,
    )
    rendered = render_email(content)
    message = build_message(
        rendered,
        mail_from="alerts@poller.example.com",
        recipients=["admin@org7.example"],
        message_id="<a.7.1@x.example>",
        date=content.detected_at,
    )
    wire = message.data(eight_bit=False)
    parsed = email.message_from_bytes(wire, policy=email.policy.default)

    assert list(parsed.keys()) == EXPECTED_HEADERS  # nothing injected, nothing lost
    assert parsed["To"] == "admin@org7.example"
    subject = str(parsed["Subject"])
    assert "\r" not in subject and "\n" not in subject and len(subject) <= 200
    assert all(len(line) <= 998 for line in wire.split(b"\r\n"))
    html_part = parsed.get_body(preferencelist=("html",)).get_content()
    # Whatever the name holds, it cannot open a tag or an entity of its own in the HTML.
    for dangerous in ("<script", "<img", "<a "):
        assert html_part.lower().count(dangerous) == rendered.html.lower().count(dangerous)


@pytest.fixture(scope="module")
def fuzz_api() -> Iterator[tuple[SimulatedApi, str]]:
    api = SimulatedApi(token="fuzz-token-000000")
    for org_id in (1, 2):
        api.add_org(f"Org {org_id}", org_id=org_id, credits_remaining="500.00")
    with SimulatorServer(api) as server:
        yield api, server.url


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["abc", "NaN", "1e999999", "-0", "1_000", "", " 12.50 "]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
ORG_FIELDS = [
    "id",
    "name",
    "notify_low_credits",
    "low_credits_threshold",
    "is_send_emails_enabled",
    "auto_refill",
    "members",
]
BILLING_FIELDS = ["organization", "credits_remaining", "credits_used"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(where=st.sampled_from(["organization", "billing"]), data=st.data(), value=JSON_VALUES)
def test_any_value_the_api_serves_yields_an_org_or_an_error_for_that_org_only(
    fuzz_api: tuple[SimulatedApi, str], where: str, data: st.DataObject, value: object
) -> None:
    api, url = fuzz_api
    api.clear_corruption()
    if where == "organization":
        field = data.draw(st.sampled_from(ORG_FIELDS))
        api.corrupt_organization(1, field, value)
    else:
        field = data.draw(st.sampled_from(BILLING_FIELDS))
        api.corrupt_billing(1, field, value)
    settings_ = load_settings(
        env={
            "POLLER_API_URL": url,
            "POLLER_API_TOKEN": "fuzz-token-000000",
            "POLLER_API_RETRIES": "0",
        }
    )
    with CekuraClient(settings_, sleep=lambda _s: None) as client:
        result = client.fetch_snapshots()

    read = {snapshot.id for snapshot in result.snapshots}
    assert 2 in read  # the other organization never pays for org 1's data
    if 1 not in read and not (where == "organization" and field == "id"):
        [error] = result.errors
        assert error.org_id == 1 and field in error.message
    for snapshot in result.snapshots:
        assert isinstance(snapshot.balance, Decimal) and snapshot.balance.is_finite()


@given(
    members=st.lists(
        st.tuples(
            st.sampled_from(["admin", "member", "view_only"]),
            st.sampled_from(
                [
                    "a@org.example",
                    "b@other.example",
                    "B@OTHER.example",
                    "",
                    "no-at",
                    "x@y.example\r\nBcc: z@evil.example",
                    " c@org.example ",
                ]
            ),
            st.sampled_from([True, False, None]),
        ),
        max_size=8,
    )
)
def test_recipients_come_only_from_the_org_s_own_opted_in_admins(members: list) -> None:
    org = Organization(
        id=1,
        name="Org",
        notify_low_credits=True,
        low_credits_threshold=Decimal("1000"),
        send_emails_enabled=True,
        auto_refill=False,
        members=tuple(
            Member(i, 100 + i, "n", mail, role, notify)
            for i, (role, mail, notify) in enumerate(members)
        ),
    )
    allowed = {
        m.email.strip().lower()
        for m in org.members
        if m.role == "admin" and m.email_notify_enabled is not False
    }
    recipients = [r.email.lower() for r in org.alert_recipients()]
    assert set(recipients) <= allowed
    assert len(recipients) == len(set(recipients))
    assert all("\n" not in r and "\r" not in r and "@" in r for r in recipients)
    # The cycle keeps only this slimmer copy of every org: it must pick the same people.
    slim = org.for_alerts()
    assert slim.alert_recipients() == org.alert_recipients()
    assert all(m.role == "admin" and m.email_notify_enabled is not False for m in slim.members)

"""The low-credits email (rendering, building) and the SMTP transport against a real server."""

from __future__ import annotations

import email
import email.policy
import re
import socket
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from email.utils import formataddr, getaddresses
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.config.settings import Secret
from poller.devtools.smtp_capture import CaptureHandler, SmtpCapture, describe
from poller.engine.addresses import needs_smtputf8, smtp_address
from poller.mail.message import OutgoingMessage, build_message, message_id_for
from poller.mail.render import (
    TEMPLATE_SETS,
    AlertContent,
    RenderedEmail,
    forecast_line,
    format_credits,
    format_runway,
    one_line,
    render_email,
    render_subject,
    template_environment,
)
from poller.mail.smtp import DeliveryError, SmtpTransport
from tests.fixtures.smtp import TEST_LOGIN, TEST_PASSWORD, SmtpTestServer

MAIL_FROM = "Cekura alerts <alerts@poller.example.com>"
DETECTED_AT = datetime(2024, 5, 1, 14, 3, 27, tzinfo=UTC)
BILLING_URL = "https://dashboard.cekura.ai/settings/org/billing"
HOSTILE_NAME = '<script>alert(1)</script>"onmouseover=alert(2) x="'


def alert(**changes: object) -> AlertContent:
    content = AlertContent(
        org_id=37,
        org_name="Acme Voice",
        breach_number=2,
        balance=Decimal("412.50"),
        threshold=Decimal("500.00"),
        detected_at=DETECTED_AT,
        billing_url=BILLING_URL,
        auto_refill=False,
    )
    return replace(content, **changes)  # type: ignore[arg-type]


def message_for(content: AlertContent, recipients: list[str]) -> OutgoingMessage:
    return build_message(
        render_email(content),
        mail_from=MAIL_FROM,
        recipients=recipients,
        message_id=message_id_for(
            content.org_id, content.breach_number, MAIL_FROM, detected_at=content.detected_at
        ),
        date=content.detected_at,
    )


def read(message: OutgoingMessage, *, eight_bit: bool = True) -> email.message.EmailMessage:
    """The message as a mail client reads it off the wire."""
    parsed = email.message_from_bytes(
        message.data(eight_bit=eight_bit), policy=email.policy.default
    )
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def hand_built(rendered: RenderedEmail) -> OutgoingMessage:
    """A message built from text given as is, for one ops address."""
    return build_message(
        rendered,
        mail_from=MAIL_FROM,
        recipients=["ops@acme.example"],
        message_id="<x@y>",
        date=DETECTED_AT,
    )


class HtmlOutline(HTMLParser):
    """Tags, attributes and link texts of an HTML document, as a browser would read them."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.links: dict[str, str] = {}  # link text -> href
        self.text: list[str] = []
        self._href: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(attrs)
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._href = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._href is not None and data.strip():
            self.links[data.strip()] = self._href


# --- formatting -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        ("1234.5", "1,234.50 credits"),
        ("412.50", "412.50 credits"),
        ("-12", "-12.00 credits"),
        ("1", "1.00 credits"),
        ("0", "0.00 credits"),
        # Every decimal the amount has: the rule compared these, the reader must see them.
        ("-0.001", "-0.001 credits"),
        ("0.015", "0.015 credits"),
        ("999.999", "999.999 credits"),
        ("1234567.00000001", "1,234,567.00000001 credits"),
        ("99999999.99", "99,999,999.99 credits"),
        ("1E+3", "1,000.00 credits"),
        ("-0", "0.00 credits"),
        ("-0.00", "0.00 credits"),
        ("-0E-7", "0.0000000 credits"),
    ],
)
def test_credit_amounts_read_exactly_with_thousands_separators_and_at_least_two_decimals(
    amount: str, expected: str
) -> None:
    assert format_credits(Decimal(amount)) == expected


# Every amount parsing accepts: below 10**18, at most 20 decimals.
parsed_amounts = st.decimals(
    min_value=-(10**18) + 1, max_value=10**18 - 1, places=20, allow_nan=False
).map(lambda amount: amount.normalize() if amount else amount) | st.decimals(
    min_value=-(10**6), max_value=10**6, places=3
)


def shown_value(text: str) -> Decimal:
    return Decimal(text.removesuffix(" credits").replace(",", ""))


@given(parsed_amounts, parsed_amounts)
def test_a_balance_below_its_threshold_is_shown_below_it(
    balance: Decimal, threshold: Decimal
) -> None:
    balance, threshold = sorted((balance, threshold))
    if balance == threshold:
        return
    shown_balance, shown_threshold = format_credits(balance), format_credits(threshold)
    assert shown_balance != shown_threshold
    assert shown_value(shown_balance) == balance and shown_value(shown_threshold) == threshold
    assert not shown_balance.startswith("-0.") or balance < 0


def test_it_refuses_to_format_a_float_amount() -> None:
    with pytest.raises(TypeError, match="Decimal"):
        format_credits(412.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("amount", ["NaN", "Infinity", "-Infinity"])
def test_it_refuses_to_format_a_non_finite_amount(amount: str) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        format_credits(Decimal(amount))


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({}, None),
        (
            {
                "burn_per_day": Decimal("120"),
                "runs_out_at": DETECTED_AT + timedelta(days=3, hours=4),
            },
            "At your recent usage (\u2248 120.00 credits/day) you will run out around 4 May 2024 "
            "(in about 3 days).",
        ),
        # A rate without a date: the runway is beyond the forecast horizon.
        (
            {"burn_per_day": Decimal("0.25"), "runs_out_at": None},
            "At your recent usage (\u2248 0.25 credits/day) your credits will last more than 10 "
            "years.",
        ),
    ],
)
def test_the_forecast_line_gives_a_date_within_the_horizon_and_no_date_beyond_it(
    changes: dict[str, object], line: str | None
) -> None:
    assert forecast_line(alert(**changes)) == line


@pytest.mark.parametrize(
    ("days", "phrase"),
    [
        ("0.5", "in less than a day"),
        ("1.4", "in about 1 day"),
        ("3653", "in about 3653 days"),
        ("3653.01", "in more than 10 years"),
        ("1e30", "in more than 10 years"),
    ],
)
def test_a_runway_beyond_ten_years_is_said_without_a_number(days: str, phrase: str) -> None:
    assert format_runway(Decimal(days)) == phrase


# --- the subject ----------------------------------------------------------------------------


def test_the_subject_names_the_org_the_balance_and_the_threshold() -> None:
    assert render_subject(alert()) == (
        "Low credits: Acme Voice has 412.50 credits left (threshold 500.00 credits)"
    )


def test_a_reminder_says_so_in_the_subject() -> None:
    assert render_subject(alert(kind="reminder")).startswith("Reminder: Low credits: Acme Voice")


@pytest.mark.parametrize(
    "name",
    ["Acme\r\nBcc: evil@x", "Acme\nBcc: evil@x", "Acme\x00\x1b[31m\u2028Bcc: evil@x", "Acme\u202e"],
)
def test_the_subject_is_one_line_without_control_characters(name: str) -> None:
    subject = render_subject(alert(org_name=name))
    assert subject.startswith("Low credits: Acme")
    assert all(char.isprintable() for char in subject)


def test_a_long_org_name_is_shortened_so_the_numbers_stay_in_the_subject() -> None:
    subject = render_subject(alert(org_name="Very Long Organization Name " * 20))
    assert len(subject) <= 200
    assert "…" in subject
    assert subject.endswith("has 412.50 credits left (threshold 500.00 credits)")


# --- the body ---------------------------------------------------------------------------------


def test_the_email_names_the_org_the_amounts_and_when_it_was_detected() -> None:
    rendered = render_email(alert(balance=Decimal("1234.5"), threshold=Decimal("2000")))
    html_text = " ".join(" ".join(HtmlOutline(rendered.html).text).split())
    for body in (rendered.text, html_text):
        assert "Acme Voice" in body
        assert "organization 37" in body
        assert "1,234.50 credits" in body
        assert "2,000.00 credits" in body
        assert "1 May 2024, 14:03 UTC" in body


def test_the_detection_time_is_shown_in_utc() -> None:
    cest = timezone(timedelta(hours=2))
    rendered = render_email(alert(detected_at=datetime(2024, 5, 1, 16, 3, tzinfo=cest)))
    assert "1 May 2024, 14:03 UTC" in rendered.text


def test_a_naive_detection_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        render_email(alert(detected_at=datetime(2024, 5, 1, 14, 3)))


def test_the_add_credits_button_links_to_the_billing_url() -> None:
    url = "https://billing.example.com/org?id=37&tab=credits"
    rendered = render_email(alert(billing_url=url))
    assert HtmlOutline(rendered.html).links["Add credits"] == url
    assert 'href="https://billing.example.com/org?id=37&amp;tab=credits"' in rendered.html
    assert url in rendered.text


def test_a_quote_in_the_billing_url_cannot_break_out_of_the_href() -> None:
    url = 'https://billing.example.com/"onclick="alert(1)'
    outline = HtmlOutline(render_email(alert(billing_url=url)).html)
    assert outline.links["Add credits"] == url
    assert "onclick" not in [name for name, _ in outline.attributes]


@pytest.mark.parametrize(
    "url",
    ["javascript:alert(1)", "data:text/html,hi", "billing", "https://x.example/a b", "https://"],
)
def test_a_billing_url_that_is_not_plain_http_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="billing_url"):
        render_email(alert(billing_url=url))


def test_it_explains_how_to_change_the_threshold_or_turn_alerts_off() -> None:
    rendered = render_email(alert())
    html_text = " ".join(" ".join(HtmlOutline(rendered.html).text).split())
    for body in (" ".join(rendered.text.split()), html_text):
        assert "Settings > Organization > General" in body
        assert "Low Credits Notifications" in body
        assert "poller configure --org 37 --threshold AMOUNT" in body
        assert "poller configure --org 37 --disable" in body


@pytest.mark.parametrize(
    ("auto_refill", "expected", "unexpected"),
    [
        (False, "turn on auto-refill", "Auto-refill is on"),
        (True, "Auto-refill is on, but the balance is still below", "turn on auto-refill"),
    ],
)
def test_the_auto_refill_tip_depends_on_whether_auto_refill_is_on(
    auto_refill: bool, expected: str, unexpected: str
) -> None:
    rendered = render_email(alert(auto_refill=auto_refill))
    html_text = " ".join(" ".join(HtmlOutline(rendered.html).text).split())
    for body in (" ".join(rendered.text.split()), html_text):
        assert expected in body
        assert unexpected not in body
        assert "Add Credits > Auto-refill" in body
    if auto_refill:
        assert "payment method" in rendered.text


def test_a_hostile_org_name_is_escaped_in_the_html() -> None:
    rendered = render_email(alert(org_name=HOSTILE_NAME))
    outline = HtmlOutline(rendered.html)
    assert "script" not in outline.tags
    assert "onmouseover" not in [name for name, _ in outline.attributes]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&#34;onmouseover=" in rendered.html
    # Escaped, not removed: the reader still sees the name as the organization wrote it.
    assert HOSTILE_NAME in "".join(outline.text)
    # The text part is not HTML, so it shows the name as is.
    assert HOSTILE_NAME in rendered.text


def test_the_html_works_in_mail_clients_without_scripts_stylesheets_or_remote_images() -> None:
    outline = HtmlOutline(render_email(alert()).html)
    assert {"script", "style", "img", "link", "iframe", "form"}.isdisjoint(outline.tags)
    assert "table" in outline.tags
    assert all(name != "class" for name, _ in outline.attributes)


def test_the_text_body_has_no_template_leftovers() -> None:
    for kind in ("low_credits", "reminder", "runway", "recovery"):
        rendered = render_email(alert(kind=kind))
        for body in (rendered.text, rendered.html):
            assert "{{" not in body and "{%" not in body and "&amp;gt;" not in body


def test_a_missing_template_variable_is_an_error_not_a_blank() -> None:
    with pytest.raises(jinja2.UndefinedError):
        template_environment().from_string("{{ org_nmae }}").render(org_name="Acme")


# --- templates on disk -------------------------------------------------------------------------


def test_the_templates_are_loaded_from_the_package() -> None:
    package = Path(__file__).resolve().parents[2] / "poller" / "mail" / "templates"
    for names in TEMPLATE_SETS.values():
        for name in names:
            template = template_environment().get_template(name)
            assert template.filename is not None
            assert Path(template.filename).resolve().parent == package


# --- Message-ID and the built message ---------------------------------------------------------


@pytest.mark.parametrize(
    ("mail_from", "expected"),
    [
        ("alerts@poller.example.com", "<low-credits.37.2.20240501T140327Z@poller.example.com>"),
        ("Cekura alerts <alerts@Example.COM>", "<low-credits.37.2.20240501T140327Z@example.com>"),
        ("alerts@bücher.example", "<low-credits.37.2.20240501T140327Z@xn--bcher-kva.example>"),
        ("no-domain", "<low-credits.37.2.20240501T140327Z@poller.invalid>"),
        ("alerts@under_score.example", "<low-credits.37.2.20240501T140327Z@poller.invalid>"),
    ],
)
def test_the_message_id_is_built_from_org_breach_and_sender_domain(
    mail_from: str, expected: str
) -> None:
    assert message_id_for(37, 2, mail_from, detected_at=DETECTED_AT) == expected


def test_the_same_breach_always_gets_the_same_message_id() -> None:
    def message_id(org_id: int, breach: int, **extra: str) -> str:
        return message_id_for(org_id, breach, MAIL_FROM, detected_at=DETECTED_AT, **extra)

    assert message_id(37, 2) == message_id(37, 2)
    assert message_id(37, 2) != message_id(37, 3)
    assert message_id(37, 2) != message_id(38, 2)
    assert message_id(37, 2, kind="test") == "<test.37.2.20240501T140327Z@poller.example.com>"


def test_a_breach_recorded_by_a_replaced_database_gets_a_new_message_id() -> None:
    later = DETECTED_AT + timedelta(days=30)
    assert message_id_for(37, 1, MAIL_FROM, detected_at=DETECTED_AT) != message_id_for(
        37, 1, MAIL_FROM, detected_at=later
    )


def test_a_message_id_kind_with_odd_characters_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        message_id_for(37, 2, MAIL_FROM, detected_at=DETECTED_AT, kind="a>b")


def test_the_message_is_multipart_alternative_with_text_then_html() -> None:
    parsed = read(message_for(alert(), ["ops@acme.example"]))
    assert parsed.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in parsed.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    assert parsed["Message-ID"] == "<low-credits.37.2.20240501T140327Z@poller.example.com>"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Date"] == "Wed, 01 May 2024 14:03:27 +0000"
    assert parsed["From"] == MAIL_FROM
    assert parsed["Subject"] == render_subject(alert())
    html = parsed.get_body(preferencelist=("html",))
    assert html is not None and "Add credits" in html.get_content()


def test_a_header_injection_in_the_org_name_stays_inside_the_subject() -> None:
    recipients = ["ops@acme.example", "cto@acme.example"]
    parsed = read(message_for(alert(org_name="Acme\r\nBcc: evil@x"), recipients))
    assert "Bcc" not in parsed
    assert parsed.get_all("Subject") == [
        "Low credits: Acme Bcc: evil@x has 412.50 credits left (threshold 500.00 credits)"
    ]
    assert [address.addr_spec for address in parsed["To"].addresses] == recipients
    assert "evil@x" not in str(parsed["To"])


@pytest.mark.parametrize("eight_bit", [True, False])
def test_no_line_on_the_wire_exceeds_the_smtp_limit_even_for_a_huge_org_name(
    eight_bit: bool,
) -> None:
    recipients = [f"admin{number}@acme.example" for number in range(100)]
    wire = message_for(alert(org_name="Ünïcode Org " * 400), recipients).data(eight_bit=eight_bit)
    assert max(len(line) for line in wire.split(b"\r\n")) <= 78
    assert wire.isascii() or eight_bit
    parsed = email.message_from_bytes(wire, policy=email.policy.default)
    assert parsed.get_body(preferencelist=("html",)).get_content().count("Ünïcode Org") >= 400
    assert len(parsed["To"].addresses) == 100


def test_a_hand_built_subject_with_a_line_break_is_flattened() -> None:
    rendered = RenderedEmail(subject="Hi\r\nBcc: evil@x", text="t", html="<p>h</p>")
    message = read(hand_built(rendered))
    assert "Bcc" not in message
    assert message["Subject"] == "Hi Bcc: evil@x"


def lines_of(text: str) -> list[str]:
    """Lines as the wire carries them: CR, LF and CRLF all end a line, nothing else does."""
    return [line.decode("utf-8") for line in text.encode("utf-8").splitlines()]


def test_the_parts_carry_whatever_line_endings_the_templates_have_as_crlf() -> None:
    rendered = RenderedEmail(subject="s", text="a\rb\nc\r\nd", html="<p>\r\n</p>")
    data = hand_built(rendered).data(eight_bit=True)
    assert b"\r\n\r\na\r\nb\r\nc\r\nd\r\n" in data
    assert b"\r\n\r\n<p>\r\n</p>\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")


def unescaped(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8")


ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def check_wire(data: bytes, *, seven_bit: bool) -> None:
    """RFC 5322 line limits, RFC 2047 encoded words, RFC 6152 without 8BITMIME."""
    lines = data.split(b"\r\n")
    assert all(len(line) <= 998 for line in lines)
    head = data.partition(b"\r\n\r\n")[0]
    assert all(len(word) <= 75 for word in ENCODED_WORD.findall(head))
    if seven_bit:
        assert data.isascii()
        # Nothing 8-bit is announced either.
        assert b"8bit" not in data.lower().replace(b"8bitmime", b"")
        assert all(len(line) <= 78 for line in lines)


@settings(max_examples=80, deadline=None)
@given(
    subject=st.text(max_size=300),
    text=st.text(max_size=300) | st.text(alphabet="ab\u00e9\u4e2d \n", min_size=999),
    html=st.text(max_size=300),
    display_name=st.sampled_from(
        ["", "Cekura alerts", "Jörg, Alerts", 'Q "uote"', "=?x?=", "\u4e2d\u6587"]
    ),
    recipients=st.lists(
        st.sampled_from(
            [
                "ops@acme.example",
                "cto@acme.example",
                "a" * 60 + "@b.example",
                "jürgen@bücher.example",
                "admin@bücher.example",
            ]
        ),
        min_size=1,
        max_size=40,
    ),
    eight_bit=st.booleans(),
)
def test_a_mail_client_reads_exactly_what_was_rendered(
    subject: str,
    text: str,
    html: str,
    display_name: str,
    recipients: list[str],
    eight_bit: bool,
) -> None:
    # Whatever the server offers: the email package's parser, as a mail client, reads back
    # every header and part as given.
    address = "alerts@poller.example.com"
    mail_from = formataddr((display_name, address))
    message = build_message(
        RenderedEmail(subject=subject, text=text, html=html),
        mail_from=mail_from,
        recipients=recipients,
        message_id="<low-credits.7.1.20240501T140327Z@poller.example.com>",
        date=DETECTED_AT,
    )
    data = message.data(eight_bit=eight_bit)
    parsed = read(message, eight_bit=eight_bit)

    # A local part that is not ASCII needs SMTPUTF8, and with it 8BITMIME (RFC 6531).
    assert message.international == any(map(needs_smtputf8, recipients))
    check_wire(data, seven_bit=not eight_bit and not message.international)
    assert list(parsed.keys()) == [
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
    assert parsed["Subject"] == one_line(subject)
    # Python's parser keeps the UTF-8 of headers sent with SMTPUTF8 (RFC 6532) as escapes.
    sender = parsed["From"].addresses[0]
    assert unescaped(sender.display_name) == display_name and sender.addr_spec == address
    # str() decodes addresses sent as UTF-8; domains that are not ASCII go IDNA-encoded.
    to = [address for _, address in getaddresses([str(parsed["To"])])]
    assert to == [smtp_address(address) for address in recipients]
    assert parsed["Message-ID"] == "<low-credits.7.1.20240501T140327Z@poller.example.com>"
    assert parsed.get_content_type() == "multipart/alternative"
    plain, rich = parsed.iter_parts()
    assert (plain.get_content_type(), rich.get_content_type()) == ("text/plain", "text/html")
    # An empty body still ends with a line break, as EmailMessage writes it.
    assert lines_of(plain.get_content()) == (lines_of(text) or [""])
    assert lines_of(rich.get_content()) == (lines_of(html) or [""])
    assert message.envelope_from == address


@settings(max_examples=80, deadline=None)
@given(org_name=st.text(max_size=120), eight_bit=st.booleans())
def test_any_org_name_makes_an_email_that_reads_back_as_rendered(
    org_name: str, eight_bit: bool
) -> None:
    content = alert(org_name=org_name)
    rendered = render_email(content)
    message = message_for(content, [OPS])
    check_wire(message.data(eight_bit=eight_bit), seven_bit=not eight_bit)
    parsed = read(message, eight_bit=eight_bit)
    assert parsed["Subject"] == rendered.subject
    assert lines_of(parsed.get_body(("plain",)).get_content()) == lines_of(rendered.text)
    assert lines_of(parsed.get_body(("html",)).get_content()) == lines_of(rendered.html)


@pytest.mark.parametrize("eight_bit", [True, False])
def test_a_long_subject_that_is_not_ascii_is_folded_into_short_encoded_words(
    eight_bit: bool,
) -> None:
    rendered = render_email(alert(org_name="Jörg Müller Übersetzungen — 低信用额度 " * 3))
    data = hand_built(rendered).data(eight_bit=eight_bit)
    head = data.partition(b"\r\n\r\n")[0].decode("ascii")
    subject = head[head.index("Subject:") : head.index("\r\nFrom:")]
    assert subject.count("\r\n ") >= 3  # folded, every line short
    assert all(len(line) <= 76 for line in subject.split("\r\n"))
    words = ENCODED_WORD.findall(subject.encode("ascii"))
    assert len(words) >= 4 and all(len(word) <= 75 for word in words)
    assert read(hand_built(rendered))["Subject"] == rendered.subject


def test_an_ascii_subject_is_folded_between_words_not_after_the_colon() -> None:
    subject = "Low credits: Acme Voice has 412.50 credits left (threshold 500.00 credits)"
    data = hand_built(RenderedEmail(subject=subject, text="t", html="h")).data(eight_bit=True)
    assert data.startswith(b"Subject: Low credits: Acme Voice")  # not "Subject:\r\n Low"
    assert read(hand_built(RenderedEmail(subject=subject, text="t", html="h")))["Subject"] == (
        subject
    )


def test_without_8bitmime_a_body_that_is_not_ascii_goes_base64_or_quoted_printable() -> None:
    rendered = RenderedEmail(subject="s", text="Grüße\n", html="<p>Grüße</p>\n")
    message = hand_built(rendered)
    eight = read(message, eight_bit=True)
    seven = read(message, eight_bit=False)
    assert [part["Content-Transfer-Encoding"] for part in eight.iter_parts()] == ["8bit"] * 2
    encodings = {part["Content-Transfer-Encoding"] for part in seven.iter_parts()}
    assert encodings <= {"base64", "quoted-printable"}
    assert message.data(eight_bit=False).isascii()
    for parsed in (eight, seven):
        assert lines_of(parsed.get_body(("plain",)).get_content()) == ["Grüße"]
        assert lines_of(parsed.get_body(("html",)).get_content()) == ["<p>Grüße</p>"]


def test_a_subject_that_looks_like_an_encoded_word_reads_as_written() -> None:
    rendered = RenderedEmail(subject="Hi =?utf-8?b?QmNjOiBldmls?= there", text="t", html="h")
    message = read(hand_built(rendered))
    assert message["Subject"] == "Hi =?utf-8?b?QmNjOiBldmls?= there"


def test_a_message_id_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="Message-ID"):
        build_message(
            render_email(alert()),
            mail_from=MAIL_FROM,
            recipients=["ops@acme.example"],
            message_id="<x@y>\r\nBcc: evil@x",
            date=DETECTED_AT,
        )


@pytest.mark.parametrize(
    "recipient",
    [
        "ops@acme.example\r\nBcc: evil@x",
        "Evil <ops@acme.example>",
        "ops",
        "a@b@c",
        "",
        "a" * 250 + "@acme.example",
    ],
)
def test_a_recipient_that_is_not_a_plain_address_is_refused(recipient: str) -> None:
    with pytest.raises(ValueError, match="address"):
        message_for(alert(), ["ok@acme.example", recipient])


def test_a_message_needs_a_recipient() -> None:
    with pytest.raises(ValueError, match="recipient"):
        message_for(alert(), [])


def test_a_sender_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="mail_from"):
        build_message(
            render_email(alert()),
            mail_from="alerts@poller.example.com\r\nBcc: evil@x",
            recipients=["ops@acme.example"],
            message_id="<x@y>",
            date=DETECTED_AT,
        )


# --- SMTP transport against a real server ------------------------------------------------------

OPS, CTO = "ops@acme.example", "cto@acme.example"


def transport(
    server: SmtpTestServer | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    security: str = "none",
    username: str | None = None,
    password: str | None = None,
    timeout: float = 5.0,
) -> SmtpTransport:
    return SmtpTransport(
        host=host or (server.host if server else "127.0.0.1"),
        port=port or (server.port if server else 25),
        security=security,
        username=username,
        password=Secret(password) if password is not None else None,
        timeout=timeout,
        local_hostname="poller.test",
    )


def send(smtp: SmtpTransport, recipients: list[str] = [OPS, CTO]) -> dict[str, tuple[int, bytes]]:  # noqa: B006
    return smtp.send(message_for(alert(), recipients), recipients)


def test_it_delivers_the_message_to_every_recipient(smtp_server: SmtpTestServer) -> None:
    with transport(smtp_server) as smtp:
        refused = send(smtp)
    assert refused == {}
    [received] = smtp_server.received
    assert received.rcpt_tos == (OPS, CTO)
    assert received.mail_from == "alerts@poller.example.com"
    assert received.message["Subject"] == render_subject(alert())
    expected_id = "<low-credits.37.2.20240501T140327Z@poller.example.com>"
    assert received.message["Message-ID"] == expected_id
    assert "Bcc" not in received.message


def test_one_refused_recipient_does_not_stop_the_others(smtp_server: SmtpTestServer) -> None:
    smtp_server.reject_recipient(CTO, "550 5.1.1 no such user")
    with transport(smtp_server) as smtp:
        refused = send(smtp)
    assert refused == {CTO: (550, b"5.1.1 no such user")}
    assert [m.rcpt_tos for m in smtp_server.received] == [(OPS,)]


def test_every_recipient_refused_permanently_is_a_permanent_error(
    smtp_server: SmtpTestServer,
) -> None:
    smtp_server.reject_recipient(OPS, "550 5.1.1 no such user")
    smtp_server.reject_recipient(CTO, "550 5.1.1 no such user")
    with transport(smtp_server) as smtp, pytest.raises(DeliveryError) as caught:
        send(smtp)
    assert caught.value.permanent is True
    assert caught.value.smtp_code == 550
    assert "550 5.1.1 no such user" in str(caught.value)
    assert smtp_server.messages == []


def test_every_recipient_refused_but_one_only_for_now_is_a_temporary_error(
    smtp_server: SmtpTestServer,
) -> None:
    smtp_server.reject_recipient(OPS, "550 5.1.1 no such user")
    smtp_server.reject_recipient(CTO, "450 4.2.1 mailbox busy")
    with transport(smtp_server) as smtp, pytest.raises(DeliveryError) as caught:
        send(smtp)
    assert caught.value.permanent is False
    assert caught.value.smtp_code == 450


@pytest.mark.parametrize(
    ("stage", "reply", "permanent"),
    [
        # Refusing the sender is not about this message: no answer to MAIL fails it for good.
        ("mail", "421 4.3.2 service shutting down", False),
        ("mail", "451 4.3.0 local error", False),
        ("mail", "554 5.7.1 sender rejected", False),
        ("data", "421 4.3.2 service shutting down", False),
        ("data", "451 4.3.0 try again later", False),
        ("data", "554 5.6.0 message rejected as spam", True),
    ],
)
def test_the_server_answer_to_mail_or_data_decides_if_the_error_is_permanent(
    smtp_server: SmtpTestServer, stage: str, reply: str, permanent: bool
) -> None:
    if stage == "mail":
        smtp_server.answer_mail(reply)
    else:
        smtp_server.answer_data(reply)
    with transport(smtp_server) as smtp, pytest.raises(DeliveryError) as caught:
        send(smtp)
    assert str(caught.value).endswith(reply)
    assert caught.value.permanent is permanent and caught.value.refused == {}
    assert caught.value.smtp_code == int(reply[:3])
    assert smtp_server.messages == []


def test_a_refused_connection_is_a_temporary_error(refusing_port: int) -> None:
    with transport(port=refusing_port) as smtp, pytest.raises(DeliveryError) as caught:
        send(smtp)
    assert caught.value.permanent is False
    assert f"127.0.0.1:{refusing_port}" in str(caught.value)
    assert "refused" in str(caught.value).lower()


def test_a_connection_dropped_during_data_is_a_temporary_error(
    smtp_server: SmtpTestServer,
) -> None:
    smtp_server.drop_connection_during_data()
    with transport(smtp_server) as smtp, pytest.raises(DeliveryError) as caught:
        send(smtp)
    assert caught.value.permanent is False
    assert "closed the connection" in str(caught.value)


def test_a_server_slower_than_the_timeout_is_a_temporary_error_after_about_the_timeout(
    smtp_server: SmtpTestServer,
) -> None:
    smtp_server.delay_data(4)
    started = time.monotonic()
    with transport(smtp_server, timeout=1) as smtp, pytest.raises(DeliveryError) as caught:
        send(smtp)
    assert time.monotonic() - started < 2.5
    assert caught.value.permanent is False
    assert "did not answer within 1s" in str(caught.value)


def test_an_address_that_is_not_ascii_is_delivered_with_smtputf8(
    smtp_server: SmtpTestServer,
) -> None:
    recipients = ["jürgen@bücher.example", OPS]
    with transport(smtp_server) as smtp:
        assert send(smtp, recipients) == {}
    [received] = smtp_server.received
    # The domain goes IDNA-encoded; only the local part needs SMTPUTF8.
    assert received.rcpt_tos == ("jürgen@xn--bcher-kva.example", OPS)
    assert str(received.message["To"]) == "jürgen@xn--bcher-kva.example, ops@acme.example"


def test_a_domain_that_is_not_ascii_needs_no_smtputf8() -> None:
    with SmtpCapture(enable_SMTPUTF8=False) as server:
        with transport(host=server.host, port=server.port) as smtp:
            assert send(smtp, ["admin@bücher.de", OPS]) == {}
        [received] = server.received
    assert received.rcpt_tos == ("admin@xn--bcher-kva.de", OPS)
    assert str(received.message["To"]) == "admin@xn--bcher-kva.de, ops@acme.example"


def test_a_helo_only_server_cannot_take_an_address_that_is_not_ascii_either() -> None:
    # A server from before ESMTP refuses EHLO; smtplib then sends no options at all, so the
    # SMTPUTF8 check must not rely on it.
    listener = socket.create_server(("127.0.0.1", 0))
    commands: list[bytes] = []

    def serve() -> None:
        connection, _ = listener.accept()
        with connection, connection.makefile("rb") as lines:
            connection.sendall(b"220 old.example SMTP\r\n")
            for line in lines:
                commands.append(line.split()[0].upper())
                if commands[-1] == b"EHLO":
                    connection.sendall(b"502 5.5.1 command not recognized\r\n")
                elif commands[-1] == b"QUIT":
                    connection.sendall(b"221 bye\r\n")
                    return
                else:
                    connection.sendall(b"250 ok\r\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with pytest.raises(DeliveryError) as caught:
            with transport(port=listener.getsockname()[1]) as smtp:
                send(smtp, ["jürgen@bücher.example"])
    finally:
        server.join(timeout=5)
        listener.close()
    # That recipient's own permanent outcome, refused without asking the server.
    assert "SMTPUTF8" in str(caught.value) and caught.value.permanent is True
    assert list(caught.value.refused) == ["jürgen@bücher.example"]
    assert commands[:2] == [b"EHLO", b"HELO"] and b"RCPT" not in commands


def test_a_server_without_smtputf8_cannot_take_a_local_part_that_is_not_ascii() -> None:
    with SmtpCapture(enable_SMTPUTF8=False) as server, pytest.raises(DeliveryError) as caught:
        with transport(host=server.host, port=server.port) as smtp:
            send(smtp, ["jürgen@bücher.example"])
    assert "SMTPUTF8" in str(caught.value)
    assert caught.value.permanent is True
    assert caught.value.refused["jürgen@bücher.example"][0] == 553
    assert server.received == []


NAME_NOT_ASCII = "Jörg Müller Übersetzungen — 低信用额度"


class MailOptionsHandler(CaptureHandler):
    """Also keeps the parameters of each MAIL FROM (BODY=8BITMIME, SMTPUTF8)."""

    def __init__(self) -> None:
        super().__init__()
        self.mail_options: list[list[str]] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.mail_options.append(list(options))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"


def test_a_server_without_8bitmime_receives_a_7_bit_message_that_reads_as_rendered() -> None:
    content = alert(org_name=NAME_NOT_ASCII)
    rendered = render_email(content)
    handler = MailOptionsHandler()
    # aiosmtpd offers 8BITMIME unless it decodes the data itself; then it refuses BODY=8BITMIME.
    with SmtpCapture(handler, decode_data=True) as server:
        with transport(host=server.host, port=server.port) as smtp:
            assert smtp.send(message_for(content, [OPS]), [OPS]) == {}
        [received] = server.received
    [options] = handler.mail_options
    assert not [option for option in options if option.upper().startswith("BODY")]
    check_wire(received.raw, seven_bit=True)
    message = received.message
    assert message["Subject"] == rendered.subject and NAME_NOT_ASCII in message["Subject"]
    plain = message.get_body(("plain",))
    assert plain["Content-Transfer-Encoding"] in ("base64", "quoted-printable")
    assert plain.get_content() == rendered.text
    assert message.get_body(("html",)).get_content() == rendered.html


def test_a_server_with_8bitmime_may_get_8_bit_text_announced_with_body_8bitmime() -> None:
    rendered = RenderedEmail(subject="Grüße", text="Grüße aus Köln\n", html="<p>Grüße</p>\n")
    handler = MailOptionsHandler()
    with SmtpCapture(handler) as server:
        with transport(host=server.host, port=server.port) as smtp:
            assert smtp.send(hand_built(rendered), [OPS]) == {}
        [received] = server.received
    [options] = handler.mail_options
    assert "BODY=8BITMIME" in options
    assert "Grüße aus Köln".encode() in received.raw
    assert received.message.get_body(("plain",)).get_content() == rendered.text


def test_a_long_subject_that_is_not_ascii_arrives_in_encoded_words_of_at_most_75(
    smtp_server: SmtpTestServer,
) -> None:
    content = alert(org_name=(NAME_NOT_ASCII + " ") * 3)
    rendered = render_email(content)
    with transport(smtp_server) as smtp:
        smtp.send(message_for(content, [OPS]), [OPS])
    [received] = smtp_server.received
    head = received.raw.partition(b"\r\n\r\n")[0]
    subject = head[head.index(b"Subject:") : head.index(b"\r\nFrom:")]
    words = ENCODED_WORD.findall(subject)
    assert len(words) >= 4 and all(len(word) <= 75 for word in words)
    assert all(len(line) <= 78 for line in subject.split(b"\r\n"))
    assert received.message["Subject"] == rendered.subject


def test_one_connection_carries_several_messages(smtp_server: SmtpTestServer) -> None:
    with transport(smtp_server) as smtp:
        send(smtp, [OPS])
        send(smtp, [CTO])
    assert [m.rcpt_tos for m in smtp_server.received] == [(OPS,), (CTO,)]
    assert smtp_server.connections == 1


class NoopCountingHandler(CaptureHandler):
    def __init__(self) -> None:
        super().__init__()
        self.noops = 0

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        self.noops += 1
        return "250 OK"


def test_a_reused_connection_sends_the_next_message_without_a_noop_first() -> None:
    # One round trip fewer per email: a connection found closed at MAIL FROM is replaced then.
    handler = NoopCountingHandler()
    with SmtpCapture(handler) as server:
        with transport(host=server.host, port=server.port) as smtp:
            for _ in range(3):
                send(smtp, [OPS])
        assert (len(server.received), server.connections, handler.noops) == (3, 1, 0)


def test_a_message_lost_during_data_on_a_reused_connection_is_not_sent_again(
    smtp_server: SmtpTestServer,
) -> None:
    # Only a connection found closed at MAIL FROM is retried: during DATA the server may
    # already have the message, and sending it again would be a duplicate.
    with transport(smtp_server) as smtp:
        send(smtp)
        smtp_server.drop_connection_during_data()
        with pytest.raises(DeliveryError, match="closed the connection"):
            send(smtp)
    assert smtp_server.connections == 1
    assert len(smtp_server.received) == 1


def test_a_connection_the_server_closed_between_messages_is_replaced_quietly(
    smtp_server: SmtpTestServer,
) -> None:
    smtp_server.hang_up_after_each_message()
    with transport(smtp_server) as smtp:
        assert send(smtp, [OPS]) == {}
        assert send(smtp, [CTO]) == {}
    assert [m.rcpt_tos for m in smtp_server.received] == [(OPS,), (CTO,)]
    assert smtp_server.connections == 2


def test_a_server_that_announced_closing_with_a_421_is_replaced_without_an_error(
    smtp_server: SmtpTestServer,
) -> None:
    # Postfix writes "421 timeout exceeded" before closing an idle connection: the next MAIL
    # FROM reads it as its answer, but the server has none of that message yet.
    smtp_server.hang_up_after_each_message(announced=True)
    with transport(smtp_server) as smtp:
        assert send(smtp, [OPS]) == {}
        time.sleep(0.1)  # the 421 and the hang-up arrive before the next message
        assert send(smtp, [CTO]) == {}
    assert [m.rcpt_tos for m in smtp_server.received] == [(OPS,), (CTO,)]
    assert smtp_server.connections == 2


def test_after_an_error_the_next_send_reconnects(smtp_server: SmtpTestServer) -> None:
    with transport(smtp_server) as smtp:
        smtp_server.drop_connection_during_data()
        with pytest.raises(DeliveryError):
            send(smtp)
        smtp_server.accept_again()
        assert send(smtp) == {}
    assert len(smtp_server.messages) == 1
    assert smtp_server.connections == 2


def test_starttls_not_offered_is_a_clear_error_and_nothing_is_sent(
    smtp_server: SmtpTestServer,
) -> None:
    smtp = transport(smtp_server, security="starttls", username=TEST_LOGIN, password=TEST_PASSWORD)
    with smtp, pytest.raises(DeliveryError) as caught:
        send(smtp)
    assert "does not offer STARTTLS" in str(caught.value)
    assert caught.value.permanent is False
    assert smtp_server.auth_attempts == []
    assert smtp_server.messages == []


def test_credentials_travel_in_clear_only_when_security_is_none(
    smtp_server: SmtpTestServer,
) -> None:
    smtp = transport(smtp_server, security="none", username=TEST_LOGIN, password=TEST_PASSWORD)
    with smtp:
        send(smtp)
    [attempt] = smtp_server.auth_attempts
    assert (attempt.login, attempt.password, attempt.over_tls) == (
        TEST_LOGIN,
        TEST_PASSWORD,
        False,
    )
    assert len(smtp_server.messages) == 1


def test_a_rejected_login_is_a_temporary_error_that_does_not_reveal_the_password(
    smtp_server: SmtpTestServer,
) -> None:
    wrong = "wrong-password-1234"
    smtp = transport(smtp_server, security="none", username=TEST_LOGIN, password=wrong)
    with smtp, pytest.raises(DeliveryError) as caught:
        send(smtp)
    assert "535" in str(caught.value)
    assert caught.value.permanent is False
    assert wrong not in str(caught.value) and wrong not in repr(smtp)
    assert smtp_server.messages == []


def test_starttls_checks_the_server_certificate(smtp_starttls_server: SmtpTestServer) -> None:
    smtp = transport(
        smtp_starttls_server,
        host="localhost",
        security="starttls",
        username=TEST_LOGIN,
        password=TEST_PASSWORD,
    )
    with smtp, pytest.raises(DeliveryError) as caught:
        send(smtp)
    assert "certificate verify failed" in str(caught.value)
    assert smtp_starttls_server.auth_attempts == []
    assert smtp_starttls_server.messages == []


@pytest.mark.usefixtures("trust_test_certificate")
def test_starttls_logs_in_over_tls_and_delivers(smtp_starttls_server: SmtpTestServer) -> None:
    smtp = transport(
        smtp_starttls_server,
        host="localhost",
        security="starttls",
        username=TEST_LOGIN,
        password=TEST_PASSWORD,
    )
    with smtp:
        assert send(smtp) == {}
    assert [attempt.over_tls for attempt in smtp_starttls_server.auth_attempts] == [True]
    assert len(smtp_starttls_server.messages) == 1


@pytest.mark.usefixtures("trust_test_certificate")
def test_ssl_mode_delivers_over_implicit_tls(smtps_server: SmtpTestServer) -> None:
    smtp = transport(
        smtps_server, host="localhost", security="ssl", username=TEST_LOGIN, password=TEST_PASSWORD
    )
    with smtp:
        assert send(smtp) == {}
    assert [attempt.over_tls for attempt in smtps_server.auth_attempts] == [True]
    assert len(smtps_server.messages) == 1


def test_the_capture_server_describes_a_message_for_a_terminal(
    smtp_server: SmtpTestServer,
) -> None:
    with transport(smtp_server) as smtp:
        send(smtp)
    text = describe(smtp_server.received[0])
    assert text.startswith(f"Envelope: alerts@poller.example.com -> {OPS}, {CTO}\n")
    assert "Subject: Low credits: Acme Voice has 412.50 credits left" in text
    assert "Add credits:\n  https://dashboard.cekura.ai/settings/org/billing" in text


def test_an_unknown_security_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="security"):
        transport(security="tls")

"""The words of an email: AlertContent in, subject, plain text and HTML out (Jinja templates).

Pure: plain values in, strings out. The templates ship inside this package (``templates/``).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from functools import lru_cache
from typing import Any

import jinja2

from poller.engine.addresses import checked_billing_url
from poller.engine.forecast import BEYOND_HORIZON, HORIZON_DAYS
from poller.engine.model import BIDI_CONTROLS, NotificationKind

SUBJECT_TEMPLATE = "low_credits_subject.txt.j2"
TEXT_TEMPLATE = "low_credits.txt.j2"
HTML_TEMPLATE = "low_credits.html.j2"
# Notification kind -> (subject, text, html) templates; a reminder is the low-credits email
# marked as a reminder.
TEMPLATE_SETS = {
    NotificationKind.LOW_CREDITS: (SUBJECT_TEMPLATE, TEXT_TEMPLATE, HTML_TEMPLATE),
    NotificationKind.REMINDER: (SUBJECT_TEMPLATE, TEXT_TEMPLATE, HTML_TEMPLATE),
    NotificationKind.RUNWAY: ("runway_subject.txt.j2", "runway.txt.j2", "runway.html.j2"),
    NotificationKind.RECOVERY: ("recovery_subject.txt.j2", "recovery.txt.j2", "recovery.html.j2"),
}

# Long names must not push the balance and threshold out of the visible part of a subject line.
SUBJECT_ORG_NAME_MAX = 60
SUBJECT_MAX = 200

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
# Bidirectional overrides can make a name display as something else (a spoofing trick).
_BIDI_CONTROLS = dict.fromkeys(BIDI_CONTROLS)


@dataclass(frozen=True)
class AlertContent:
    """Everything the email says, as plain values."""

    org_id: int
    org_name: str
    breach_number: int
    balance: Decimal
    threshold: Decimal
    detected_at: datetime  # timezone-aware
    billing_url: str
    auto_refill: bool
    kind: NotificationKind = NotificationKind.LOW_CREDITS
    # The forecast when the notice was detected; both None when there is no meaningful one.
    burn_per_day: Decimal | None = None
    runs_out_at: datetime | None = None  # None with a burn rate: beyond the forecast horizon

    @property
    def reminder(self) -> bool:
        return self.kind == NotificationKind.REMINDER


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def format_amount(amount: Decimal) -> str:
    """Exactly ``amount``: thousands separators, every decimal it has and at least two.

    ``1234.5`` → ``"1,234.50"``, ``999.999`` → ``"999.999"``: an email or a status line must
    never round away a difference the alert rule saw. Zero is never ``"-0.00"``.
    """
    if not isinstance(amount, Decimal):
        # A float here would already have lost cents; refuse it instead of printing it.
        raise TypeError(f"credit amounts must be Decimal, not {type(amount).__name__}")
    if not amount.is_finite():
        raise ValueError(f"cannot format a non-finite credit amount: {amount}")
    if not amount:
        amount = amount.copy_abs()
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    places = max(2, -exponent)
    return format(amount, f",.{places}f")


def format_credits(amount: Decimal) -> str:
    """``Decimal("1234.5")`` → ``"1,234.50 credits"`` (see ``format_amount``)."""
    return f"{format_amount(amount)} credits"


def format_rate(rate: Decimal) -> str:
    """A computed rate (credits per day), rounded to the cent: ``"2,400.00 credits"``."""
    return format_credits(rate.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))


def format_detected_at(moment: datetime) -> str:
    """``"1 May 2024, 14:03 UTC"``; spelled out so no reader mixes up day and month."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("detected_at must be timezone-aware")
    utc = moment.astimezone(UTC)
    return f"{utc.day} {_MONTHS[utc.month - 1]} {utc.year}, {utc:%H:%M} UTC"


def one_line(text: str) -> str:
    """Control characters and line breaks become spaces; runs of whitespace collapse."""
    if text.isascii() and text.isprintable():
        # Nothing to replace (the common case, several times per email): only collapse.
        return " ".join(text.split())
    cleaned = []
    for char in text.translate(_BIDI_CONTROLS):
        category = unicodedata.category(char)
        cleaned.append(" " if category in ("Cc", "Zl", "Zp") else char)
    return " ".join("".join(cleaned).split())


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def render_subject(content: AlertContent) -> str:
    """One header-safe line: no CR/LF or control characters, at most SUBJECT_MAX characters."""
    return _render_subject(content, _template_context(content))


def _render_subject(content: AlertContent, context: dict[str, Any]) -> str:
    context = {**context, "org_name": shorten(context["org_name"], SUBJECT_ORG_NAME_MAX)}
    subject_template = _templates(content)[0]
    subject = template_environment().get_template(subject_template).render(context)
    return shorten(one_line(subject), SUBJECT_MAX)


def render_email(content: AlertContent) -> RenderedEmail:
    context = _template_context(content)
    environment = template_environment()
    _, text_template, html_template = _templates(content)
    return RenderedEmail(
        subject=_render_subject(content, context),
        text=environment.get_template(text_template).render(context),
        html=environment.get_template(html_template).render(context),
    )


def _templates(content: AlertContent) -> tuple[str, str, str]:
    try:
        return TEMPLATE_SETS[content.kind]
    except KeyError:
        raise ValueError(f"no email template for notification kind {content.kind!r}") from None


def format_runway(days: Decimal) -> str:
    """``"in about 3 days"``; under a day is said as such, not rounded to zero days."""
    if days < 1:
        return "in less than a day"
    if days > HORIZON_DAYS:
        return f"in {BEYOND_HORIZON}"
    whole = int(days.to_integral_value(rounding=ROUND_HALF_EVEN))
    return f"in about {whole} day{'s' if whole != 1 else ''}"


def runway_phrase(content: AlertContent) -> str | None:
    """``"in about 3 days"`` from detection to the estimated run-out, if there is an estimate."""
    if content.burn_per_day is None:
        return None
    if content.runs_out_at is None:
        return f"in {BEYOND_HORIZON}"
    days = Decimal((content.runs_out_at - content.detected_at).total_seconds()) / 86400
    return format_runway(days)


def forecast_line(content: AlertContent) -> str | None:
    """The one sentence about when the credits run out, or None without a meaningful estimate."""
    phrase = runway_phrase(content)
    if phrase is None or content.burn_per_day is None:
        return None
    usage = f"At your recent usage (\u2248 {format_rate(content.burn_per_day)}/day)"
    if content.runs_out_at is None:
        return f"{usage} your credits will last {BEYOND_HORIZON}."
    utc = content.runs_out_at.astimezone(UTC)
    return (
        f"{usage} you will run out around {utc.day} {_MONTHS[utc.month - 1]} {utc.year} ({phrase})."
    )


def _template_context(content: AlertContent) -> dict[str, Any]:
    return {
        "org_id": content.org_id,
        "org_name": one_line(content.org_name) or f"Organization {content.org_id}",
        "breach_number": content.breach_number,
        "balance": format_credits(content.balance),
        "threshold": format_credits(content.threshold),
        "detected_at": format_detected_at(content.detected_at),
        "billing_url": _billing_url(content.billing_url),
        "auto_refill": content.auto_refill,
        "reminder": content.reminder,
        "forecast_line": forecast_line(content),
        "runway": runway_phrase(content),
    }


def _billing_url(url: str) -> str:
    try:
        return checked_billing_url(url)
    except ValueError as problem:
        raise ValueError(f"billing_url: {problem}") from None


@lru_cache(maxsize=1)
def template_environment() -> jinja2.Environment:
    """The Jinja2 environment for the email templates: strict about undefined variables."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("poller.mail", "templates"),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html.j2",), default_for_string=False, default=False
        ),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        # The templates ship with poller and do not change under a running process; checking
        # their modification time would cost three stat() calls per email.
        auto_reload=False,
    )

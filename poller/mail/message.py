"""The low-credits email: rendering it from templates and handing it to an SMTP server.

Rendering is pure (plain values in, strings out). ``SmtpTransport`` is the only part that does
I/O; it turns every way a send can go wrong into ``DeliveryError(permanent=...)`` so the caller
only has to decide between "retry later" and "give up".
"""

from __future__ import annotations

import binascii
import contextlib
import email.policy
import re
import secrets
import smtplib
import socket
import ssl
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from email.utils import format_datetime, quote
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
import structlog

from poller.cli.terminal import BIDI_CONTROLS
from poller.config.settings import Secret
from poller.engine.addresses import (
    InvalidAddress,
    checked_billing_url,
    checked_sender,
    needs_smtputf8,
    smtp_address,
)
from poller.engine.forecast import BEYOND_HORIZON, HORIZON_DAYS

log = structlog.get_logger(__name__)

SUBJECT_TEMPLATE = "low_credits_subject.txt.j2"
TEXT_TEMPLATE = "low_credits.txt.j2"
HTML_TEMPLATE = "low_credits.html.j2"
# Notification kind -> (subject, text, html) templates; a reminder is the low-credits email
# marked as a reminder.
TEMPLATE_SETS = {
    "low_credits": (SUBJECT_TEMPLATE, TEXT_TEMPLATE, HTML_TEMPLATE),
    "reminder": (SUBJECT_TEMPLATE, TEXT_TEMPLATE, HTML_TEMPLATE),
    "runway": ("runway_subject.txt.j2", "runway.txt.j2", "runway.html.j2"),
    "recovery": ("recovery_subject.txt.j2", "recovery.txt.j2", "recovery.html.j2"),
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
# SMTP line endings. Lines up to RFC 5322's hard limit of 998: with the default 78, Python folds a
# 70-odd character Subject as "Subject:" + newline + value, which parsers (Python's included)
# read back with a leading space.
_MESSAGE_POLICY = email.policy.SMTP.clone(max_line_length=998)
_MESSAGE_ID_KIND = re.compile(r"[a-z0-9][a-z0-9-]*")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


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
    kind: str = "low_credits"  # a key of TEMPLATE_SETS
    # The forecast when the notice was detected; both None when there is no meaningful one.
    burn_per_day: Decimal | None = None
    runs_out_at: datetime | None = None  # None with a burn rate: beyond the forecast horizon

    @property
    def reminder(self) -> bool:
        return self.kind == "reminder"


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def templates_dir() -> Path:
    """The directory holding the email templates, in a checkout or in an installed wheel."""
    return find_templates_dir(Path(__file__).resolve().parent)


def find_templates_dir(package_dir: Path) -> Path:
    # A wheel installs them as the package poller/templates (setup.cfg package_dir); in a
    # checkout they sit at the top of the repository, beside the poller/ package.
    for candidate in (package_dir / "templates", package_dir.parent / "templates"):
        if (candidate / TEXT_TEMPLATE).is_file():
            return candidate
    raise FileNotFoundError(
        f"email templates not found in {package_dir / 'templates'} "
        f"or {package_dir.parent / 'templates'}; the poller installation is incomplete"
    )


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
    places = max(2, -amount.as_tuple().exponent)  # finite: an int exponent
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
        loader=jinja2.FileSystemLoader(templates_dir()),
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


def message_id_for(
    org_id: int,
    breach_number: int,
    mail_from: str,
    *,
    detected_at: datetime,
    kind: str = "low-credits",
) -> str:
    """The same breach always gets the same Message-ID, so a resend can be recognised.

    The detection time is part of it because breach numbers start again at 1 when the
    database is replaced: without it a new alert could carry an old alert's Message-ID, and
    mail services (Gmail) silently drop a message whose ID they have already seen.
    """
    if not _MESSAGE_ID_KIND.fullmatch(kind):
        raise ValueError(f"message kind must be lowercase letters, digits and '-', got {kind!r}")
    stamp = detected_at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"<{kind}.{int(org_id)}.{int(breach_number)}.{stamp}@{_message_id_domain(mail_from)}>"


@lru_cache(maxsize=8)
def _message_id_domain(mail_from: str) -> str:
    # The same sender for every email of a run: parsed once.
    try:
        domain = checked_sender(mail_from)[1].rpartition("@")[2]
    except InvalidAddress:
        domain = ""
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        domain = ""
    if not _DOMAIN.fullmatch(domain):
        domain = "poller.invalid"
    return domain.lower()


@dataclass(frozen=True)
class OutgoingMessage:
    """A message exactly as it goes over SMTP: CRLF line endings, no line over 998 bytes."""

    envelope_from: str  # the address part of the From header, for MAIL FROM
    data: bytes


def build_message(
    rendered: RenderedEmail,
    *,
    mail_from: str,
    recipients: Sequence[str],
    message_id: str,
    date: datetime,
) -> OutgoingMessage:
    """A multipart/alternative message (text first, HTML preferred) addressed to recipients.

    Written out directly instead of through ``email.message.EmailMessage``, which parses
    every header it is given back through its header registry: about 2.5 ms of CPU per
    email, more than everything else delivery does. The structure is the one EmailMessage
    produces (tests parse the result with the ``email`` package and compare).
    """
    if not recipients:
        raise ValueError("an email needs at least one recipient")
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("the Date of an email must be timezone-aware")
    if one_line(message_id) != message_id or not message_id.isascii():
        raise ValueError(f"not a Message-ID: {message_id!r}")
    from_header, envelope_from = _from_header(mail_from)
    text = _text_part("plain", rendered.text)
    html = _text_part("html", rendered.html)
    boundary = _boundary(text, html)
    lines = [
        # The subject is flattened again in case a caller built RenderedEmail by hand: no
        # CR/LF reaches a header, so nothing can add a header of its own.
        _subject_header(one_line(rendered.subject)),
        from_header,
        _to_header([smtp_address(address) for address in recipients]),
        f"Date: {format_datetime(date.astimezone(UTC))}",
        f"Message-ID: {message_id}",
        # RFC 3834: tells autoresponders (vacation replies) not to answer an automatic alert.
        "Auto-Submitted: auto-generated",
        # Exchange ignores Auto-Submitted; this is its equivalent.
        "X-Auto-Response-Suppress: All",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
        "",
    ]
    head = "\r\n".join(lines).encode("utf-8")
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    return OutgoingMessage(
        envelope_from=envelope_from,
        data=b"".join(
            [head, delimiter, text, delimiter, html, f"\r\n--{boundary}--\r\n".encode("ascii")]
        ),
    )


# RFC 5322's hard limit on a line, without its CRLF; RFC 2045's for base64 lines.
MAX_LINE = 998
_BASE64_LINE_BYTES = 57  # 76 characters once encoded
# RFC 2047: an encoded word is at most 75 characters; 45 bytes make 60 characters of base64.
_ENCODED_WORD_BYTES = 45


def _subject_header(subject: str) -> str:
    # Plain ASCII goes as it is; anything else (or text that a reader would mistake for an
    # encoded word) goes as encoded words, so every reader shows exactly the rendered text.
    if subject.isascii() and "=?" not in subject and len(subject) <= MAX_LINE - 9:
        return f"Subject: {subject}"
    return "Subject: " + "\r\n ".join(_encoded_words(subject))


def _encoded_words(text: str) -> Iterator[str]:
    """RFC 2047 base64 words, each holding whole characters; readers join them back."""
    chunk = bytearray()
    for char in text:
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > _ENCODED_WORD_BYTES:
            yield _encoded_word(bytes(chunk))
            chunk.clear()
        chunk += encoded
    if chunk:
        yield _encoded_word(bytes(chunk))


def _encoded_word(data: bytes) -> str:
    return f"=?utf-8?b?{binascii.b2a_base64(data, newline=False).decode('ascii')}?="


@lru_cache(maxsize=8)
def _from_header(mail_from: str) -> tuple[str, str]:
    """The From header and the envelope sender; the same for every email, so built once.

    A display name may need quoting or encoding: the ``email`` package does that here.
    """
    try:
        name, address = checked_sender(mail_from)
    except InvalidAddress as problem:
        raise InvalidAddress(f"mail_from: {problem}") from None
    address = smtp_address(address)
    value = f'"{quote(name)}" <{address}>' if name else address
    policy = _MESSAGE_POLICY if address.isascii() else _MESSAGE_POLICY.clone(utf8=True)
    folded = policy.header_factory("From", value).fold(policy=policy)
    return folded.rstrip("\r\n"), address


def _to_header(addresses: list[str]) -> str:
    # A local part that is not ASCII goes as it is (RFC 6532): the transport then asks the
    # server for SMTPUTF8, as smtplib does for such addresses.
    one = "To: " + ", ".join(addresses)
    if len(one.encode("utf-8")) <= MAX_LINE:
        return one
    return "To: " + ",\r\n ".join(addresses)


def _text_part(subtype: str, text: str) -> bytes:
    """One text part: 7bit or 8bit when every line fits, base64 otherwise.

    The choice EmailMessage.set_content makes under the SMTP policy, except that base64
    lines keep to RFC 2045's 76 characters.
    """
    lines = text.encode("utf-8").splitlines()
    body = b"\r\n".join(lines) + b"\r\n"
    if max(map(len, lines), default=0) <= MAX_LINE:
        encoding = "7bit" if body.isascii() else "8bit"
    else:
        encoding = "base64"
        body = b"".join(
            binascii.b2a_base64(body[start : start + _BASE64_LINE_BYTES]).replace(b"\n", b"\r\n")
            for start in range(0, len(body), _BASE64_LINE_BYTES)
        )
    header = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    )
    return header.encode("ascii") + body


def _boundary(*parts: bytes) -> str:
    while True:
        boundary = f"=_{secrets.token_hex(16)}"
        if not any(boundary.encode("ascii") in part for part in parts):
            return boundary


class DeliveryError(Exception):
    """Sending failed. ``permanent``: retrying the same message to the same recipients
    cannot help.

    The message is the server's own answer where there is one ("550 5.1.1 no such user"),
    otherwise what went wrong with the connection. It never contains the SMTP password.
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        smtp_code: int | None = None,
        refused: dict[str, tuple[int, bytes]] | None = None,
        maybe_delivered: bool = False,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.smtp_code = smtp_code
        # The connection failed before the server's answer to the message arrived: it may have
        # the message already, so the retry may be a duplicate (with the same Message-ID).
        self.maybe_delivered = maybe_delivered
        # Each recipient's answer when the server refused every recipient; empty when the
        # failure is not about the recipients (connection, login, sender, the message itself).
        self.refused = refused or {}


SECURITY_MODES = ("none", "starttls", "ssl")


class SmtpTransport:
    """One SMTP connection reused for a batch of messages; not for use by several threads.

    Use as a context manager. The connection is opened on the first ``send``; after any error it
    is dropped and the next ``send`` opens a new one.

    Only the server refusing the message itself is permanent: a 5xx answer to MAIL FROM or DATA,
    or to RCPT TO for every recipient. Connection, TLS and login problems are temporary, because
    they are fixed on our side or the server's and the alert should go out once they are.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: str,
        username: str | None,
        password: Secret | None,
        timeout: float,
        local_hostname: str | None = None,
    ) -> None:
        if security not in SECURITY_MODES:
            raise ValueError(f"smtp security must be one of {', '.join(SECURITY_MODES)}")
        if (username is None) != (password is None):
            raise ValueError("smtp username and password must be given together")
        self._host = host
        self._port = port
        self._security = security
        self._username = username
        self._password = password
        self._timeout = timeout
        self._local_hostname = local_hostname
        self._connection: smtplib.SMTP | None = None
        # Opened by smtputf8() and not used for a message yet: a failure on it is not an
        # idle connection the server dropped, so it is not worth a second one.
        self._fresh = False

    def __repr__(self) -> str:
        return (
            f"SmtpTransport(host={self._host!r}, port={self._port}, "
            f"security={self._security!r}, username={self._username!r})"
        )

    def __enter__(self) -> SmtpTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.quit()
        except (smtplib.SMTPException, OSError):
            pass  # saying goodbye is a courtesy; the messages are already handed over
        finally:
            connection.close()

    def abort(self) -> None:
        """Break the connection from another thread: a send waiting on the server fails at once
        (its outcome unknown, so its retry may be a duplicate; see DeliveryError)."""
        connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed: nothing to break
                sock.shutdown(socket.SHUT_RDWR)

    def send(
        self, message: OutgoingMessage, recipients: Sequence[str]
    ) -> dict[str, tuple[int, bytes]]:
        """Hand the message over for ``recipients``; returns the refused ones (if some were).

        Addresses are given and returned as stored; on the wire their domains are
        IDNA-encoded. A recipient whose local part is not ASCII is refused here (553) when the
        server does not offer SMTPUTF8. Raises DeliveryError when nobody accepted the message.
        """
        if not recipients:
            raise ValueError("send needs at least one recipient")
        # Raises InvalidAddress (a ValueError) for an address no message can be built for.
        wire = {smtp_address(address): address for address in recipients}
        with self._smtp_errors(wire):
            refused = self._transfer(message, wire)
        return {wire.get(address, address): answer for address, answer in refused.items()}

    def smtputf8(self) -> bool:
        """Whether the server takes local parts that are not ASCII (connects if need be)."""
        with self._smtp_errors():
            if self._connection is None:
                self._connection = self._connect()
                self._fresh = True
            return self._connection.has_extn("smtputf8")

    @contextmanager
    def _smtp_errors(self, wire: dict[str, str] | None = None) -> Iterator[None]:
        """Every way a send can go wrong, as a DeliveryError; the connection is dropped."""
        try:
            yield
        except DeliveryError:
            self._discard()
            raise
        except smtplib.SMTPRecipientsRefused as error:
            self._discard()
            refused = {
                (wire or {}).get(address, address): answer
                for address, answer in error.recipients.items()
            }
            raise self._all_recipients_refused(refused) from error
        except smtplib.SMTPSenderRefused as error:
            self._discard()
            # Refusing the sender (an unverified address, a policy) is not about this
            # message's recipients: every message would get the same answer until it is fixed.
            raise self._error(
                f"SMTP server {self._address} refused the sender {error.sender!r}: "
                f"{reply_text(error.smtp_code, error.smtp_error)}",
                permanent=False,
                smtp_code=error.smtp_code,
            ) from error
        except smtplib.SMTPDataError as error:
            self._discard()
            # The server judged this message: a 5xx means it will never take it as it is.
            raise self._error(
                reply_text(error.smtp_code, error.smtp_error),
                permanent=is_permanent(error.smtp_code),
                smtp_code=error.smtp_code,
            ) from error
        except smtplib.SMTPResponseException as error:
            self._discard()
            raise self._error(
                f"SMTP server {self._address} answered "
                f"{reply_text(error.smtp_code, error.smtp_error)}",
                permanent=False,
                smtp_code=error.smtp_code,
            ) from error
        except smtplib.SMTPServerDisconnected as error:
            self._discard()
            if any(isinstance(link, TimeoutError) for link in _causes(error)):
                # smtplib reports a read timeout as a disconnect; say what really happened.
                raise self._timed_out() from error
            raise self._error(
                f"SMTP server {self._address} closed the connection ({error}); "
                "the message may or may not have been delivered",
                permanent=False,
                maybe_delivered=True,
            ) from error
        except smtplib.SMTPException as error:
            self._discard()
            raise self._error(
                f"SMTP error with {self._address}: {error}", permanent=False
            ) from error
        except ssl.SSLError as error:
            self._discard()
            raise self._error(
                f"TLS with SMTP server {self._address} failed: {error}", permanent=False
            ) from error
        except TimeoutError as error:
            self._discard()
            raise self._timed_out() from error
        except OSError as error:
            self._discard()
            raise self._error(
                f"cannot talk to SMTP server {self._address}: {error}", permanent=False
            ) from error

    @property
    def _address(self) -> str:
        return f"{self._host}:{self._port}"

    def _transfer(
        self, message: OutgoingMessage, wire: dict[str, str]
    ) -> dict[str, tuple[int, bytes]]:
        reused = self._connection is not None and not self._fresh
        if self._connection is None:
            self._connection = self._connect()
        self._fresh = False
        try:
            return _sendmail(self._connection, message, list(wire))
        except _ClosedBeforeMail:
            if not reused:
                raise
        except smtplib.SMTPSenderRefused as error:
            # 421 to MAIL FROM: the server is closing the channel (an idle timeout it
            # announces instead of just hanging up); it has none of this message either.
            if not reused or error.smtp_code != 421:
                raise
        # The server dropped the connection since the last message (an idle timeout, one
        # message per connection): it has none of this message, so a new connection is
        # safe. Finding that out here instead of with a NOOP first saves a round trip per email.
        self._discard()
        self._connection = self._connect()
        return _sendmail(self._connection, message, list(wire))

    def _connect(self) -> smtplib.SMTP:
        connection: smtplib.SMTP
        if self._security == "ssl":
            connection = _SMTP_SSL(
                self._host,
                self._port,
                local_hostname=self._local_hostname,
                timeout=self._timeout,
                context=ssl.create_default_context(),
            )
        else:
            connection = _SMTP(
                self._host, self._port, local_hostname=self._local_hostname, timeout=self._timeout
            )
        try:
            connection.ehlo_or_helo_if_needed()
            if self._security == "starttls":
                if not connection.has_extn("starttls"):
                    raise DeliveryError(
                        f"SMTP server {self._address} does not offer STARTTLS and smtp security "
                        "is 'starttls'; not sending anything unencrypted",
                        permanent=False,
                    )
                connection.starttls(context=ssl.create_default_context())
                connection.ehlo()
            if self._username is not None and self._password is not None:
                self._login(connection, self._username, self._password)
        except BaseException:
            connection.close()
            raise
        log.debug("smtp.connected", host=self._host, port=self._port, security=self._security)
        return connection

    def _login(self, connection: smtplib.SMTP, username: str, password: Secret) -> None:
        # Belt and braces: whatever happened above, credentials only travel in clear when the
        # operator explicitly chose security "none".
        if self._security != "none" and not isinstance(connection.sock, ssl.SSLSocket):
            raise DeliveryError(
                f"refusing to log in to SMTP server {self._address} without TLS",
                permanent=False,
            )
        if not connection.has_extn("auth"):
            raise DeliveryError(
                f"SMTP server {self._address} does not offer AUTH, but an SMTP username is set",
                permanent=False,
            )
        connection.login(username, password.reveal())

    def _all_recipients_refused(self, refused: dict[str, tuple[int, bytes]]) -> DeliveryError:
        answers = "; ".join(
            f"{address}: {reply_text(code, text)}" for address, (code, text) in refused.items()
        )
        codes = [code for code, _ in refused.values()]
        # If any refusal is temporary, a retry may still reach that recipient.
        temporary = [code for code in codes if not is_permanent(code)]
        return DeliveryError(
            self._redacted(f"all recipients refused: {answers}"),
            permanent=not temporary,
            smtp_code=(temporary or codes or [None])[0],
            refused=refused,
        )

    def _timed_out(self) -> DeliveryError:
        return self._error(
            f"SMTP server {self._address} did not answer within {self._timeout:g}s; "
            "the message may or may not have been delivered",
            permanent=False,
            maybe_delivered=True,
        )

    def _error(
        self,
        message: str,
        *,
        permanent: bool,
        smtp_code: int | None = None,
        maybe_delivered: bool = False,
    ) -> DeliveryError:
        return DeliveryError(
            self._redacted(message),
            permanent=permanent,
            smtp_code=smtp_code,
            maybe_delivered=maybe_delivered,
        )

    def _redacted(self, text: str) -> str:
        # Servers are not supposed to echo credentials back, but an error message is logged.
        if self._password is not None and self._password.reveal():
            text = text.replace(self._password.reveal(), "***")
        return text

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _sendmail(
    connection: smtplib.SMTP, message: OutgoingMessage, recipients: list[str]
) -> dict[str, tuple[int, bytes]]:
    """sendmail, after refusing here the recipients a server without SMTPUTF8 cannot take."""
    refused: dict[str, tuple[int, bytes]] = {}
    if not connection.has_extn("smtputf8"):
        # Checked here, not left to sendmail: on a HELO-only server it would drop the options
        # and fail encoding the address instead, for every recipient at once.
        if needs_smtputf8(message.envelope_from):
            raise smtplib.SMTPNotSupportedError(
                f"the sender {message.envelope_from!r} is not ASCII and the server does not "
                "offer SMTPUTF8"
            )
        refused = {address: NO_SMTPUTF8 for address in recipients if needs_smtputf8(address)}
        recipients = [address for address in recipients if address not in refused]
        if not recipients:
            raise smtplib.SMTPRecipientsRefused(refused)
    # As smtplib.send_message does: a local part that is not ASCII needs SMTPUTF8.
    utf8 = any(map(needs_smtputf8, [message.envelope_from, *recipients]))
    options = ["SMTPUTF8", "BODY=8BITMIME"] if utf8 else []
    accepted_refused = connection.sendmail(
        message.envelope_from, recipients, message.data, mail_options=options
    )
    return {**refused, **accepted_refused}


# A permanent answer of our own (RFC 6531's code) for a recipient the server cannot address.
NO_SMTPUTF8 = (
    553,
    b"5.6.7 not sent: the local part is not ASCII and the server does not offer SMTPUTF8",
)


class _ClosedBeforeMail(smtplib.SMTPServerDisconnected):
    """The connection was gone when MAIL FROM was sent: the server has none of the message."""


class _DetectsClosedBeforeMail:
    """Tells a dead connection at MAIL FROM (nothing sent yet) from one lost later (maybe
    delivered): only the first may be retried on a new connection without a duplicate."""

    def mail(self, sender: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        try:
            return super().mail(sender, options)  # type: ignore[misc]
        except smtplib.SMTPServerDisconnected as error:
            raise _ClosedBeforeMail(str(error)) from error


class _SMTP(_DetectsClosedBeforeMail, smtplib.SMTP):
    pass


class _SMTP_SSL(_DetectsClosedBeforeMail, smtplib.SMTP_SSL):  # noqa: N801
    pass


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The exception and what led to it (_ClosedBeforeMail wraps smtplib's own)."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def is_permanent(code: int) -> bool:
    return 500 <= code <= 599


def reply_text(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return f"{code} {one_line(text)}"

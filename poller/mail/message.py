"""The email as a MIME message: headers and a text + HTML multipart/alternative body.

Built with the standard library's ``email`` package (``EmailMessage``, ``email.policy.SMTP``),
which chooses the transfer encodings and folds the headers.
"""

from __future__ import annotations

import email.policy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header, decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.policy import Policy
from functools import lru_cache

from poller.engine.addresses import InvalidAddress, checked_sender, needs_smtputf8, smtp_address
from poller.mail.render import RenderedEmail, one_line

# Lines of at most 76 characters: RFC 2045's limit for quoted-printable and base64 lines, and
# one that keeps every encoded word within RFC 2047's 75 (at 78, Python writes 77).
_POLICY = email.policy.SMTP.clone(max_line_length=76)
# For a message with an address that is not ASCII: UTF-8 headers, sent with SMTPUTF8.
_UTF8_POLICY = _POLICY.clone(utf8=True)
_MESSAGE_ID_KIND = re.compile(r"[a-z0-9][a-z0-9-]*")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


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
    """A message ready to send, and the sender address for MAIL FROM."""

    envelope_from: str
    message: EmailMessage
    # An address in it has a local part that is not ASCII: only a server offering SMTPUTF8
    # can take it, and its headers are written in UTF-8 (RFC 6532).
    international: bool

    def data(self, *, eight_bit: bool) -> bytes:
        """The message as it goes over SMTP (CRLF line endings).

        Without ``eight_bit`` (the server did not offer 8BITMIME) every byte is 7-bit: parts
        that were 8bit go as base64 (RFC 6152).
        """
        policy = self.message.policy
        if not eight_bit and not self.international:
            policy = policy.clone(cte_type="7bit")
        return self.message.as_bytes(policy=policy)


def build_message(
    rendered: RenderedEmail,
    *,
    mail_from: str,
    recipients: Sequence[str],
    message_id: str,
    date: datetime,
) -> OutgoingMessage:
    """A multipart/alternative message (text first, HTML preferred) addressed to recipients."""
    if not recipients:
        raise ValueError("an email needs at least one recipient")
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("the Date of an email must be timezone-aware")
    if one_line(message_id) != message_id or not message_id.isascii():
        raise ValueError(f"not a Message-ID: {message_id!r}")
    name, envelope_from = _sender(mail_from)
    to = [smtp_address(address) for address in recipients]
    international = any(map(needs_smtputf8, [envelope_from, *to]))
    policy = _UTF8_POLICY if international else _POLICY
    message = EmailMessage(policy)
    # The subject is flattened again in case a caller built RenderedEmail by hand: no CR/LF
    # reaches a header, so nothing can add a header of its own.
    message["Subject"] = _Subject(one_line(rendered.subject))
    message["From"] = _address(envelope_from, name)
    message["To"] = [_address(address) for address in to]
    message["Date"] = date.astimezone(UTC)
    message["Message-ID"] = message_id
    # RFC 3834: tells autoresponders (vacation replies) not to answer an automatic alert.
    message["Auto-Submitted"] = "auto-generated"
    # Exchange ignores Auto-Submitted; this is its equivalent.
    message["X-Auto-Response-Suppress"] = "All"
    message["MIME-Version"] = "1.0"
    message.make_alternative()
    for subtype, body in (("plain", rendered.text), ("html", rendered.html)):
        part = MIMEPart(policy)
        part.set_content(body, subtype=subtype)
        message.attach(part)  # type: ignore[arg-type]  # typeshed: only EmailMessage
    return OutgoingMessage(
        envelope_from=envelope_from, message=message, international=international
    )


@lru_cache(maxsize=8)
def _sender(mail_from: str) -> tuple[str, str]:
    """The display name and the envelope address; the same for every email, so parsed once."""
    try:
        name, address = checked_sender(mail_from)
    except InvalidAddress as problem:
        raise InvalidAddress(f"mail_from: {problem}") from None
    if "=?" in name:
        # A name given RFC 2047-encoded ("=?utf-8?q?J=C3=B6rg?="): the email package would
        # decode it anyway, and then, with SMTPUTF8, write it without the quotes it may need.
        name = one_line(str(make_header(decode_header(name))))
    return name, smtp_address(address)


def _address(address: str, name: str = "") -> Address:
    # Given as parts: parsing an addr_spec refuses a local part that is not ASCII (RFC 6532).
    local, _, domain = address.rpartition("@")
    return Address(display_name=name, username=local, domain=domain)


class _Subject(str):
    """A Subject header that reads back exactly as written.

    Assigned as a plain string, EmailMessage would decode text that looks like an encoded word
    (``=?utf-8?b?...?=``, which a hostile organization name can hold) and send it decoded; this
    one goes through ``email.header.Header``, which encodes such text as encoded words itself.
    Python 3.11's reader also takes a value folded right after the colon with a leading space
    (CPython gh-124452), which ``Header`` never writes.
    """

    name = "Subject"

    def fold(self, *, policy: Policy) -> str:
        # Encoded words even with SMTPUTF8: every reader takes them, and a relay that must
        # downgrade the message has no subject to rewrite.
        charset = "us-ascii" if self.isascii() and "=?" not in self else "utf-8"
        value = Header(str(self), charset, header_name=self.name).encode(
            linesep=policy.linesep, maxlinelen=policy.max_line_length
        )
        return f"Subject: {value}{policy.linesep}"

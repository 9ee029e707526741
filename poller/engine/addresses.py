"""The values from outside that go into an email's envelope, headers and links, checked once.

Each check here is the only one for its value: recipient resolution (``records``), the
configuration (``config``) and the message builder and transport (``mail``) all call it, so a
value that passes where it enters can always be built and sent (an admin's address that the
API gave us, ``mail_from``, ``billing_url``).

An address is a dot-atom local part (RFC 5322 atext; other Unicode letters and symbols too,
which need SMTPUTF8) ``@`` a domain of letter-digit-hyphen labels, where a label that is not
ASCII is sent IDNA-encoded (punycode), so ``admin@bücher.de`` needs no SMTPUTF8. Quoted local
parts, comments and address literals are refused: no admin has one, and servers disagree on
them.
"""

from __future__ import annotations

import re
import unicodedata
from email.utils import unquote
from urllib.parse import urlsplit

# RFC 5322 atext, the characters a dot-atom local part may use besides non-ASCII ones.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# RFC 5321: a local part of at most 64 octets, a path of at most 256 with its <>.
MAX_LOCAL_OCTETS = 64
MAX_ADDRESS_OCTETS = 254
# The sender: a bare address, or a display name then the address in <>.
_NAMED = re.compile(r"(?P<name>[^<>]*?)\s*<(?P<address>[^<>]*)>")


class InvalidAddress(ValueError):
    """An address no SMTP server could be asked to deliver to; the message says why."""


def checked_address(address: str) -> str:
    """``address`` unchanged if a message can be built and sent to it, else InvalidAddress."""
    smtp_address(address)
    return address


def smtp_address(address: str) -> str:
    """The address as it goes in RCPT TO / MAIL FROM and in headers: the domain IDNA-encoded."""
    local, at, domain = address.rpartition("@")
    ascii_domain = _ascii_domain(domain)
    if not at or not local:
        problem: str | None = "no local part and domain around an @"
    else:
        problem = _local_part_problem(local)
    if problem is None and ascii_domain is None:
        problem = "not a valid domain"
    if problem is None and len(f"{local}@{ascii_domain}".encode()) > MAX_ADDRESS_OCTETS:
        problem = f"longer than {MAX_ADDRESS_OCTETS} octets"
    if problem is not None:
        raise InvalidAddress(f"{address!r} is not a deliverable email address ({problem})")
    return f"{local}@{ascii_domain}"


def needs_smtputf8(address: str) -> bool:
    """Whether only a server offering SMTPUTF8 can take it: a local part that is not ASCII."""
    return not address.rpartition("@")[0].isascii()


def _local_part_problem(local: str) -> str | None:
    if len(local.encode("utf-8")) > MAX_LOCAL_OCTETS:
        return f"local part longer than {MAX_LOCAL_OCTETS} octets"
    for atom in local.split("."):
        if not atom:
            return "local part with an empty dot-separated part"
        if not all(_ATEXT.fullmatch(char) or _unicode_atext(char) for char in atom):
            return "local part with a character outside letters, digits and !#$%&'*+/=?^_`{|}~-"
    return None


def _unicode_atext(char: str) -> bool:
    # RFC 6532: any non-ASCII character but controls, format characters, unassigned code
    # points, surrogates and spaces (which would break the address apart).
    return not char.isascii() and unicodedata.category(char)[0] not in ("C", "Z")


def _ascii_domain(domain: str) -> str | None:
    if domain.isascii():
        ascii_domain = domain
    else:
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return ascii_domain


def checked_sender(value: str) -> tuple[str, str]:
    """``mail_from`` as (display name, address): ``alerts@x.com`` or ``Name <alerts@x.com>``.

    The name may hold any printable text (the header builder quotes or encodes it); the
    address passes ``checked_address``.
    """
    text = value.strip()
    named = _NAMED.fullmatch(text)
    name, address = (named["name"], named["address"].strip()) if named else ("", text)
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = unquote(name)  # the quotes and backslash escapes of a quoted string
    if not all(char.isprintable() for char in name):
        raise InvalidAddress(f"{value!r} has a control character in its display name")
    checked_address(address)
    return name.strip(), address


def checked_billing_url(url: str) -> str:
    """``url`` unchanged if it can go into the email's link: plain http(s), no spaces."""
    # It lands in an href: anything but a plain http(s) URL (javascript:, data:) is refused.
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValueError("not a valid URL (malformed host or port)") from None
    # The URL itself is not echoed: its path or query may carry a token.
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if not all(char.isprintable() and not char.isspace() for char in url):
        raise ValueError("must be a URL without spaces or control characters (a space is %20)")
    return url

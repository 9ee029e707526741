"""Turn API response bodies into the typed records of ``poller.engine.model``.

Pure functions, no I/O. Whatever JSON value comes in, the result is a record or a
``ParseError`` whose message names the offending field; nothing else may escape, because
one odd organization must become an error for that organization, never a crashed cycle.
Money, a decimal string in the API, is parsed into ``Decimal`` straight from its text. A JSON
number in its place (which the spec never uses) is read as the float every JSON parser makes
of it, then taken by its shortest repr: exact to about 15 significant digits.

Two steps, because at 100,000 organizations per cycle decoding is most of the client's CPU:
``loads_page`` / ``loads_billing`` decode a body with msgspec straight into structs of just the
fields poller reads (about five times faster than ``json.loads`` plus checking dicts, and the
other fields are skipped instead of built). A body that does not fit those structs exactly (a
wrong type anywhere, invalid UTF-8, a NaN) is decoded again with ``json.loads`` instead, and
``parse_*`` check that generic value field by field. So the fast path only ever accepts what
the field-by-field checks accept, and every error message comes from those checks
(tests/test_parsing.py holds both paths to the same answers).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import msgspec

from poller.engine.model import DEFAULT_THRESHOLD, Billing, Member, Organization

# Plain decimal notation in ASCII digits, as the API writes money. Decimal() alone would also
# accept "NaN", "Infinity", exponents, "1_000" and other scripts' digits ("\u0665" as 5).
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
# Amounts of 10**18 or more are nonsense for credits. Amounts are shown with every decimal
# they have (the email must never round away a difference the rule saw), so their decimals
# are bounded too: together at most 38 digits, however long the text.
_MAX_ADJUSTED_EXPONENT = 17
MAX_DECIMAL_PLACES = 20
_SHOWN_VALUE_LIMIT = 60
# Every id the API gives (organization, membership, user) is a database key: "type: integer,
# readOnly" in its OpenAPI document, an auto-increment primary key, which starts at 1. Poller
# stores ids as 64-bit signed integers (BIGINT), so anything above 2**63 - 1 cannot be stored
# (PostgreSQL refuses it, SQLite would keep it as an inexact REAL): the org is an error instead.
MIN_ID = 1
MAX_ID = 2**63 - 1
_Id = Annotated[int, msgspec.Meta(ge=MIN_ID, le=MAX_ID)]


class ParseError(ValueError):
    """An API value of the wrong type or shape; ``field`` is its path, e.g. ``members[2].role``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def parse_decimal(value: object, field: str) -> Decimal:
    """A finite Decimal from a decimal string, a JSON integer or a JSON float (via its repr)."""
    if isinstance(value, bool):
        raise ParseError(field, f"{_show(value)} is not a decimal number")
    if isinstance(value, int):
        if abs(value) >= 10**40:  # sidesteps int->str digit limits
            raise ParseError(field, f"{_show(value)} is out of range")
        text = str(value)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ParseError(field, f"{_show(value)} is not a decimal number")
        # repr() is the shortest text that round-trips, so 0.1 becomes Decimal("0.1"),
        # not the binary approximation Decimal(0.1) would give (1e16 is written "1e+16").
        text = format(Decimal(repr(value)), "f")
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise ParseError(field, f"{_show(value)} is not a decimal number")
    if not _DECIMAL_TEXT.fullmatch(text):
        raise ParseError(field, f"{_show(value)} is not a decimal number")
    try:
        number = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid text
        raise ParseError(field, f"{_show(value)} is not a decimal number") from None
    if number and number.adjusted() > _MAX_ADJUSTED_EXPONENT:
        raise ParseError(field, f"{_show(value)} is out of range")
    exponent = number.as_tuple().exponent  # an int: the pattern admits finite numbers only
    if isinstance(exponent, int) and -exponent > MAX_DECIMAL_PLACES:
        raise ParseError(field, f"{_show(value)} has more than {MAX_DECIMAL_PLACES} decimals")
    return number


# --- the fast path: structs of exactly the fields read, with the types the checks demand ---


class _UserBody(msgspec.Struct):
    id: _Id
    name: str | None = None
    email: str | None = None


class _MemberBody(msgspec.Struct):
    id: _Id
    user: _UserBody
    role: str
    is_email_notify_enabled: bool | None = None


class OrganizationBody(msgspec.Struct):
    """One organization as the fast decoder read it; ``parse_organization`` finishes it."""

    id: _Id
    name: str
    notify_low_credits: bool | None = None
    low_credits_threshold: str | int | float | None = None
    is_send_emails_enabled: bool | None = None
    auto_refill: bool | None = None
    members: list[_MemberBody] | None = None


class PageBody(msgspec.Struct):
    """A v2 listing page as the fast decoder read it."""

    results: list[OrganizationBody]
    next: str | None = None
    count: int | None = None


class BillingBody(msgspec.Struct):
    organization: _Id
    credits_remaining: str | int | float
    credits_used: str | int | float | None = None


_PAGE = msgspec.json.Decoder(PageBody)
_BILLING = msgspec.json.Decoder(BillingBody)


def loads_page(content: bytes) -> object:
    """A v2 listing page: a ``PageBody`` if it fits, else the JSON value (ValueError if none)."""
    return _loads(_PAGE, content)


def loads_billing(content: bytes) -> object:
    """A billing-info body: a ``BillingBody`` if it fits, else the JSON value."""
    return _loads(_BILLING, content)


def loads_json(content: bytes) -> object:
    """Any other body (an organization, the v1 listing): the JSON value; ValueError if none.

    Never RecursionError: one value nested deeper than a parser follows must not make every
    other organization in the body unreadable, so it alone is replaced and fails its checks.
    """
    try:
        return json.loads(content, parse_int=_bounded_int)
    except RecursionError:
        # Nothing is nested deeper than MAX_NESTING once it is cut off.
        return json.loads(without_deep_nesting(content), parse_int=_bounded_int)


def _loads(decoder: msgspec.json.Decoder[Any], content: bytes) -> object:
    try:
        return decoder.decode(content)
    # DecodeError is also ValidationError (the body does not fit the struct); RecursionError
    # is a value nested deeper than msgspec follows, which loads_json cuts off.
    except (msgspec.DecodeError, RecursionError):
        return loads_json(content)


# Integers longer than this are read as infinity (as JSON parsers read 1e400), which every
# field check refuses: int() of more than 4,300 digits raises, failing the whole body.
_MAX_INT_DIGITS = 100


def _bounded_int(text: str) -> int | float:
    if len(text) <= _MAX_INT_DIGITS:
        return int(text)
    return float("-inf") if text.startswith("-") else float("inf")


# A record is a handful of levels deep. A body's value that opens at this depth (an entry of a
# page's results, a field of an object) and nests deeper than MAX_NESTING is replaced whole.
MAX_NESTING = 64
_REPLACED_AT_DEPTH = 3
_TOO_DEEP = b'"(nested too deeply)"'
_STRUCTURE = re.compile(rb'["\[\]{}]')
_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def without_deep_nesting(content: bytes) -> bytes:
    """The JSON text with each value nested deeper than ``MAX_NESTING`` cut off where it
    opened at depth 3, without recursion (the parsers recurse and give up at about 1,000)."""
    pieces: list[bytes] = []
    depth = kept = opened = 0
    too_deep = False
    position = 0
    while match := _STRUCTURE.search(content, position):
        char, position = match.group(), match.end()
        if char == b'"':
            rest = _STRING_REST.match(content, position)
            if rest is None:
                break  # an unterminated string: the parser says so
            position = rest.end()
        elif char in b"[{":
            depth += 1
            if depth == _REPLACED_AT_DEPTH:
                opened, too_deep = match.start(), False
            too_deep = too_deep or depth > MAX_NESTING
        else:
            if depth == _REPLACED_AT_DEPTH and too_deep:
                pieces += [content[kept:opened], _TOO_DEEP]
                kept = position
            depth -= 1
    pieces.append(content[kept:])
    return b"".join(pieces)


# --- records --------------------------------------------------------------------------------


def parse_organization(data: object) -> Organization:
    """An Organization from one element of the list/retrieve responses."""
    if isinstance(data, OrganizationBody):
        return _organization_from_body(data)
    obj = _object(data, "organization")
    threshold = obj.get("low_credits_threshold")
    return Organization(
        id=_required_id(obj, "id"),
        name=_required_str(obj, "name"),
        notify_low_credits=_optional_bool(obj, "notify_low_credits", default=False),
        low_credits_threshold=(
            DEFAULT_THRESHOLD
            if threshold is None
            else parse_decimal(threshold, "low_credits_threshold")
        ),
        send_emails_enabled=_optional_bool(obj, "is_send_emails_enabled", default=True),
        auto_refill=_optional_bool(obj, "auto_refill", default=False),
        members=_members(obj.get("members")),
    )


def _organization_from_body(body: OrganizationBody) -> Organization:
    # The decoder checked every type; only what a type cannot say is checked here, in the
    # same order as the field-by-field path, so the first problem named is the same one.
    threshold = body.low_credits_threshold
    return Organization(
        id=body.id,
        name=body.name,
        notify_low_credits=bool(body.notify_low_credits),
        low_credits_threshold=(
            DEFAULT_THRESHOLD
            if threshold is None
            else parse_decimal(threshold, "low_credits_threshold")
        ),
        send_emails_enabled=body.is_send_emails_enabled is not False,
        auto_refill=bool(body.auto_refill),
        members=tuple(
            Member(
                membership_id=member.id,
                user_id=member.user.id,
                name=member.user.name or "",
                email=member.user.email or "",
                role=member.role,
                email_notify_enabled=member.is_email_notify_enabled,
            )
            for member in body.members or ()
        ),
    )


def parse_billing(data: object) -> Billing:
    """A Billing from the body of GET /test_framework/billing/info/."""
    if isinstance(data, BillingBody):
        return Billing(
            organization_id=data.organization,
            credits_remaining=parse_decimal(data.credits_remaining, "credits_remaining"),
            credits_used=(
                None
                if data.credits_used is None
                else parse_decimal(data.credits_used, "credits_used")
            ),
        )
    obj = _object(data, "billing")
    credits_used = obj.get("credits_used")
    return Billing(
        organization_id=_required_id(obj, "organization"),
        credits_remaining=parse_decimal(_required(obj, "credits_remaining"), "credits_remaining"),
        credits_used=None if credits_used is None else parse_decimal(credits_used, "credits_used"),
    )


def _members(value: object) -> tuple[Member, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ParseError("members", f"{_show(value)} is not a list")
    return tuple(_member(item, f"members[{index}]") for index, item in enumerate(value))


def _member(data: object, path: str) -> Member:
    obj = _object(data, path)
    user = _object(_required(obj, "user", path), f"{path}.user")
    notify = obj.get("is_email_notify_enabled")
    if notify is not None and not isinstance(notify, bool):
        raise ParseError(f"{path}.is_email_notify_enabled", f"{_show(notify)} is not a boolean")
    return Member(
        membership_id=_required_id(obj, "id", path),
        user_id=_required_id(user, "id", f"{path}.user"),
        # A member without a name or email is still a member: alert_recipients() skips
        # empty emails, so a null here must not cost the whole organization its alerts.
        name=_optional_str(user, "name", f"{path}.user"),
        email=_optional_str(user, "email", f"{path}.user"),
        role=_required_str(obj, "role", path),
        email_notify_enabled=notify,
    )


def _object(value: object, path: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ParseError(path, f"{_show(value)} is not a JSON object")
    return value


def _field_path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _required(obj: dict[str, object], key: str, parent: str = "") -> object:
    if key not in obj:
        raise ParseError(_field_path(parent, key), "is missing")
    return obj[key]


def is_id(value: object) -> bool:
    """Whether ``value`` is an id poller can store and use (see MIN_ID, MAX_ID)."""
    return isinstance(value, int) and not isinstance(value, bool) and MIN_ID <= value <= MAX_ID


def _required_id(obj: dict[str, object], key: str, parent: str = "") -> int:
    value = _required(obj, key, parent)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParseError(_field_path(parent, key), f"{_show(value)} is not an integer")
    if not is_id(value):
        raise ParseError(_field_path(parent, key), f"{_show(value)} is out of range")
    return value


def _required_str(obj: dict[str, object], key: str, parent: str = "") -> str:
    value = _required(obj, key, parent)
    if not isinstance(value, str):
        raise ParseError(_field_path(parent, key), f"{_show(value)} is not a string")
    return value


def _optional_str(obj: dict[str, object], key: str, parent: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ParseError(_field_path(parent, key), f"{_show(value)} is not a string")
    return value


def _optional_bool(obj: dict[str, object], key: str, *, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ParseError(key, f"{_show(value)} is not a boolean")
    return value


def _show(value: object) -> str:
    """A short, JSON-flavoured rendering of a bad value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and abs(value) >= 10**40:
        return "a very large integer"
    shown = repr(value)
    if len(shown) > _SHOWN_VALUE_LIMIT:
        shown = shown[: _SHOWN_VALUE_LIMIT - 3] + "..."
    return shown

"""Table tests and a property test for turning API JSON into typed records."""

from __future__ import annotations

import copy
import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.cekura.parsing import (
    MAX_NESTING,
    BillingBody,
    PageBody,
    ParseError,
    loads_billing,
    loads_json,
    loads_page,
    parse_billing,
    parse_decimal,
    parse_organization,
    without_deep_nesting,
)
from poller.engine.model import DEFAULT_THRESHOLD, Billing, Member, Organization

FULL_ORG = {
    "id": 37,
    "name": "Acme Voice",
    "notify_low_credits": True,
    "low_credits_threshold": "500.00",
    "cronjob_low_balance_mute_days": "0",
    "is_send_emails_enabled": False,
    "auto_refill": True,
    "auto_refill_max_cap": None,
    "members": [
        {
            "id": 901,
            "user": {"id": 55, "name": "Dana Ops", "email": "dana@acme.example"},
            "role": "admin",
            "is_email_notify_enabled": True,
            "created_at": "2025-03-02T10:00:00Z",
        },
        {
            "id": 902,
            "user": {"id": 56, "name": "Lee Dev", "email": "lee@acme.example"},
            "role": "member",
        },
    ],
}

BILLING = {
    "organization": 37,
    "credits_remaining": "412.50",
    "credits_used": "9587.50",
    "initial_balance": "10000.00",
    "balance_expiry": None,
    "subscription_status": {"status": "active", "is_active": True},
}


def org_with(**changes: object) -> dict[str, object]:
    data = copy.deepcopy(FULL_ORG)
    data.update(changes)
    return data


def org_without(*keys: str) -> dict[str, object]:
    data = copy.deepcopy(FULL_ORG)
    for key in keys:
        del data[key]
    return data


def test_it_reads_every_alert_field_of_a_full_organization() -> None:
    assert parse_organization(FULL_ORG) == Organization(
        id=37,
        name="Acme Voice",
        notify_low_credits=True,
        low_credits_threshold=Decimal("500.00"),
        send_emails_enabled=False,
        auto_refill=True,
        members=(
            Member(901, 55, "Dana Ops", "dana@acme.example", "admin", True),
            Member(902, 56, "Lee Dev", "lee@acme.example", "member", None),
        ),
    )


@pytest.mark.parametrize(
    ("data", "attribute", "expected"),
    [
        (org_without("low_credits_threshold"), "low_credits_threshold", DEFAULT_THRESHOLD),
        (org_with(low_credits_threshold=None), "low_credits_threshold", Decimal("1000")),
        (org_without("notify_low_credits"), "notify_low_credits", False),
        (org_without("is_send_emails_enabled"), "send_emails_enabled", True),
        (org_without("auto_refill"), "auto_refill", False),
        (org_without("members"), "members", ()),
        (org_with(members=None), "members", ()),
    ],
)
def test_it_fills_documented_defaults_for_missing_fields(
    data: dict[str, object], attribute: str, expected: object
) -> None:
    assert getattr(parse_organization(data), attribute) == expected


def test_it_ignores_fields_it_does_not_know() -> None:
    data = org_with(webhook_secret="whatever", projects=[{"id": 1}], team_size="<10")
    assert parse_organization(data) == parse_organization(FULL_ORG)


def test_a_member_without_notify_flag_or_name_is_still_read() -> None:
    member = {"id": 1, "user": {"id": 2, "email": "a@b.example", "name": None}, "role": "admin"}
    org = parse_organization(org_with(members=[member]))
    assert org.members == (Member(1, 2, "", "a@b.example", "admin", None),)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("500.00", Decimal("500.00")),
        ("0", Decimal("0")),
        ("-12.5", Decimal("-12.5")),
        (" 7436.08 ", Decimal("7436.08")),
        (500, Decimal("500")),
        (0.1, Decimal("0.1")),
        (1e15, Decimal("1000000000000000")),
        (2.5e-3, Decimal("0.0025")),
        (1e16, Decimal("10000000000000000")),  # a float whose repr has an exponent
        ("0.00000000000000000001", Decimal("1E-20")),
    ],
)
def test_it_parses_decimal_strings_integers_and_floats_exactly(
    value: object, expected: Decimal
) -> None:
    parsed = parse_decimal(value, "amount")
    assert isinstance(parsed, Decimal)
    assert parsed == expected


def test_decimal_arithmetic_on_parsed_values_is_exact() -> None:
    assert parse_decimal("0.1", "a") + parse_decimal("0.2", "b") == Decimal("0.3")
    assert parse_decimal(0.1, "a") + parse_decimal(0.2, "b") == Decimal("0.3")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "amount: 'abc' is not a decimal number"),
        ("NaN", "amount: 'NaN' is not a decimal number"),
        ("Infinity", "amount: 'Infinity' is not a decimal number"),
        ("1_000", "amount: '1_000' is not a decimal number"),
        ("", "amount: '' is not a decimal number"),
        (float("nan"), "amount: nan is not a decimal number"),
        (float("inf"), "amount: inf is not a decimal number"),
        (True, "amount: true is not a decimal number"),
        (None, "amount: null is not a decimal number"),
        ([1], "amount: a list is not a decimal number"),
        ("1e999999999", "amount: '1e999999999' is not a decimal number"),
        ("1E+3", "amount: '1E+3' is not a decimal number"),
        ("\u0665", "amount: '\u0665' is not a decimal number"),  # an Arabic-Indic five
        ("\uff11\uff10", "amount: '\uff11\uff10' is not a decimal number"),  # fullwidth 10
        ("1,000", "amount: '1,000' is not a decimal number"),
        ("-Infinity", "amount: '-Infinity' is not a decimal number"),
        ("1" * 10_000, f"amount: '{'1' * 56}... is out of range"),
        ("0." + "1" * 10_000, f"amount: '0.{'1' * 54}... has more than 20 decimals"),
        (
            "0.000000000000000000001",
            "amount: '0.000000000000000000001' has more than 20 decimals",
        ),
        (1e-300, "amount: 1e-300 has more than 20 decimals"),
        (10**5000, "amount: a very large integer is out of range"),
    ],
    ids=lambda value: f"{type(value).__name__}:{str(value)[:20]}" if value != 10**5000 else "huge",
)
def test_it_rejects_values_that_are_not_finite_decimals(value: object, message: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_decimal(value, "amount")
    assert str(caught.value) == message
    assert caught.value.field == "amount"


def test_it_reads_billing_with_a_negative_balance() -> None:
    data = dict(BILLING, credits_remaining="-25.75")
    assert parse_billing(data) == Billing(37, Decimal("-25.75"), Decimal("9587.50"))


def test_billing_without_credits_used_has_none() -> None:
    data = {"organization": 3, "credits_remaining": 12}
    assert parse_billing(data) == Billing(3, Decimal("12"), None)


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        (
            org_with(low_credits_threshold="abc"),
            "low_credits_threshold",
            "low_credits_threshold: 'abc' is not a decimal number",
        ),
        (org_with(id="x"), "id", "id: 'x' is not an integer"),
        (org_with(id=True), "id", "id: true is not an integer"),
        (org_without("id"), "id", "id: is missing"),
        (org_with(name=None), "name", "name: null is not a string"),
        (
            org_with(notify_low_credits="yes"),
            "notify_low_credits",
            "notify_low_credits: 'yes' is not a boolean",
        ),
        (org_with(members={"id": 1}), "members", "members: an object is not a list"),
        (org_with(members=["x"]), "members[0]", "members[0]: 'x' is not a JSON object"),
        (
            org_with(members=[FULL_ORG["members"][0], {"id": 5, "role": "admin"}]),
            "members[1].user",
            "members[1].user: is missing",
        ),
        (
            org_with(members=[{"id": 5, "role": "admin", "user": {"id": "u", "email": "e"}}]),
            "members[0].user.id",
            "members[0].user.id: 'u' is not an integer",
        ),
        (
            org_with(members=[{"id": 5, "role": 3, "user": {"id": 1}}]),
            "members[0].role",
            "members[0].role: 3 is not a string",
        ),
        (
            org_with(members=[{"id": 5, "role": "admin", "user": {"id": 1, "email": 7}}]),
            "members[0].user.email",
            "members[0].user.email: 7 is not a string",
        ),
        (
            org_with(members=[dict(FULL_ORG["members"][0], is_email_notify_enabled="no")]),
            "members[0].is_email_notify_enabled",
            "members[0].is_email_notify_enabled: 'no' is not a boolean",
        ),
        ([FULL_ORG], "organization", "organization: a list is not a JSON object"),
    ],
)
def test_a_bad_organization_value_names_its_field(data: object, field: str, message: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_organization(data)
    assert caught.value.field == field
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (dict(BILLING, credits_remaining=None), "credits_remaining"),
        ({"organization": 37}, "credits_remaining"),
        (dict(BILLING, credits_used="lots"), "credits_used"),
        (dict(BILLING, organization="37"), "organization"),
        ("not an object", "billing"),
    ],
)
def test_a_bad_billing_value_names_its_field(data: object, field: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_billing(data)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


# --- property: any JSON yields a record or a ParseError, nothing else -------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["500.00", "-1", "NaN", "1e999999", "0.1", "admin", ""])
)
ORG_KEYS = [
    "id",
    "name",
    "notify_low_credits",
    "low_credits_threshold",
    "is_send_emails_enabled",
    "auto_refill",
    "members",
    "user",
    "email",
    "role",
    "is_email_notify_enabled",
    "organization",
    "credits_remaining",
    "credits_used",
]
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(ORG_KEYS) | st.text(max_size=6), children, max_size=8)
    ),
    max_leaves=25,
)
member_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "role": json_values,
        "is_email_notify_enabled": json_values,
        "user": st.fixed_dictionaries(
            {}, optional={"id": json_values, "name": json_values, "email": json_values}
        )
        | json_values,
    },
)
org_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers() | json_values,
        "name": st.text(max_size=8) | json_values,
        "notify_low_credits": st.booleans() | json_values,
        "low_credits_threshold": json_values,
        "is_send_emails_enabled": json_values,
        "auto_refill": json_values,
        "members": st.lists(member_like, max_size=3) | json_values,
    },
)
billing_like = st.fixed_dictionaries(
    {},
    optional={
        "organization": st.integers() | json_values,
        "credits_remaining": json_values,
        "credits_used": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, org_like))
def test_any_json_becomes_an_organization_or_a_parse_error(data: object) -> None:
    try:
        assert isinstance(parse_organization(data), Organization)
    except ParseError as error:
        assert str(error).startswith(f"{error.field}: ")


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, billing_like))
def test_any_json_becomes_billing_or_a_parse_error(data: object) -> None:
    try:
        billing = parse_billing(data)
    except ParseError as error:
        assert str(error).startswith(f"{error.field}: ")
    else:
        assert isinstance(billing.credits_remaining, Decimal)
        assert billing.credits_remaining.is_finite()


# --- the fast decoders give exactly the answers of the field-by-field checks ------------------


def outcome(parse, data: object) -> object:
    """What a parse function makes of ``data``: the record, or the message it refused with."""
    try:
        return parse(data)
    except ParseError as error:
        return f"ParseError: {error}"


MEMBER = FULL_ORG["members"][0]


def both_paths(data: object) -> tuple[object, object]:
    """What the fast decoder and the field-by-field checks make of one listed organization."""
    body = json.dumps({"count": 1, "next": None, "previous": None, "results": [data]}).encode()
    page = loads_page(body)
    fast = page.results[0] if isinstance(page, PageBody) else page["results"][0]
    checked = json.loads(body)["results"][0]
    return outcome(parse_organization, fast), outcome(parse_organization, checked)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (org_with(id=2**63), "id: 9223372036854775808 is out of range"),
        (org_with(id=2**64 + 1), "id: 18446744073709551617 is out of range"),
        (org_with(id=0), "id: 0 is out of range"),
        (org_with(id=-37), "id: -37 is out of range"),
        (org_with(id=10**50), "id: a very large integer is out of range"),
        (
            org_with(members=[dict(MEMBER, id=2**63)]),
            "members[0].id: 9223372036854775808 is out of range",
        ),
        (
            org_with(members=[dict(MEMBER, user={"id": -1, "email": "a@b.example"})]),
            "members[0].user.id: -1 is out of range",
        ),
    ],
)
def test_an_id_outside_1_to_2_63_minus_1_is_refused_by_both_paths(
    data: object, message: str
) -> None:
    assert both_paths(data) == (f"ParseError: {message}", f"ParseError: {message}")


@pytest.mark.parametrize("org_id", [1, 2**63 - 1])
def test_the_ids_at_the_ends_of_the_range_are_read_by_both_paths(org_id: int) -> None:
    fast, checked = both_paths(org_with(id=org_id))
    assert fast == checked and isinstance(fast, Organization) and fast.id == org_id


@pytest.mark.parametrize("organization", [0, -1, 2**63])
def test_a_billing_organization_id_out_of_range_is_refused_by_both_paths(organization: int) -> None:
    body = json.dumps(dict(BILLING, organization=organization)).encode()
    expected = f"ParseError: organization: {organization} is out of range"
    assert outcome(parse_billing, loads_billing(body)) == expected
    assert outcome(parse_billing, json.loads(body)) == expected


valid_member = st.fixed_dictionaries(
    {
        "id": st.integers(),
        "user": st.fixed_dictionaries(
            {"id": st.integers()},
            optional={
                "name": st.none() | st.text(max_size=8),
                "email": st.none() | st.text(max_size=8),
            },
        ),
        "role": st.sampled_from(["admin", "member", ""]),
    },
    optional={"is_email_notify_enabled": st.none() | st.booleans()},
)
valid_org = st.fixed_dictionaries(
    {"id": st.integers(), "name": st.text(max_size=8)},
    optional={
        "notify_low_credits": st.none() | st.booleans(),
        "low_credits_threshold": json_scalars,
        "is_send_emails_enabled": st.none() | st.booleans(),
        "auto_refill": st.none() | st.booleans(),
        "members": st.none() | st.lists(valid_member, max_size=3),
    },
)


@st.composite
def nearly_valid_org(draw: st.DrawFn) -> dict:
    """A well-formed organization, sometimes with one value (at any depth) swapped for any JSON."""
    org = draw(valid_org)
    places = [(org, key) for key in [*org, "id", "name"]]
    for member in org.get("members") or []:
        places += [(member, key) for key in [*member, "id", "role"]]
        places += [(member["user"], key) for key in [*member["user"], "id"]]
    if draw(st.booleans()):
        where, key = draw(st.sampled_from(places))
        where[key] = draw(json_values)
    return org


@settings(max_examples=500, deadline=None)
@given(st.one_of(nearly_valid_org(), org_like, json_values))
def test_an_organization_decoded_fast_is_read_exactly_as_the_checks_read_it(data: object) -> None:
    fast, checked = both_paths(data)
    assert fast == checked


@settings(max_examples=300, deadline=None)
@given(st.one_of(billing_like, json_values))
def test_billing_decoded_fast_is_read_exactly_as_the_checks_read_it(data: object) -> None:
    body = json.dumps(data).encode()
    assert outcome(parse_billing, loads_billing(body)) == outcome(parse_billing, json.loads(body))


def test_the_fast_decoders_take_the_bodies_the_api_documents() -> None:
    page = loads_page(
        json.dumps({"count": 1, "next": None, "previous": None, "results": [FULL_ORG]}).encode()
    )
    assert isinstance(page, PageBody)
    assert parse_organization(page.results[0]) == parse_organization(FULL_ORG)
    billing = loads_billing(json.dumps(BILLING).encode())
    assert isinstance(billing, BillingBody)
    assert parse_billing(billing) == parse_billing(BILLING)


@pytest.mark.parametrize(
    "body",
    [
        b'{"organization": 1, "credits_remaining": NaN}',  # json.loads reads NaN; msgspec refuses
        b'{"organization": 1, "credits_remaining": "\\ud800"}',  # a lone surrogate
        '{"organization": 1, "credits_remaining": "5"}'.encode("utf-16"),
    ],
)
def test_a_body_the_fast_decoder_refuses_is_read_by_json_instead(body: bytes) -> None:
    assert loads_billing(body) == json.loads(body)


def test_invalid_json_is_still_a_value_error_so_the_client_retries_it() -> None:
    with pytest.raises(ValueError):
        loads_billing(b'{"organization": 1, "credits_remai')
    with pytest.raises(ValueError):
        loads_page(b"")


DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize("loads", [loads_page, loads_json])
def test_an_entry_nested_past_the_parsers_limit_costs_only_that_entry(loads) -> None:
    good = b'{"id": 2, "name": "Globex", "notify_low_credits": true}'
    hostile = b'{"id": 1, "name": "a \\"[{ string", "members": ' + DEEP + b"}"
    page = loads(b'{"count": 3, "results": [' + DEEP + b", " + hostile + b", " + good + b"]}")
    results = page.results if isinstance(page, PageBody) else page["results"]
    assert len(results) == 3
    for entry in results[:2]:
        with pytest.raises(ParseError):
            parse_organization(entry)
    assert parse_organization(results[2]).name == "Globex"


@pytest.mark.parametrize("loads", [loads_page, loads_json, loads_billing])
def test_an_integer_too_long_for_python_costs_only_its_field(loads) -> None:
    body = b'{"results": [' + b"9" * 5000 + b'], "organization": -' + b"9" * 5000 + b"}"
    data = loads(body)
    assert data == {"results": [float("inf")], "organization": float("-inf")}
    with pytest.raises(ParseError):
        parse_organization(data["results"][0])


def test_a_body_nested_too_deeply_at_its_top_is_cut_off_and_refused_by_the_checks() -> None:
    data = loads_json(DEEP)
    assert data == [["(nested too deeply)"]]
    with pytest.raises(ParseError):
        parse_billing(data)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.text() | st.integers(),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=30,
    )
)
def test_a_body_within_the_nesting_limit_is_left_exactly_as_it_was(data: object) -> None:
    for ensure_ascii in (True, False):
        text = json.dumps({"results": [data]}, ensure_ascii=ensure_ascii).encode()
        assert without_deep_nesting(text) == text


def test_the_nesting_limit_is_far_above_what_a_record_needs_and_below_the_parsers() -> None:
    assert 10 < MAX_NESTING < 500

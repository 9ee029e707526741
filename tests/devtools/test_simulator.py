"""The Cekura API simulator over real HTTP: every response checked against Cekura's published
OpenAPI subset, plus pagination, PATCH validation, faults, control endpoints and the CLI entry."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from poller.devtools.simulator import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Fault,
    FieldValidationError,
    SimulatedApi,
    SimulatorError,
    SimulatorServer,
    run_simulator,
    write_keys_file,
)
from tests.fixtures.api import SIM_TOKEN, FixedClock

REPO = Path(__file__).resolve().parents[2]
# The shared copy is authoritative (CI checks it out beside the repo); ours is for elsewhere.
SPEC_PATHS = (
    REPO / ".." / "shared" / "cekura-openapi-subset.json",
    REPO / "tests" / "data" / "cekura-openapi-subset.json",
)
TOKEN_HEADERS = {"Authorization": f"Bearer {SIM_TOKEN}"}
ORGS = "/user/organizations/"
ORGS_V2 = "/user/v2/organizations/"
BILLING = "/test_framework/billing/info/"


# ---- validation against the published spec ----------------------------------------------


def _allow_null(node: Any) -> Any:
    """Rewrite OpenAPI 3.0 ``nullable: true`` into JSON Schema (type also allows null)."""
    if isinstance(node, list):
        return [_allow_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _allow_null(value) for key, value in node.items()}
    if node.pop("nullable", False):
        if "type" in node:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            node["type"] = [*types, "null"] if "null" not in types else types
            if "enum" in node and None not in node["enum"]:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


def _load_spec() -> dict[str, Any]:
    path = next(p for p in SPEC_PATHS if p.exists())
    spec = _allow_null(json.loads(path.read_text(encoding="utf-8")))
    # cekura-api.md §8: documented as "null if no expiry is set" but not marked nullable.
    expiry = spec["components"]["schemas"]["BillingInfo"]["properties"]["balance_expiry"]
    expiry["type"] = ["string", "null"]
    return spec


SPEC = _load_spec()
REGISTRY = Registry().with_resource(
    "urn:cekura-openapi", Resource.from_contents(SPEC, default_specification=DRAFT202012)
)
FORMATS = FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.tzinfo is not None and "T" in value


@FORMATS.checks("decimal", raises=ArithmeticError)
def _is_decimal(value: object) -> bool:
    return not isinstance(value, str) or Decimal(value).is_finite()


def validator_for(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, registry=REGISTRY, format_checker=FORMATS)


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"urn:cekura-openapi#/components/schemas/{name}"}


DRF_DETAIL = {
    "type": "object",
    "required": ["detail"],
    "properties": {"detail": {"type": "string", "minLength": 1}},
    "additionalProperties": False,
}
DRF_FIELD_ERRORS = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": {"type": "array", "minItems": 1, "items": {"type": "string"}},
}


def response_schema(path_template: str, method: str, status: int) -> dict[str, Any]:
    """The schema the spec documents for a response, or DRF's error shape where it has none."""
    operation = SPEC["paths"][path_template][method]
    if operation["responses"].get(str(status), {}).get("content"):
        # A reference into the whole document, so the schema's own "#/components/..." resolve.
        pointer = "/".join(
            part.replace("~", "~0").replace("/", "~1")
            for part in ("paths", path_template, method, "responses", str(status))
        )
        return {"$ref": f"urn:cekura-openapi#/{pointer}/content/application~1json/schema"}
    assert status >= 400, f"the spec documents no body for {method} {path_template} {status}"
    return DRF_FIELD_ERRORS if status == 400 and method == "patch" else DRF_DETAIL


def documented_fields(name: str) -> set[str]:
    properties = SPEC["components"]["schemas"][name]["properties"]
    return {field for field, schema in properties.items() if not schema.get("writeOnly")}


def check(response: requests.Response, path_template: str, method: str = "get") -> Any:
    """Assert the response is JSON of the documented shape for its status; return the body."""
    assert response.headers["Content-Type"] == "application/json"
    assert int(response.headers["Content-Length"]) == len(response.content)
    body = response.json()
    schema = response_schema(path_template, method, response.status_code)
    validator_for(schema).validate(body)
    for org in _organizations_in(body, path_template, response.status_code):
        # Typos in field names would pass the spec (it allows extra properties); not here.
        assert set(org) <= documented_fields("Organization")
        for member in org.get("members", []):
            assert set(member) <= documented_fields("MembershipInline")
    return body


def _organizations_in(body: Any, path_template: str, status: int) -> list[dict[str, Any]]:
    if status != 200 or path_template == BILLING:
        return []
    if isinstance(body, list):
        return body
    return body["results"] if "results" in body else [body]


def test_the_schema_checker_rejects_a_wrong_shape() -> None:
    with pytest.raises(Exception, match="is not of type"):
        validator_for(ref("BillingInfo")).validate({"organization": "37", "balance_expiry": None})
    with pytest.raises(Exception, match="does not match"):
        validator_for(ref("Organization")).validate(
            {"name": "x", "limit_to_exclusive_numbers": False, "low_credits_threshold": "1.234"}
        )
    with pytest.raises(Exception, match="is not a 'date-time'"):
        validator_for(ref("BillingInfo")).validate({"balance_expiry": "yesterday"})


# ---- helpers -------------------------------------------------------------------------------


def get(server: SimulatorServer, path: str, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("headers", TOKEN_HEADERS)
    return requests.get(server.url + path, timeout=10, **kwargs)


def patch(server: SimulatorServer, org_id: int, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("headers", TOKEN_HEADERS)
    return requests.patch(f"{server.url}{ORGS}{org_id}/", timeout=10, **kwargs)


def key_headers(api: SimulatedApi, org_id: int) -> dict[str, str]:
    return {"X-CEKURA-API-KEY": api.keys()[org_id]}


@pytest.fixture
def big_server() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatedApi.generate(orgs=230, seed=4, token=SIM_TOKEN)) as server:
        yield server


# ---- lists -----------------------------------------------------------------------------------


def test_the_list_is_a_bare_array_of_every_organization_for_the_token(
    simulator: SimulatorServer,
) -> None:
    body = check(get(simulator, ORGS), ORGS)
    assert isinstance(body, list)
    assert [org["id"] for org in body] == simulator.api.org_ids()
    assert len(body) == 5


def test_an_org_key_lists_only_its_own_organization(simulator: SimulatorServer) -> None:
    api = simulator.api
    for org_id in api.org_ids():
        body = check(get(simulator, ORGS, headers=key_headers(api, org_id)), ORGS)
        assert [org["id"] for org in body] == [org_id]


def test_search_keeps_names_containing_every_term_case_insensitively(
    simulator: SimulatorServer,
) -> None:
    api = simulator.api
    first, second = api.org_ids()[:2]
    api.update_org(first, name="Acme Voice Labs")
    api.update_org(second, name="ACME Dental")
    found = check(get(simulator, ORGS, params={"search": "acme"}), ORGS)
    assert {org["id"] for org in found} == {first, second}
    found = check(get(simulator, ORGS, params={"search": "voice ACME"}), ORGS)
    assert [org["id"] for org in found] == [first]
    assert check(get(simulator, ORGS, params={"search": "nothing-like-it"}), ORGS) == []


def test_v2_pages_follow_next_to_the_end_and_back_through_previous(
    simulator: SimulatorServer,
) -> None:
    pages = [check(get(simulator, ORGS_V2, params={"page_size": 2}), ORGS_V2)]
    while pages[-1]["next"]:
        assert pages[-1]["next"].startswith(simulator.url + ORGS_V2)
        pages.append(check(requests.get(pages[-1]["next"], headers=TOKEN_HEADERS), ORGS_V2))
    ids = [org["id"] for page in pages for org in page["results"]]
    assert ids == simulator.api.org_ids()
    assert [page["count"] for page in pages] == [5, 5, 5]
    assert [len(page["results"]) for page in pages] == [2, 2, 1]
    assert pages[0]["previous"] is None
    # DRF leaves page=1 out of the link back to the first page.
    assert pages[1]["previous"] == f"{simulator.url}{ORGS_V2}?page_size=2"
    assert pages[2]["previous"] == f"{simulator.url}{ORGS_V2}?page=2&page_size=2"


def test_v2_links_are_built_from_the_request_host(simulator: SimulatorServer) -> None:
    headers = {**TOKEN_HEADERS, "Host": "api.example.test:8080"}
    body = check(get(simulator, ORGS_V2, params={"page_size": 1}, headers=headers), ORGS_V2)
    assert body["next"] == f"http://api.example.test:8080{ORGS_V2}?page=2&page_size=1"


def test_v2_defaults_to_50_a_page_and_clamps_page_size_to_200(
    big_server: SimulatorServer,
) -> None:
    assert (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE) == (50, 200)
    default = check(get(big_server, ORGS_V2), ORGS_V2)
    assert (default["count"], len(default["results"])) == (230, 50)
    clamped = check(get(big_server, ORGS_V2, params={"page_size": 1000}), ORGS_V2)
    assert len(clamped["results"]) == 200
    last = check(requests.get(clamped["next"], headers=TOKEN_HEADERS), ORGS_V2)
    assert (len(last["results"]), last["next"]) == (30, None)
    invalid = check(get(big_server, ORGS_V2, params={"page_size": "zero"}), ORGS_V2)
    assert len(invalid["results"]) == 50


@pytest.mark.parametrize("page", ["4", "0", "-1", "two", "1.0"])
def test_a_v2_page_out_of_range_or_not_a_number_is_404_invalid_page(
    simulator: SimulatorServer, page: str
) -> None:
    response = get(simulator, ORGS_V2, params={"page": page, "page_size": 2})
    assert response.status_code == 404
    assert check(response, ORGS_V2) == {"detail": "Invalid page."}


def test_v2_with_an_org_key_has_one_page_with_that_org(simulator: SimulatorServer) -> None:
    org_id = simulator.api.org_ids()[2]
    body = check(get(simulator, ORGS_V2, headers=key_headers(simulator.api, org_id)), ORGS_V2)
    assert (body["count"], body["next"], body["previous"]) == (1, None, None)
    assert [org["id"] for org in body["results"]] == [org_id]


def test_v2_can_be_switched_off_so_a_client_falls_back_to_the_v1_list(
    simulator: SimulatorServer,
) -> None:
    simulator.api.v2_enabled = False
    response = get(simulator, ORGS_V2)
    assert response.status_code == 404
    assert check(response, ORGS_V2) == {"detail": "Not found."}
    assert get(simulator, ORGS).status_code == 200
    switched = requests.post(f"{simulator.url}/_sim/settings", json={"v2_enabled": True})
    assert switched.json() == {"v2_enabled": True}
    assert get(simulator, ORGS_V2).status_code == 200


def test_an_empty_simulator_serves_an_empty_first_page() -> None:
    with SimulatorServer(SimulatedApi(token=SIM_TOKEN)) as server:
        body = check(get(server, ORGS_V2), ORGS_V2)
        assert body == {"count": 0, "next": None, "previous": None, "results": []}
        assert check(get(server, ORGS), ORGS) == []


# ---- retrieve and PATCH --------------------------------------------------------------------------


def test_retrieve_returns_the_full_organization(simulator: SimulatorServer) -> None:
    org_id = simulator.api.org_ids()[1]
    body = check(get(simulator, f"{ORGS}{org_id}/"), f"{ORGS}{{id}}/")
    assert body == simulator.api.organization(org_id)
    assert {"name", "limit_to_exclusive_numbers", "members", "created_at"} <= set(body)
    assert 1 <= len(body["members"]) <= 4
    member = body["members"][0]
    assert set(member["user"]) == {"id", "name", "email"}
    assert member["role"] in ("admin", "member", "view_only", "labs")


@pytest.mark.parametrize("org_path", ["999999", "abc", "0"])
def test_retrieving_an_unknown_organization_is_404(
    simulator: SimulatorServer, org_path: str
) -> None:
    response = get(simulator, f"{ORGS}{org_path}/")
    assert response.status_code == 404
    body = check(response, f"{ORGS}{{id}}/")
    assert body == {"detail": "No Organization matches the given query."}


def test_an_org_key_cannot_read_or_change_another_organization(
    simulator: SimulatorServer,
) -> None:
    api = simulator.api
    mine, other = api.org_ids()[:2]
    headers = key_headers(api, mine)
    assert get(simulator, f"{ORGS}{other}/", headers=headers).status_code == 404
    refused = patch(simulator, other, headers=headers, json={"notify_low_credits": False})
    assert refused.status_code == 404
    check(refused, f"{ORGS}{{id}}/", "patch")
    assert api.organization(other) == check(get(simulator, f"{ORGS}{other}/"), f"{ORGS}{{id}}/")
    assert get(simulator, f"{ORGS}{mine}/", headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        (500, "500.00"),
        ("500", "500.00"),
        ("750.5", "750.50"),
        (" 12.34 ", "12.34"),
        ("-3", "-3.00"),
    ],
)
def test_patch_stores_the_threshold_as_a_two_place_decimal_string(
    simulator: SimulatorServer, sent: object, stored: str
) -> None:
    org_id = simulator.api.org_ids()[0]
    response = patch(simulator, org_id, json={"low_credits_threshold": sent})
    assert response.status_code == 200
    body = check(response, f"{ORGS}{{id}}/", "patch")
    assert body["low_credits_threshold"] == stored
    assert simulator.api.organization(org_id)["low_credits_threshold"] == stored


def test_a_json_fraction_is_read_exactly_not_as_a_float(simulator: SimulatorServer) -> None:
    org_id = simulator.api.org_ids()[0]
    body = '{"low_credits_threshold": 0.10}'
    headers = {**TOKEN_HEADERS, "Content-Type": "application/json"}
    response = patch(simulator, org_id, data=body, headers=headers)
    assert check(response, f"{ORGS}{{id}}/", "patch")["low_credits_threshold"] == "0.10"


def test_patch_accepts_a_form_encoded_body(simulator: SimulatorServer) -> None:
    org_id = simulator.api.org_ids()[0]
    form = {"notify_low_credits": "false", "low_credits_threshold": "250"}
    body = check(patch(simulator, org_id, data=form), f"{ORGS}{{id}}/", "patch")
    assert (body["notify_low_credits"], body["low_credits_threshold"]) == (False, "250.00")


def test_patch_returns_the_full_organization_and_ignores_read_only_fields(
    simulator: SimulatorServer,
) -> None:
    api = simulator.api
    org_id = api.org_ids()[0]
    before = api.organization(org_id)
    sent = {
        "id": 777,
        "members": [],
        "max_agents_limit": 99,
        "created_at": "2000-01-01T00:00:00Z",
        "no_such_field": 1,
        "notify_low_credits": False,
        "cronjob_low_balance_mute_days": 7,
        "auto_refill_max_cap": None,
    }
    body = check(patch(simulator, org_id, json=sent), f"{ORGS}{{id}}/", "patch")
    assert body["id"] == org_id
    assert body["members"] == before["members"]
    assert body["max_agents_limit"] == before["max_agents_limit"]
    assert body["created_at"] == before["created_at"]
    assert "no_such_field" not in body
    assert (body["notify_low_credits"], body["cronjob_low_balance_mute_days"]) == (False, "7")
    assert body["updated_at"] != before["updated_at"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("low_credits_threshold", "abc", "A valid number is required."),
        ("low_credits_threshold", "", "A valid number is required."),
        ("low_credits_threshold", True, "A valid number is required."),
        ("low_credits_threshold", "NaN", "A valid number is required."),
        ("low_credits_threshold", None, "This field may not be null."),
        ("low_credits_threshold", "1.234", "Ensure that there are no more than 2 decimal places."),
        (
            "low_credits_threshold",
            "123456789",
            "Ensure that there are no more than 8 digits before the decimal point.",
        ),
        (
            "low_credits_threshold",
            "12345678901",
            "Ensure that there are no more than 10 digits in total.",
        ),
        ("notify_low_credits", "maybe", "Must be a valid boolean."),
        ("notify_low_credits", 2, "Must be a valid boolean."),
        ("notify_low_credits", None, "This field may not be null."),
        ("cronjob_low_balance_mute_days", "5", '"5" is not a valid choice.'),
        ("name", "", "This field may not be blank."),
        ("max_call_duration", "long", "A valid integer is required."),
    ],
)
def test_patch_rejects_invalid_values_with_drf_messages(
    simulator: SimulatorServer, field: str, value: object, message: str
) -> None:
    org_id = simulator.api.org_ids()[0]
    before = simulator.api.organization(org_id)
    response = patch(simulator, org_id, json={field: value, "notify_daily_report": True})
    assert response.status_code == 400
    assert check(response, f"{ORGS}{{id}}/", "patch") == {field: [message]}
    assert simulator.api.organization(org_id) == before  # nothing applied


def test_patch_reports_every_bad_field_at_once(simulator: SimulatorServer) -> None:
    org_id = simulator.api.org_ids()[0]
    sent = {"low_credits_threshold": "1.005", "notify_low_credits": "x"}
    body = check(patch(simulator, org_id, json=sent), f"{ORGS}{{id}}/", "patch")
    assert set(body) == {"low_credits_threshold", "notify_low_credits"}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "expected"),
    [
        ("{not json", "application/json", 400, {"detail": "JSON parse error - "}),
        ("[1, 2]", "application/json", 400, {"non_field_errors": ["Invalid data. "]}),
        ("<x/>", "application/xml", 415, {"detail": 'Unsupported media type "application/xml"'}),
    ],
)
def test_a_patch_body_that_is_not_an_object_is_rejected(
    simulator: SimulatorServer, body: str, content_type: str, status: int, expected: dict
) -> None:
    headers = {**TOKEN_HEADERS, "Content-Type": content_type}
    response = patch(simulator, simulator.api.org_ids()[0], data=body, headers=headers)
    assert response.status_code == status
    got = response.json()
    assert list(got) == list(expected)
    [(key, prefix)] = expected.items()
    text = got[key] if isinstance(got[key], str) else got[key][0]
    assert text.startswith(prefix if isinstance(prefix, str) else prefix[0])
    validator_for(DRF_DETAIL if key == "detail" else DRF_FIELD_ERRORS).validate(got)


def test_a_wrong_method_is_405_with_allow(simulator: SimulatorServer) -> None:
    org_id = simulator.api.org_ids()[0]
    response = requests.delete(f"{simulator.url}{ORGS}{org_id}/", headers=TOKEN_HEADERS)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, PATCH"
    assert response.json() == {"detail": 'Method "DELETE" not allowed.'}


# ---- billing -----------------------------------------------------------------------------------


def test_billing_with_an_org_key_answers_for_the_keys_organization(
    simulator: SimulatorServer,
) -> None:
    api = simulator.api
    for org_id in api.org_ids():
        body = check(get(simulator, BILLING, headers=key_headers(api, org_id)), BILLING)
        assert body["organization"] == org_id
        assert Decimal(body["credits_remaining"]) == api.balance(org_id)
        assert set(body["subscription_status"]) == {
            "status", "is_active", "is_trial", "pack_name", "expire_at",
            "last_payment_at", "days_until_expiry", "created_at", "pack",
        }  # fmt: skip


def test_billing_with_a_key_and_the_same_organization_id_is_fine(
    simulator: SimulatorServer,
) -> None:
    org_id = simulator.api.org_ids()[1]
    headers = key_headers(simulator.api, org_id)
    body = check(
        get(simulator, BILLING, params={"organization_id": org_id}, headers=headers), BILLING
    )
    assert body["organization"] == org_id


def test_billing_with_a_key_and_another_organization_id_is_404(
    simulator: SimulatorServer,
) -> None:
    mine, other = simulator.api.org_ids()[:2]
    headers = key_headers(simulator.api, mine)
    response = get(simulator, BILLING, params={"organization_id": other}, headers=headers)
    assert response.status_code == 404
    assert check(response, BILLING) == {"detail": "Billing information not found"}


def test_billing_with_the_token_reads_the_organization_named_by_id(
    simulator: SimulatorServer,
) -> None:
    api = simulator.api
    for org_id in api.org_ids():
        body = check(get(simulator, BILLING, params={"organization_id": org_id}), BILLING)
        assert body["organization"] == org_id
        assert body["credits_remaining"] == str(api.balance(org_id))


@pytest.mark.parametrize(
    ("params", "status", "detail"),
    [
        ({}, 400, "organization_id is required"),
        ({"organization_id": "seven"}, 400, "organization_id must be an integer"),
        ({"organization_id": "424242"}, 404, "Billing information not found"),
    ],
)
def test_billing_with_the_token_needs_a_known_organization_id(
    simulator: SimulatorServer, params: dict[str, str], status: int, detail: str
) -> None:
    response = get(simulator, BILLING, params=params)
    assert response.status_code == status
    assert check(response, BILLING)["detail"].startswith(detail)


def test_every_subscription_kind_is_valid_billing_info(simulator: SimulatorServer) -> None:
    api = simulator.api
    for kind in ("active", "trial", "expired", "inactive"):
        org_id = api.add_org(f"{kind} org", credits_remaining="5", subscription=kind)
        body = check(get(simulator, BILLING, params={"organization_id": org_id}), BILLING)
        assert body["subscription_status"]["status"] == kind
    assert body["subscription_status"]["pack"] is None  # inactive: everything null or false


# ---- authentication and unknown paths ------------------------------------------------------------


@pytest.mark.parametrize("path", [ORGS, ORGS_V2, f"{ORGS}1/", BILLING])
@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "Authentication credentials were not provided."),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Authentication credentials were not provided."),
        ({"X-CEKURA-API-KEY": "sim_wrong"}, "Invalid API key."),
        ({"Authorization": "Bearer wrong-token"}, "Invalid token."),
    ],
)
def test_missing_or_wrong_credentials_are_401(
    simulator: SimulatorServer, path: str, headers: dict[str, str], detail: str
) -> None:
    response = get(simulator, path, headers=headers)
    assert response.status_code == 401
    template = f"{ORGS}{{id}}/" if path.endswith("1/") else path
    assert check(response, template) == {"detail": detail}
    assert "WWW-Authenticate" in response.headers


def test_a_removed_organizations_key_stops_working(simulator: SimulatorServer) -> None:
    api = simulator.api
    org_id = api.org_ids()[0]
    headers = key_headers(api, org_id)
    api.remove_org(org_id)
    assert get(simulator, BILLING, headers=headers).json() == {"detail": "Invalid API key."}
    assert org_id not in [org["id"] for org in get(simulator, ORGS).json()]


@pytest.mark.parametrize("path", ["/", "/user/organizations", "/v1/organizations/", "/user/x/"])
def test_an_unknown_path_is_404_not_found(simulator: SimulatorServer, path: str) -> None:
    response = get(simulator, path)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}
    validator_for(DRF_DETAIL).validate(response.json())


# ---- faults ------------------------------------------------------------------------------------


def test_latency_delays_the_answer(simulator: SimulatorServer) -> None:
    simulator.api.add_fault(Fault("latency", seconds=0.3, times=1))
    started = time.monotonic()
    check(get(simulator, ORGS), ORGS)
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    check(get(simulator, ORGS), ORGS)
    assert time.monotonic() - started < 0.3


def test_a_5xx_once_then_the_normal_answer(simulator: SimulatorServer) -> None:
    simulator.api.add_fault(Fault("status", status=502, endpoint="list_v2", times=1))
    failed = get(simulator, ORGS_V2)
    assert failed.status_code == 502
    assert check(failed, ORGS_V2) == {"detail": "Simulated 502 Bad Gateway."}
    assert check(get(simulator, ORGS_V2), ORGS_V2)["count"] == 5


def test_a_fault_applies_only_to_its_endpoint(simulator: SimulatorServer) -> None:
    simulator.api.add_fault(Fault("status", status=500, endpoint="billing"))
    org_id = simulator.api.org_ids()[0]
    assert get(simulator, ORGS).status_code == 200
    assert get(simulator, f"{ORGS}{org_id}/").status_code == 200
    failed = get(simulator, BILLING, params={"organization_id": org_id})
    assert failed.status_code == 500
    check(failed, BILLING)


def test_rate_limit_is_429_with_retry_after_and_a_drf_body(simulator: SimulatorServer) -> None:
    simulator.api.add_fault(Fault("rate_limit", retry_after=7, times=2))
    for _ in range(2):
        limited = get(simulator, ORGS)
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "7"
        assert check(limited, ORGS) == {
            "detail": "Request was throttled. Expected available in 7 seconds."
        }
    assert get(simulator, ORGS).status_code == 200


def test_a_malformed_answer_is_200_with_a_body_that_is_not_json(
    simulator: SimulatorServer,
) -> None:
    org_id = simulator.api.org_ids()[0]
    simulator.api.add_fault(Fault("malformed", endpoint="billing", times=1))
    response = get(simulator, BILLING, params={"organization_id": org_id})
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(response.content) > 0
    with pytest.raises(ValueError):
        json.loads(response.content)
    assert (
        get(simulator, BILLING, params={"organization_id": org_id}).json()["organization"] == org_id
    )


def test_a_dropped_connection_gets_no_answer_at_all(simulator: SimulatorServer) -> None:
    simulator.api.add_fault(Fault("drop", times=1))
    with pytest.raises(requests.ConnectionError):
        get(simulator, ORGS)
    assert get(simulator, ORGS).status_code == 200


def test_a_per_org_fault_leaves_other_organizations_alone(simulator: SimulatorServer) -> None:
    api = simulator.api
    broken, healthy = api.org_ids()[:2]
    api.add_fault(Fault("status", status=503, org_id=broken))
    for headers in (TOKEN_HEADERS, key_headers(api, broken)):
        by_id = {"organization_id": broken} if headers is TOKEN_HEADERS else {}
        assert get(simulator, BILLING, params=by_id, headers=headers).status_code == 503
    assert get(simulator, f"{ORGS}{broken}/").status_code == 503
    assert get(simulator, ORGS, headers=key_headers(api, broken)).status_code == 503
    assert get(simulator, BILLING, params={"organization_id": healthy}).status_code == 200
    assert get(simulator, f"{ORGS}{healthy}/").status_code == 200
    assert get(simulator, ORGS).status_code == 200  # the token's list is about no single org


def test_a_fault_expires_after_its_times_and_clear_removes_the_rest(
    simulator: SimulatorServer,
) -> None:
    api = simulator.api
    api.add_fault(Fault("status", status=500, times=3))
    api.add_fault(Fault("status", status=418))
    statuses = [get(simulator, ORGS).status_code for _ in range(4)]
    assert statuses == [500, 500, 500, 418]
    assert api.clear_faults() == 1
    assert get(simulator, ORGS).status_code == 200


def test_faults_can_be_added_and_cleared_over_http(simulator: SimulatorServer) -> None:
    added = requests.post(
        f"{simulator.url}/_sim/faults", json={"kind": "rate_limit", "retry_after": 3, "times": 1}
    )
    assert (added.status_code, added.json()) == (201, {"faults": 1})
    assert get(simulator, ORGS).headers["Retry-After"] == "3"
    requests.post(f"{simulator.url}/_sim/faults", json={"kind": "latency", "seconds": 0.01})
    cleared = requests.delete(f"{simulator.url}/_sim/faults")
    assert cleared.json() == {"cleared": 1}
    assert simulator.api.faults() == []


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"kind": "explode"}, "fault kind must be one of"),
        ({"kind": "status", "endpoint": "users"}, "fault endpoint must be one of"),
        ({"kind": "status", "times": 0}, "fault times must be a positive integer"),
        ({"kind": "status", "status": 200}, "fault status must be an HTTP error status"),
        ({"kind": "latency", "seconds": -1}, "fault seconds must be >= 0"),
        ({"kind": "drop", "color": "red"}, "unknown fault field(s): color"),
        ([], "a fault must be a JSON object"),
    ],
)
def test_a_bad_fault_is_a_400_naming_the_problem(
    simulator: SimulatorServer, fault: Any, message: str
) -> None:
    response = requests.post(f"{simulator.url}/_sim/faults", json=fault)
    assert response.status_code == 400
    assert response.json()["detail"].startswith(message)


# ---- control endpoints and history --------------------------------------------------------------


def test_setting_the_balance_over_http_changes_billing(simulator: SimulatorServer) -> None:
    org_id = simulator.api.org_ids()[0]
    changed = requests.post(
        f"{simulator.url}/_sim/orgs/{org_id}",
        json={
            "credits_remaining": "12.00",
            "notify_low_credits": True,
            "low_credits_threshold": 50,
        },
    )
    assert changed.status_code == 200
    assert changed.json()["billing"]["credits_remaining"] == "12.00"
    billing = check(get(simulator, BILLING, params={"organization_id": org_id}), BILLING)
    assert billing["credits_remaining"] == "12.00"
    org = check(get(simulator, f"{ORGS}{org_id}/"), f"{ORGS}{{id}}/")
    assert (org["notify_low_credits"], org["low_credits_threshold"]) == (True, "50.00")


def test_a_bad_control_change_is_rejected_and_changes_nothing(
    simulator: SimulatorServer,
) -> None:
    api = simulator.api
    org_id = api.org_ids()[0]
    balance = api.balance(org_id)
    response = requests.post(
        f"{simulator.url}/_sim/orgs/{org_id}",
        json={"credits_remaining": "5", "low_credits_threshold": "x"},
    )
    assert response.json() == {"low_credits_threshold": ["A valid number is required."]}
    assert api.balance(org_id) == balance
    bad_balance = requests.post(
        f"{simulator.url}/_sim/orgs/{org_id}", json={"credits_remaining": "lots"}
    )
    assert bad_balance.status_code == 400
    unknown = requests.post(f"{simulator.url}/_sim/orgs/999999", json={"credits_remaining": "1"})
    assert unknown.status_code == 404


def test_organizations_can_be_added_and_removed_over_http(simulator: SimulatorServer) -> None:
    added = requests.post(
        f"{simulator.url}/_sim/orgs", json={"name": "New Co", "credits_remaining": "10.50"}
    )
    assert added.status_code == 201
    org_id, key = added.json()["id"], added.json()["api_key"]
    headers = {"X-CEKURA-API-KEY": key}
    assert get(simulator, BILLING, headers=headers).json()["credits_remaining"] == "10.50"
    listed = check(get(simulator, ORGS, headers=headers), ORGS)
    assert listed[0]["name"] == "New Co"
    assert listed[0]["members"][0]["role"] == "admin"
    assert requests.delete(f"{simulator.url}/_sim/orgs/{org_id}").json() == {"removed": org_id}
    assert get(simulator, BILLING, headers=headers).status_code == 401


def test_null_in_a_control_change_leaves_the_field_out_of_the_api(
    simulator: SimulatorServer,
) -> None:
    org_id = simulator.api.org_ids()[0]
    requests.post(
        f"{simulator.url}/_sim/orgs/{org_id}",
        json={"low_credits_threshold": None, "is_send_emails_enabled": None},
    )
    org = check(get(simulator, f"{ORGS}{org_id}/"), f"{ORGS}{{id}}/")
    assert "low_credits_threshold" not in org
    assert "is_send_emails_enabled" not in org
    check(patch(simulator, org_id, json={"low_credits_threshold": "5"}), f"{ORGS}{{id}}/", "patch")
    assert simulator.api.organization(org_id)["low_credits_threshold"] == "5.00"


def test_history_records_every_balance_with_its_time() -> None:
    clock = FixedClock()
    api = SimulatedApi.generate(orgs=2, seed=3, clock=clock)
    first, second = api.org_ids()
    starting = [(clock.now, first, api.balance(first)), (clock.now, second, api.balance(second))]
    assert api.balance_history() == starting
    clock.advance(60)
    api.set_balance(first, Decimal("10.5"))
    clock.advance(60)
    api.set_balance(second, "-2")
    assert api.balance_history()[2:] == [
        (clock.now - timedelta(seconds=60), first, Decimal("10.50")),
        (clock.now, second, Decimal("-2.00")),
    ]
    with SimulatorServer(api) as server:
        served = requests.get(f"{server.url}/_sim/history").json()
    assert served[-1] == {
        "at": "2026-08-01T12:02:00Z",
        "organization": second,
        "credits_remaining": "-2.00",
    }
    assert len(served) == 4


def test_a_balance_drop_counts_as_credits_used(sim_api: SimulatedApi) -> None:
    org_id = sim_api.org_ids()[0]
    sim_api.set_balance(org_id, "1000")
    used = Decimal(sim_api.billing(org_id)["credits_used"])
    sim_api.set_balance(org_id, "400")
    assert Decimal(sim_api.billing(org_id)["credits_used"]) == used + 600
    sim_api.set_balance(org_id, "5000")  # a top-up uses nothing
    assert Decimal(sim_api.billing(org_id)["credits_used"]) == used + 600


def test_money_must_not_arrive_as_a_float(sim_api: SimulatedApi) -> None:
    org_id = sim_api.org_ids()[0]
    with pytest.raises(ValueError, match="not float"):
        sim_api.set_balance(org_id, 0.1)  # type: ignore[arg-type]
    with pytest.raises(FieldValidationError, match="low_credits_threshold"):
        sim_api.update_org(org_id, low_credits_threshold=0.1)
    with pytest.raises(FieldValidationError, match="notify_low_credit: Unknown field"):
        sim_api.update_org(org_id, notify_low_credit=True)


def test_what_is_served_follows_every_change_made_after_it_was_first_served(
    simulator: SimulatorServer,
) -> None:
    # The simulator keeps each organization's JSON once served; every change must drop it.
    api = simulator.api
    org_id, other = api.org_ids()[:2]

    def served(valid: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """(Organization, BillingInfo) as served, after checking every list agrees."""

        def read(path: str, template: str, **params: Any) -> Any:
            response = get(simulator, path, params=params)
            return check(response, template) if valid else response.json()

        org = read(f"{ORGS}{org_id}/", f"{ORGS}{{id}}/")
        assert [o for o in read(ORGS, ORGS) if o["id"] == org_id] == [org]
        page = read(ORGS_V2, ORGS_V2, page_size=200)
        assert [o for o in page["results"] if o["id"] == org_id] == [org]
        billing = get(simulator, BILLING, params={"organization_id": org_id}).json()
        return org, billing

    def fresh() -> dict[str, Any]:
        assert served()[0] == api.organization(org_id)  # the dict is built anew every time
        return served()[1]

    fresh()
    api.set_balance(org_id, "12.34")
    assert fresh()["credits_remaining"] == "12.34"
    api.update_org(org_id, low_credits_threshold="250", name="Renamed Co")
    assert (served()[0]["low_credits_threshold"], served()[0]["name"]) == ("250.00", "Renamed Co")
    api.update_org(org_id, members=[{"name": "New", "email": "new@renamed.example.com"}])
    fresh()
    api.update_org(org_id, is_send_emails_enabled=None)
    assert "is_send_emails_enabled" not in served()[0]
    check(patch(simulator, org_id, json={"notify_low_credits": False}), f"{ORGS}{{id}}/", "patch")
    assert served()[0]["notify_low_credits"] is False
    fresh()
    api.corrupt_organization(org_id, "low_credits_threshold", "abc")
    api.corrupt_billing(org_id, "credits_remaining", None)
    corrupted, billing = served(valid=False)
    assert (corrupted["low_credits_threshold"], billing["credits_remaining"]) == ("abc", None)
    api.clear_corruption()
    assert served()[0]["low_credits_threshold"] == "250.00"
    assert fresh()["credits_remaining"] == "12.34"
    api.remove_org(org_id)
    api.add_org("Reborn", org_id=org_id, credits_remaining="3")
    assert (served()[0]["name"], fresh()["credits_remaining"]) == ("Reborn", "3.00")
    assert get(simulator, BILLING, params={"organization_id": other}).status_code == 200


def test_responses_prepared_ahead_are_the_ones_served_and_still_follow_changes(
    simulator: SimulatorServer,
) -> None:
    api = simulator.api
    org_id = api.org_ids()[0]
    api.corrupt_billing(org_id, "credits_used", "lots")
    api.prepare_responses()
    billing = get(simulator, BILLING, params={"organization_id": org_id}).json()
    assert billing["credits_used"] == "lots"
    for listed in check(get(simulator, ORGS), ORGS):
        assert listed == api.organization(listed["id"])
    api.set_balance(org_id, "1.50")
    api.update_org(org_id, notify_low_credits=False)
    billing = get(simulator, BILLING, params={"organization_id": org_id}).json()
    assert billing["credits_remaining"] == "1.50"
    assert check(get(simulator, ORGS), ORGS)[0]["notify_low_credits"] is False


def test_requests_are_counted_per_endpoint(simulator: SimulatorServer) -> None:
    org_id = simulator.api.org_ids()[0]
    get(simulator, ORGS)
    get(simulator, BILLING, params={"organization_id": org_id})
    get(simulator, BILLING, params={"organization_id": org_id})
    counts = requests.get(f"{simulator.url}/_sim/requests").json()
    assert counts == {"list": 1, "billing": 2}


# ---- generated data -----------------------------------------------------------------------------


def test_generation_is_reproducible_with_the_same_seed() -> None:
    def snapshot(api: SimulatedApi) -> tuple[object, ...]:
        ids = api.org_ids()
        return (
            api.keys(),
            [api.organization(i) for i in ids],
            [api.balance(i) for i in ids],
        )

    assert snapshot(SimulatedApi.generate(40, seed=9)) == snapshot(
        SimulatedApi.generate(40, seed=9)
    )
    assert snapshot(SimulatedApi.generate(40, seed=9)) != snapshot(
        SimulatedApi.generate(40, seed=10)
    )


def test_generated_data_has_the_variety_alerting_needs() -> None:
    api = SimulatedApi.generate(2000, seed=5)
    ids = api.org_ids()
    assert ids[0] == 1 and len(ids) == 2000 and ids[-1] > 2000  # gaps between ids
    orgs = [api.organization(i) for i in ids]
    thresholds = [org.get("low_credits_threshold") for org in orgs]
    below = sum(
        api.balance(o["id"]) < Decimal(t or "1000") for o, t in zip(orgs, thresholds, strict=True)
    )
    assert 0.02 * len(ids) < below < 0.10 * len(ids)
    assert thresholds.count("1000.00") > len(ids) / 2
    assert None in thresholds and any(t not in (None, "1000.00") for t in thresholds)
    assert 0.8 < sum(org["notify_low_credits"] for org in orgs) / len(orgs) < 0.97
    members = [m for org in orgs for m in org["members"]]
    assert {len(org["members"]) for org in orgs} == {1, 2, 3, 4}
    assert {"admin", "member", "view_only"} <= {m["role"] for m in members}
    assert any(m["role"] == "admin" and m.get("is_email_notify_enabled") is False for m in members)
    assert any("is_email_notify_enabled" not in m for m in members)
    assert all(m["user"]["email"].endswith((".example.com", ".test")) for m in members)
    assert len(set(api.keys().values())) == len(ids)
    validator = validator_for(ref("Organization"))
    for org in orgs[:200]:
        validator.validate(org)


# ---- seed file -----------------------------------------------------------------------------


def test_a_seed_file_fills_in_defaults(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(
        json.dumps(
            {
                "token": "seed-token",
                "organizations": [
                    {
                        "id": 37,
                        "name": "Acme Voice",
                        "credits_remaining": "412.50",
                        "low_credits_threshold": "500.00",
                        "api_key": "acme-key",
                        "members": [
                            {"name": "Dana Ops", "email": "dana@acme.example.com"},
                            {"name": "Lee", "email": "lee@acme.test", "role": "member"},
                        ],
                    },
                    {"credits_remaining": 3, "low_credits_threshold": None},
                ],
            }
        )
    )
    api = SimulatedApi.from_seed_file(seed)
    assert api.token == "seed-token"
    assert api.keys()[37] == "acme-key"
    assert api.org_ids() == [37, 38]
    acme = api.organization(37)
    assert (acme["notify_low_credits"], acme["low_credits_threshold"]) == (True, "500.00")
    assert acme["is_send_emails_enabled"] is True
    assert [(m["role"], m["is_email_notify_enabled"]) for m in acme["members"]] == [
        ("admin", True),
        ("member", True),
    ]
    assert api.balance(37) == Decimal("412.50")
    second = api.organization(38)
    assert second["name"] == "Organization 38"
    assert "low_credits_threshold" not in second
    assert [m["role"] for m in second["members"]] == ["admin"]
    assert api.balance(38) == Decimal("3.00")
    assert SimulatedApi.from_seed_file(seed, token="override").token == "override"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not valid JSON"),
        ('{"orgs": []}', "needs an object with an organizations list"),
        ('{"organizations": [{"id": 1}, {"id": 1}]}', "organizations[1]: organization 1 already"),
        (
            '{"organizations": [{"low_credits_threshold": "1.234"}]}',
            "organizations[0]: low_credits_threshold: Ensure that there are no more than 2",
        ),
        ('{"organizations": [{"members": [{"name": "x"}]}]}', "members[0]: name and email"),
        ('{"organizations": [{"credits_remaining": "lots"}]}', "credits_remaining is not a number"),
        ('{"organizations": [{"subscription": "gold"}]}', "subscription must be one of"),
    ],
)
def test_a_bad_seed_file_is_a_one_line_error(tmp_path: Path, content: str, message: str) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(content)
    with pytest.raises(SimulatorError) as error:
        SimulatedApi.from_seed_file(seed)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_seed_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SimulatorError, match="cannot read seed file .*No such file"):
        SimulatedApi.from_seed_file(tmp_path / "absent.json")


# ---- the HTTP server itself --------------------------------------------------------------------


def test_one_connection_serves_many_requests(simulator: SimulatorServer) -> None:
    host, port = simulator.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    local_ports = set()
    for _ in range(3):
        connection.request("GET", BILLING, headers=key_headers(simulator.api, 1))
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Connection") is None
        json.loads(response.read())
        local_ports.add(connection.sock.getsockname()[1])
    connection.close()
    assert len(local_ports) == 1


def test_concurrent_clients_all_get_consistent_answers(simulator: SimulatorServer) -> None:
    api = simulator.api
    ids = api.org_ids()

    def read(index: int) -> tuple[int, int]:
        org_id = ids[index % len(ids)]
        if index % 7 == 0:
            api.set_balance(org_id, Decimal(index))
        with requests.Session() as session:
            for _ in range(10):
                body = session.get(simulator.url + BILLING, headers=key_headers(api, org_id)).json()
                assert body["organization"] == org_id
        return org_id, 10

    with ThreadPoolExecutor(max_workers=8) as pool:
        done = list(pool.map(read, range(40)))
    assert sum(count for _, count in done) == 400
    assert api.request_counts()["billing"] == 400


def test_stopping_closes_idle_keep_alive_connections(sim_api: SimulatedApi) -> None:
    server = SimulatorServer(sim_api).start()
    host, port = server.url.removeprefix("http://").split(":")
    idle = socket.create_connection((host, int(port)), timeout=5)
    request = f"GET {ORGS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SIM_TOKEN}\r\n\r\n"
    idle.sendall(request.encode())
    assert idle.recv(12) == b"HTTP/1.1 200"
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(timeout=5)
    assert not stopper.is_alive()
    idle.settimeout(5)
    while idle.recv(65536):  # the rest of the answer, then end of stream
        pass
    idle.close()


def test_a_port_in_use_is_a_one_line_error(simulator: SimulatorServer) -> None:
    port = int(simulator.url.rsplit(":", 1)[1])
    with pytest.raises(SimulatorError, match=f"cannot listen on 127.0.0.1:{port}"):
        SimulatorServer(SimulatedApi(), port=port).start()


# ---- the usage model over HTTP (the model itself: test_simulator_usage.py) ----------------------

PRECISE_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def test_usage_is_turned_on_read_as_crossings_and_turned_off_over_http(
    simulator: SimulatorServer,
) -> None:
    url = simulator.url
    assert requests.get(f"{url}/_sim/usage", timeout=5).json() == {"enabled": False}
    assert requests.get(f"{url}/_sim/crossings", timeout=5).json() == []
    turned_on = requests.post(f"{url}/_sim/usage", json={"seed": 3, "scale": 100_000}, timeout=5)
    assert turned_on.status_code == 200
    config = turned_on.json()
    assert (config["enabled"], config["seed"], config["scale"]) == (True, 3, 100_000)
    assert PRECISE_TIME.match(config["start"])
    added = requests.post(
        f"{url}/_sim/orgs",
        json={"name": "At Threshold", "credits_remaining": "500.00", "low_credits_threshold": 500},
        timeout=5,
    )
    org_id = added.json()["id"]

    def crossing() -> dict[str, Any] | None:
        crossings = requests.get(f"{url}/_sim/crossings", timeout=5).json()
        return next((c for c in crossings if c["org_id"] == org_id), None)

    deadline = time.monotonic() + 10  # its first active period begins within 3 model days
    while (found := crossing()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found is not None
    assert PRECISE_TIME.match(found["at"]) and found["at"] > config["start"]
    assert (found["threshold"], found["notify_low_credits"], found["cause"]) == (
        "500.00",
        True,
        "usage",
    )
    for each in simulator.api.org_ids():
        billing = check(get(simulator, BILLING, params={"organization_id": each}), BILLING)
        assert Decimal(billing["credits_remaining"]) >= 0
    assert Decimal(simulator.api.billing(org_id)["credits_remaining"]) < 500

    turned_off = requests.delete(f"{url}/_sim/usage", timeout=5)
    assert turned_off.json() == {"enabled": False}
    frozen = get(simulator, BILLING, params={"organization_id": org_id}).json()
    time.sleep(0.05)
    assert get(simulator, BILLING, params={"organization_id": org_id}).json() == frozen
    assert crossing() == found


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[]", "Send {"),
        (b'{"seed": 1}', "Send {"),
        (b'{"seed": 1, "scale": 1, "speed": 2}', "Send {"),
        (b'{"seed": "1", "scale": 1}', "usage seed must be an integer"),
        (b'{"seed": 1, "scale": 0}', "usage scale must be > 0 and <= 100000"),
        (b'{"seed": 1, "scale": 1e9}', "usage scale must be > 0 and <= 100000"),
        (b'{"seed": 1, "scale": 1, "start": "soon"}', "usage start must be an ISO 8601"),
        (b'{"seed": 1, "scale": 1, "start": "2026-08-01T12:00:00"}', "usage start must have a"),
        (b'{"seed": 1, "scale": 1', "JSON parse error"),
    ],
)
def test_a_bad_usage_body_is_a_400_naming_the_problem(
    simulator: SimulatorServer, body: bytes, message: str
) -> None:
    response = requests.post(f"{simulator.url}/_sim/usage", data=body, timeout=5)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith(message) and "\n" not in detail
    assert simulator.api.usage() is None


def test_run_simulator_turns_the_usage_model_on_with_the_seed(tmp_path: Path) -> None:
    process = _start_cli_simulator(tmp_path, usage_scale=500.0)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "usage model on (seed 1, scale 500)" in line
        url = line.split(" at ")[1].split()[0]
        usage = requests.get(f"{url}/_sim/usage", timeout=5).json()
        assert (usage["enabled"], usage["seed"], usage["scale"]) == (True, 1, 500.0)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
    finally:
        process.kill() if process.poll() is None else None
    assert process.returncode == 0


# ---- keys file and run_simulator ---------------------------------------------------------------


def test_the_keys_file_has_one_org_and_key_per_line_and_mode_0600(tmp_path: Path) -> None:
    keys_path = tmp_path / "keys.txt"
    keys_path.write_text("old content\n")
    keys_path.chmod(0o644)
    write_keys_file(keys_path, {9: "sim_b", 2: "sim_a"})
    assert keys_path.read_text() == "2 sim_a\n9 sim_b\n"
    assert stat.S_IMODE(keys_path.stat().st_mode) == 0o600


def _start_cli_simulator(tmp_path: Path, **options: object) -> subprocess.Popen[str]:
    arguments = {
        "orgs": 3,
        "port": 0,
        "token": "cli-token",
        "seed": 1,
        "keys_file": str(tmp_path / "keys.txt"),
        "seed_file": None,
        **options,
    }
    code = f"from poller.devtools.simulator import run_simulator; run_simulator(**{arguments!r})"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_run_simulator_serves_until_a_signal_and_exits_cleanly(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    process = _start_cli_simulator(tmp_path)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "with 3 organizations" in line and "cli-token" not in line
        url = line.split(" at ")[1].split()[0]
        keys_path = tmp_path / "keys.txt"
        assert stat.S_IMODE(keys_path.stat().st_mode) == 0o600
        lines = keys_path.read_text().splitlines()
        assert len(lines) == 3
        org_id, key = lines[0].split(" ")
        billing = requests.get(url + BILLING, headers={"X-CEKURA-API-KEY": key}, timeout=5)
        assert billing.json()["organization"] == int(org_id)
        token_headers = {"Authorization": "Bearer cli-token"}
        assert requests.get(url + ORGS, headers=token_headers, timeout=5).status_code == 200
        process.send_signal(stop_signal)
        out, err = process.communicate(timeout=10)
    finally:
        process.kill() if process.poll() is None else None
    assert process.returncode == 0
    assert "Traceback" not in err
    assert "stopped" in out


def test_run_simulator_reports_a_bad_seed_file_before_serving(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text("[]")
    with pytest.raises(SimulatorError, match="needs an object with an organizations list"):
        run_simulator(orgs=1, port=0, token="t", seed=0, keys_file=None, seed_file=str(seed))


def test_the_repository_copy_of_the_spec_matches_the_shared_one() -> None:
    shared, ours = SPEC_PATHS
    if not shared.exists():
        pytest.skip("no ../shared checkout beside the repository")
    assert json.loads(shared.read_text(encoding="utf-8")) == json.loads(
        ours.read_text(encoding="utf-8")
    )

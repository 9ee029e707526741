"""What the simulator answers: the Cekura API's endpoints and the /_sim/ control endpoints over
requests already read by the server, with the faults applied (docs/simulator.md)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import partial
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit

import structlog

from poller.devtools.simulator.model import (
    Fault,
    SimulatedApi,
    UnknownOrganizationError,
)
from poller.devtools.simulator.records import FieldValidationError, dumps, money_value, timestamp
from poller.devtools.simulator.usage import precise_timestamp

log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


# Named tuples rather than dataclasses for the values made per request: cheapest to build.
class Response(NamedTuple):
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Delayed:
    """An answer a latency fault holds back: ``then()`` makes it once ``seconds`` have passed."""

    seconds: float
    then: Callable[[], Response]


class Request(NamedTuple):
    """A request as the server read it: ``target`` as sent (origin or absolute form)."""

    method: str
    target: str
    headers: Mapping[str, str]  # looked up by lower-case name: the server's are case-blind
    body: bytes = b""


def _json(status: int, body: object, *headers: tuple[str, str]) -> Response:
    return Response(status, dumps(body), headers)


def _detail(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return _json(status, {"detail": message}, *headers)


_NOT_FOUND = _detail(404, "Not found.")
_ORG_NOT_FOUND = _detail(404, "No Organization matches the given query.")
_BILLING_NOT_FOUND = _detail(404, "Billing information not found")
_CHALLENGE = ("WWW-Authenticate", 'Bearer realm="api"')
_NO_CREDENTIALS = _detail(401, "Authentication credentials were not provided.", _CHALLENGE)
_BAD_KEY = _detail(401, "Invalid API key.", _CHALLENGE)
_BAD_TOKEN = _detail(401, "Invalid token.", _CHALLENGE)
DROP = Response(0, b"")  # a marker: close the connection without answering
_ORG_PATH = re.compile(r"^/user/organizations/([^/]+)/$")
_SIM_ORG_PATH = re.compile(r"^/_sim/orgs/(-?\d+)$")
_USAGE_KEYS = frozenset({"seed", "scale", "start"})


class _Caller(NamedTuple):
    """Who is asking: ``org`` is the key's organization, None for the token."""

    org: int | None


_TOKEN_CALLER = _Caller(None)


class ApiHandler:
    """The API and the control endpoints over parsed requests; knows nothing of sockets."""

    def __init__(self, api: SimulatedApi, host_port: str, *, tls: bool = False) -> None:
        self.api = api
        self.host_port = host_port  # for next/previous links when a request has no Host
        self.scheme = "https" if tls else "http"

    def respond(self, request: Request) -> Response | Delayed:
        try:
            return self._respond(request)
        except Exception as exc:  # noqa: BLE001 (answer 500 rather than drop the connection)
            return self._failed(request, exc)

    def _delayed_answer(self, request: Request, *answer: Any) -> Response:
        try:
            return self._answer(request, *answer)
        except Exception as exc:  # noqa: BLE001 (as in respond)
            return self._failed(request, exc)

    @staticmethod
    def _failed(request: Request, exc: Exception) -> Response:
        log.exception("simulator.error", method=request.method, path=_split(request.target)[0])
        return _detail(500, f"Simulator error: {type(exc).__name__}")

    def _respond(self, request: Request) -> Response | Delayed:
        api = self.api
        method = request.method
        path, query_string = _split(request.target)
        if path.startswith("/_sim/"):
            return self._control(method, path, request.body)
        query = _query(query_string)

        allowed: tuple[str, ...] = ("GET",)
        path_org = None
        if path == "/test_framework/billing/info/":
            endpoint = "billing"
        elif path == "/user/organizations/":
            endpoint = "list"
        elif path == "/user/v2/organizations/" and api.v2_enabled:
            endpoint = "list_v2"
        elif match := _ORG_PATH.match(path):
            endpoint, allowed = ("patch" if method == "PATCH" else "retrieve"), ("GET", "PATCH")
            path_org = _int_or_none(match.group(1))
        else:
            return _NOT_FOUND
        if method not in allowed:
            return _detail(405, f'Method "{method}" not allowed.', ("Allow", ", ".join(allowed)))

        caller = self._caller(request.headers)
        fault_org = self._fault_org(endpoint, caller, path_org, query)
        delay, fault = api.take_faults(endpoint, fault_org)
        if delay:
            # Only this connection waits: the server goes on serving the others meanwhile.
            answer = (endpoint, caller, path_org, query, path, fault)
            return Delayed(delay, partial(self._delayed_answer, request, *answer))
        return self._answer(request, endpoint, caller, path_org, query, path, fault)

    def _answer(
        self,
        request: Request,
        endpoint: str,
        caller: _Caller | Response,
        path_org: int | None,
        query: dict[str, str],
        path: str,
        fault: Fault | None,
    ) -> Response:
        api = self.api
        if fault is not None and fault.kind != "malformed":
            return _fault_response(fault)
        if not isinstance(caller, _Caller):
            response = caller
        elif endpoint == "billing":
            response = self._billing(caller, query)
        elif endpoint == "list":
            bodies = api.list_bodies(caller.org, query.get("search"))[1]
            response = Response(200, b"[" + b",".join(bodies) + b"]")
        elif endpoint == "list_v2":
            response = self._list_v2(request, caller, query, path)
        elif path_org is None or not api.visible(caller.org, path_org):
            response = _ORG_NOT_FOUND
        elif endpoint == "patch":
            response = self._patch(path_org, request)
        else:
            response = self._organization(path_org)
        if fault is not None:  # malformed: the request took effect, the answer is cut short
            return Response(200, response.body[: len(response.body) // 2], response.headers)
        return response

    def _caller(self, headers: Mapping[str, str]) -> _Caller | Response:
        api = self.api
        key = headers.get("x-cekura-api-key")
        if key is not None:
            org = api.org_for_key(key.strip())
            return _BAD_KEY if org is None else _Caller(org)
        scheme, _, credential = (headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return _NO_CREDENTIALS
        return _TOKEN_CALLER if credential.strip() == api.token else _BAD_TOKEN

    @staticmethod
    def _fault_org(
        endpoint: str, caller: _Caller | Response, path_org: int | None, query: dict[str, str]
    ) -> int | None:
        key_org = caller.org if isinstance(caller, _Caller) else None
        if endpoint in ("retrieve", "patch"):
            return path_org
        if endpoint == "billing" and key_org is None:
            return _int_or_none(query.get("organization_id"))
        return key_org

    def _billing(self, caller: _Caller, query: dict[str, str]) -> Response:
        raw = query.get("organization_id")
        requested = _int_or_none(raw)
        if raw is not None and requested is None:
            return _detail(400, "organization_id must be an integer.")
        if caller.org is None and requested is None:
            return _detail(
                400, "organization_id is required when authenticating with a bearer token."
            )
        org_id = caller.org if caller.org is not None else requested
        if org_id is None or (requested is not None and requested != org_id):
            return _BILLING_NOT_FOUND
        try:
            return Response(200, self.api.billing_body(org_id))
        except UnknownOrganizationError:
            return _BILLING_NOT_FOUND

    def _list_v2(
        self, request: Request, caller: _Caller, query: dict[str, str], path: str
    ) -> Response:
        api = self.api
        page_size = _positive_int(query.get("page_size"))
        page_size = min(page_size, MAX_PAGE_SIZE) if page_size else DEFAULT_PAGE_SIZE
        count, _ = api.list_bodies(caller.org, query.get("search"), 0, 0)
        pages = max(1, -(-count // page_size))
        raw_page = query.get("page", "1")
        page = pages if raw_page == "last" else _positive_int(raw_page)
        if page is None or page > pages:
            return _detail(404, "Invalid page.")
        start = (page - 1) * page_size
        count, results = api.list_bodies(caller.org, query.get("search"), start, start + page_size)
        base = f"{self.scheme}://{request.headers.get('host') or self.host_port}{path}"
        envelope = dumps(
            {
                "count": count,
                "next": _page_url(base, query, page + 1) if page < pages else None,
                "previous": _page_url(base, query, page - 1) if page > 1 else None,
                "results": [],
            }
        )
        # The organizations' JSON is cached as bytes: splice it in where "[]}" ends the envelope.
        return Response(200, envelope[:-2] + b",".join(results) + b"]}")

    def _organization(self, org_id: int) -> Response:
        try:
            return Response(200, self.api.organization_body(org_id))
        except UnknownOrganizationError:  # removed between the visibility check and now
            return _ORG_NOT_FOUND

    def _patch(self, org_id: int, request: Request) -> Response:
        data = self._parse_body(request)
        if isinstance(data, Response):
            return data
        if not isinstance(data, dict):
            kind = "list" if isinstance(data, list) else type(data).__name__
            return _json(
                400, {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {kind}."]}
            )
        try:
            return _json(200, self.api.patch(org_id, data))
        except FieldValidationError as exc:
            return _json(400, exc.errors)
        except UnknownOrganizationError:
            return _ORG_NOT_FOUND

    @staticmethod
    def _parse_body(request: Request) -> object:
        body = request.body
        if not body:
            return {}
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if content_type == "application/json" or content_type.endswith("+json"):
            try:
                return json.loads(body, parse_float=Decimal)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return _detail(400, f"JSON parse error - {exc}")
        if content_type == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            return {name: values[-1] for name, values in form.items()}
        return _detail(415, f'Unsupported media type "{content_type}" in request.')

    # ---- /_sim/ control endpoints ----------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> Response:
        api = self.api
        data: object = {}
        if body:
            try:
                data = json.loads(body, parse_float=Decimal)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return _detail(400, f"JSON parse error - {exc}")
        try:
            if path == "/_sim/faults" and method == "POST":
                api.add_fault(Fault.from_json(data))
                return _json(201, {"faults": len(api.faults())})
            if path == "/_sim/faults" and method == "DELETE":
                return _json(200, {"cleared": api.clear_faults()})
            if path == "/_sim/history" and method == "GET":
                return _json(200, _history_json(api.balance_history()))
            if path == "/_sim/requests" and method == "GET":
                return _json(200, api.request_counts())
            if path == "/_sim/settings" and method == "POST":
                return self._settings(data)
            if path == "/_sim/crossings" and method == "GET":
                return _json(200, [crossing.to_json() for crossing in api.crossings()])
            if path == "/_sim/usage":
                return self._usage(method, data)
            if path == "/_sim/orgs" and method == "POST":
                return self._add_org(data)
            if match := _SIM_ORG_PATH.match(path):
                org_id = int(match.group(1))
                if method == "DELETE":
                    api.remove_org(org_id)
                    return _json(200, {"removed": org_id})
                if method == "POST":
                    return self._change_org(org_id, data)
        except UnknownOrganizationError:
            return _ORG_NOT_FOUND
        except FieldValidationError as exc:
            return _json(400, exc.errors)
        except (ValueError, TypeError) as exc:
            return _detail(400, str(exc))
        return _NOT_FOUND

    def _settings(self, data: object) -> Response:
        if not isinstance(data, dict) or not isinstance(data.get("v2_enabled"), bool):
            return _detail(400, 'Send {"v2_enabled": true|false}.')
        self.api.v2_enabled = data["v2_enabled"]
        return _json(200, {"v2_enabled": self.api.v2_enabled})

    def _usage(self, method: str, data: object) -> Response:
        api = self.api
        if method == "POST":
            if not isinstance(data, dict) or not {"seed", "scale"} <= data.keys() <= _USAGE_KEYS:
                return _detail(
                    400,
                    'Send {"seed": <integer>, "scale": <number>, "start": <ISO 8601, optional>}.',
                )
            scale = data["scale"]
            if isinstance(scale, Decimal):  # a JSON number with a fraction; not money
                scale = float(scale)
            api.enable_usage(seed=data["seed"], scale=scale, start=_instant(data.get("start")))
        elif method == "DELETE":
            api.disable_usage()
        elif method != "GET":
            return _detail(405, f'Method "{method}" not allowed.', ("Allow", "GET, POST, DELETE"))
        usage = api.usage()
        if usage is None:
            return _json(200, {"enabled": False})
        return _json(
            200,
            {
                "enabled": True,
                "seed": usage.seed,
                "scale": usage.scale,
                "start": precise_timestamp(usage.start),
            },
        )

    def _add_org(self, data: object) -> Response:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return _detail(400, "Send an organization object with a name.")
        spec = dict(data)
        api = self.api
        org_id = api.add_org(spec.pop("name"), org_id=spec.pop("id", None), **spec)
        return _json(201, {"id": org_id, "api_key": api.keys()[org_id]})

    def _change_org(self, org_id: int, data: object) -> Response:
        if not isinstance(data, dict):
            return _detail(400, "Send an object of organization fields.")
        api = self.api
        changes = dict(data)
        balance = changes.pop("credits_remaining", None)
        if balance is not None:
            money_value(balance, "credits_remaining")  # reject before changing anything
        if changes:
            api.update_org(org_id, **changes)
        if balance is not None:
            api.set_balance(org_id, balance)
        return _json(
            200, {"organization": api.organization(org_id), "billing": api.billing(org_id)}
        )


def _fault_response(fault: Fault) -> Response:
    if fault.kind == "drop":
        return DROP
    if fault.kind == "rate_limit":
        return _detail(
            429,
            f"Request was throttled. Expected available in {fault.retry_after} seconds.",
            ("Retry-After", str(fault.retry_after)),
        )
    return _detail(fault.status, f"Simulated {fault.status} {HTTPStatus(fault.status).phrase}.")


def _instant(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        with suppress(ValueError):
            return datetime.fromisoformat(value)
    raise ValueError("usage start must be an ISO 8601 date and time, or null")


def _history_json(history: list[tuple[datetime, int, Decimal]]) -> list[dict[str, Any]]:
    return [
        {"at": timestamp(at), "organization": org_id, "credits_remaining": str(balance)}
        for at, org_id, balance in history
    ]


def _split(target: str) -> tuple[str, str]:
    """(path, query) of a request target, as urlsplit gives them."""
    if target[:1] == "/" and target[:2] != "//" and "#" not in target:
        path, _, query = target.partition("?")  # the usual target, without urlsplit's cost
        return path, query
    if target.startswith("//"):
        # As http.server does: //host/x would read as a host to urlsplit.
        target = "/" + target.lstrip("/")
    url = urlsplit(target)  # also absolute-form targets, as a client sends through a proxy
    return url.path, url.query


def _query(text: str) -> dict[str, str]:
    """parse_qs(keep_blank_values=True) with the last of a repeated name winning; parse_qs
    itself only when something needs decoding."""
    if "%" in text or "+" in text:
        return {name: values[-1] for name, values in parse_qs(text, keep_blank_values=True).items()}
    query = {}
    for field in text.split("&"):
        if field:
            name, _, value = field.partition("=")
            query[name] = value
    return query


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _positive_int(text: str | None) -> int | None:
    number = _int_or_none(text)
    return number if number is not None and number > 0 else None


def _page_url(base: str, query: dict[str, str], page: int) -> str:
    """DRF's replace_query_param / remove_query_param: sorted parameters, no page=1."""
    params = {name: value for name, value in query.items() if name != "page"}
    if page > 1:
        params["page"] = str(page)
    encoded = urlencode(sorted(params.items()))
    return f"{base}?{encoded}" if encoded else base

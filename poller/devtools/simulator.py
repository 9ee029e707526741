"""A stand-in for the Cekura API: a real HTTP server for tests, the demo, benchmarks and trying
poller without a Cekura account (``poller simulate``).

It serves the four operations poller uses, with the shapes of Cekura's published OpenAPI spec
(see docs: cekura-api.md) and Django REST Framework's error conventions.

Authentication
--------------
* ``X-CEKURA-API-KEY: <key>``: an org-scoped key; every organization has exactly one. The key
  sees only its own organization. When both headers are sent, the API key wins.
* ``Authorization: Bearer <token>``: one token that administers every organization.
* Missing credentials: 401 ``{"detail": "Authentication credentials were not provided."}``;
  unknown key: 401 ``{"detail": "Invalid API key."}``; unknown token: 401
  ``{"detail": "Invalid token."}``.

API endpoints (paths need their trailing slash; without it they are 404)
------------------------------------------------------------------------
* ``GET /user/organizations/[?search=]``: bare JSON array of Organization, ordered by id.
  ``search`` keeps organizations whose name contains every whitespace-separated term
  (case-insensitive), like DRF's SearchFilter.
* ``GET /user/v2/organizations/[?page=&page_size=&search=]``: ``{count, next, previous,
  results}``. Default page_size 50, maximum 200 (larger values are clamped, invalid ones
  fall back to the default, as DRF does). ``next``/``previous`` are absolute URLs built from
  the request's Host header. A page that is not a positive integer within range (or ``last``)
  is 404 ``{"detail": "Invalid page."}``. With ``v2_enabled`` false the path is 404 Not found,
  so a client's fallback to the v1 list can be tested.
* ``GET /user/organizations/{id}/``: Organization; 404 ``{"detail": "No Organization matches
  the given query."}`` for an unknown id or one the caller may not see.
* ``PATCH /user/organizations/{id}/``: JSON or form-urlencoded body with any writable field,
  validated like DRF (``low_credits_threshold`` etc. as DecimalField(max_digits=10,
  decimal_places=2); booleans as BooleanField; ``cronjob_low_balance_mute_days`` etc. as
  ChoiceField). Field errors are 400 ``{"<field>": ["message"]}``. Read-only and unknown
  fields, ``timezone`` and the write-only provider keys are accepted and ignored. Returns the
  full updated Organization with decimals as ``"500.00"`` strings.
* ``GET /test_framework/billing/info/``: BillingInfo.
  - org-scoped key: the key's organization. ``organization_id`` may be omitted; if it names a
    *different* organization the answer is 404 "Billing information not found" (a client that
    mixes up keys and ids then fails loudly instead of reading the wrong balance).
  - bearer token: ``organization_id`` is required; missing or not an integer is 400
    ``{"detail": ...}``; unknown is 404 ``{"detail": "Billing information not found"}``.
* Any other path is 404 ``{"detail": "Not found."}``; a known path with the wrong method is
  405 with an ``Allow`` header.

Control endpoints (no authentication; the server binds 127.0.0.1 by default)
---------------------------------------------------------------------------
* ``POST /_sim/orgs`` ``{"name": ..., <seed-file organization fields>}`` → 201
  ``{"id": ..., "api_key": ...}``.
* ``POST /_sim/orgs/{id}`` ``{"credits_remaining": "12.00", "notify_low_credits": false,
  "low_credits_threshold": "500.00", "members": [...], ...}`` → 200 ``{"organization": {...},
  "billing": {...}}``. Any Organization field may be set; ``null`` on a non-nullable field
  makes the API leave that field out (to exercise a client's defaults).
* ``DELETE /_sim/orgs/{id}`` → 200 ``{"removed": id}``.
* ``POST /_sim/faults`` with a Fault as JSON (``{"kind": "status", "status": 503, "times": 1,
  "org_id": 7, "endpoint": "billing"}``) → 201 ``{"faults": <active count>}``.
* ``DELETE /_sim/faults`` → 200 ``{"cleared": <count>}``.
* ``GET /_sim/history`` → ``[{"at": "...Z", "organization": id, "credits_remaining": "..."}]``,
  every balance an organization has had, oldest first (its starting balance first).
* ``GET /_sim/requests`` → ``{"billing": 12, "list_v2": 3, ...}`` API requests served, by endpoint.
* ``POST /_sim/settings`` ``{"v2_enabled": false}`` → 200 ``{"v2_enabled": false}``.

Faults
------
``Fault(kind, org_id=None, endpoint=None, status=503, retry_after=1, seconds=0.0, times=None)``.
``endpoint`` is one of ``list``, ``list_v2``, ``retrieve``, ``patch``, ``billing`` (None: any);
``org_id`` None makes the fault global, otherwise it matches requests about that organization
(the path id, the billing organization, or the organization of the API key on a list).
``times`` None lasts until cleared; N applies to the next N matching requests. Kinds:

* ``latency``: waits ``seconds`` before answering (adds to any other fault that matches);
* ``status``: answers ``status`` with ``{"detail": "Simulated <status> <reason>."}``;
* ``rate_limit``: 429 ``{"detail": "Request was throttled. Expected available in N seconds."}``
  with ``Retry-After: N``;
* ``malformed``: serves the request, then sends 200 with only the first half of the body;
* ``drop``: closes the connection without any response.

HTTP
----
HTTP/1.1 with keep-alive (HTTP/1.0 only with ``Connection: keep-alive``) and pipelining, read
as http.server reads it. A request body needs a Content-Length of at most 1,000,000 bytes: a
chunked body is 411, a bad length 400. A bad request line is 400 (an HTTP version of 2 or more
505), an unknown method 501, a request line over 64 KiB 414, more than 100 header lines or one
over 64 KiB 431; these answers are DRF-style JSON too, and the connection is closed after them.
One thread serves every connection (a non-blocking selector loop): latency delays only the
connection it applies to. ``SimulatorServer(ssl_context=...)`` serves https.

Seed file (``--seed-file``)
---------------------------
::

    {"token": "sim-token",
     "organizations": [
       {"id": 1, "name": "Acme Voice", "credits_remaining": "412.50",
        "notify_low_credits": true, "low_credits_threshold": "500.00",
        "is_send_emails_enabled": true, "api_key": "optional",
        "subscription": "active",
        "members": [{"name": "Dana Ops", "email": "dana@acme.example.com", "role": "admin",
                     "is_email_notify_enabled": true}]}]}

Every field but ``organizations`` is optional: ``id`` counts up from 1, ``name`` is
"Organization <id>", ``credits_remaining`` "0.00", ``notify_low_credits`` true,
``low_credits_threshold`` "1000.00", ``api_key`` random, ``subscription`` (active, trial,
expired, inactive) active, ``members`` one admin, a member's ``role`` admin and
``is_email_notify_enabled`` true. Any other writable Organization field may be given too.
``null`` on a non-nullable field leaves that field out of API responses.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import random
import re
import secrets
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache, partial
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit

import structlog

log = structlog.get_logger(__name__)

DEFAULT_TOKEN = "sim-token"
DEFAULT_THRESHOLD = "1000.00"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
ENDPOINTS = ("list", "list_v2", "retrieve", "patch", "billing")
FAULT_KINDS = ("latency", "status", "rate_limit", "malformed", "drop")
SUBSCRIPTIONS = ("active", "trial", "expired", "inactive")
ROLES = ("admin", "member", "view_only", "internal_view", "labs", "labs_view_only", "insights_view")

_CENT = Decimal("0.01")
_MAX_BODY = 1_000_000

# The Organization fields other than id, name, members, projects and timestamps, in spec order.
_ORG_DEFAULTS: dict[str, Any] = {
    "team_size": "<10",
    "discovery_source": None,
    "outbound_timeout": 30,
    "max_agents_limit": 5,
    "max_members_limit": 10,
    "max_concurrent_runs_limit": 5,
    "max_concurrent_chat_runs_limit": 5,
    "max_call_duration": 600,
    "evaluate_relevant_metrics_enabled": False,
    "end_call_enabled": True,
    "generate_scenario_auto_assign_numbers_enabled": False,
    "show_custom_dashboards": False,
    "notify_daily_report": False,
    "notify_cron_failure": True,
    "notify_cron_success": False,
    "notify_no_calls": False,
    "notify_result_webhook": False,
    "notify_cronjob_webhook": False,
    "notify_call_log_webhook": False,
    "forward_vapi_webhook": False,
    "forward_retell_webhook": False,
    "is_send_emails_enabled": True,
    "notify_frequent_calls_for_number": False,
    "frequent_calls_threshold": 10,
    "frequent_calls_time_period": 60,
    "frequent_calls_cooldown": 60,
    "notify_metric_significant_shift": False,
    "notify_low_credits": True,
    "low_credits_threshold": DEFAULT_THRESHOLD,
    "cronjob_low_balance_mute_days": "0",
    "limit_to_exclusive_numbers": False,
    "allow_duplicate_call_ids": False,
    "allow_join_requests": False,
    "conditional_actions_generation_enabled": False,
    "vapi_api_key_configured": "false",
    "vapi_public_key_configured": "false",
    "retell_api_key_configured": "false",
    "syntflow_api_key_configured": "false",
    "is_internal_view_only": False,
    "timezone": "UTC",
    "is_2fa_required": False,
    "skip_onboarding": False,
    "onboarding_flow": "simulation",
    "user_onboarding": "completed",
    "phone_number_verified": False,
    "slack_invite_sent": False,
    "auto_refill": False,
    "auto_refill_threshold": "0.00",
    "auto_refill_amount": "0.00",
    "auto_refill_max_cap": None,
}

_BOOLEAN_FIELDS = frozenset(
    {
        "evaluate_relevant_metrics_enabled",
        "end_call_enabled",
        "generate_scenario_auto_assign_numbers_enabled",
        "notify_daily_report",
        "notify_cron_failure",
        "notify_cron_success",
        "notify_no_calls",
        "notify_result_webhook",
        "notify_cronjob_webhook",
        "notify_call_log_webhook",
        "forward_vapi_webhook",
        "forward_retell_webhook",
        "is_send_emails_enabled",
        "notify_frequent_calls_for_number",
        "notify_metric_significant_shift",
        "notify_low_credits",
        "limit_to_exclusive_numbers",
        "allow_duplicate_call_ids",
        "allow_join_requests",
        "conditional_actions_generation_enabled",
        "is_2fa_required",
        "skip_onboarding",
        "auto_refill",
    }
)
_INTEGER_FIELDS = frozenset(
    {
        "outbound_timeout",
        "max_concurrent_runs_limit",
        "max_concurrent_chat_runs_limit",
        "max_call_duration",
        "frequent_calls_threshold",
        "frequent_calls_time_period",
        "frequent_calls_cooldown",
    }
)
_DECIMAL_FIELDS = frozenset(
    {"low_credits_threshold", "auto_refill_threshold", "auto_refill_amount", "auto_refill_max_cap"}
)
_CHOICE_FIELDS: dict[str, tuple[str, ...]] = {
    "team_size": ("1", "<10", "10-100", "100-500", "500+"),
    "cronjob_low_balance_mute_days": ("0", "3", "7", "14"),
    "onboarding_flow": ("simulation", "observability"),
}
_NULLABLE_FIELDS = frozenset({"auto_refill_max_cap", "discovery_source"})
# Writable in the real API but not modelled here; accepting them keeps PATCH bodies from failing.
_IGNORED_WRITABLE_FIELDS = frozenset(
    {"timezone", "vapi_api_key", "retell_api_key", "syntflow_api_key"}
)

# DRF BooleanField's accepted spellings.
_TRUE_VALUES = frozenset(
    {"t", "T", "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON", "1", 1}
)
_FALSE_VALUES = frozenset(
    {"f", "F", "n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF", "0", 0}
)
_INTEGER_SUFFIX = re.compile(r"\.0*\s*$")
_INT32 = (-2147483648, 2147483647)


class SimulatorError(Exception):
    """A problem starting the simulator (bad seed file, port in use); the message is one line."""


class UnknownOrganizationError(LookupError):
    """The simulator has no organization with this id."""

    def __init__(self, org_id: object) -> None:
        super().__init__(f"no organization with id {org_id}")
        self.org_id = org_id


class FieldValidationError(ValueError):
    """Invalid organization fields; ``errors`` is the DRF-shaped body ``{field: [messages]}``."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in errors.items()))
        self.errors = errors


@dataclass(frozen=True)
class Fault:
    """A misbehaviour injected into matching API requests (see the module docstring)."""

    kind: str
    org_id: int | None = None
    endpoint: str | None = None
    status: int = 503
    retry_after: int = 1
    seconds: float = 0.0
    times: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(FAULT_KINDS)}")
        if self.endpoint is not None and self.endpoint not in ENDPOINTS:
            raise ValueError(f"fault endpoint must be one of {', '.join(ENDPOINTS)} or null")
        if self.org_id is not None and not _is_int(self.org_id):
            raise ValueError("fault org_id must be an integer or null")
        if not _is_int(self.status) or not 400 <= self.status <= 599:
            raise ValueError("fault status must be an HTTP error status (400-599)")
        if not _is_int(self.retry_after) or self.retry_after < 0:
            raise ValueError("fault retry_after must be a whole number of seconds >= 0")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int | float):
            raise ValueError("fault seconds must be a number")
        if self.seconds < 0:
            raise ValueError("fault seconds must be >= 0")
        if self.times is not None and (not _is_int(self.times) or self.times < 1):
            raise ValueError("fault times must be a positive integer or null")

    @classmethod
    def from_json(cls, data: object) -> Fault:
        """Build a Fault from decoded JSON, raising ValueError with a one-line message."""
        if not isinstance(data, dict):
            raise ValueError("a fault must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        if "kind" not in data:
            raise ValueError("a fault needs a kind")
        values = dict(data)
        if isinstance(values.get("seconds"), Decimal):
            # Sleep durations are not money; JSON numbers arrive as Decimal here.
            values["seconds"] = float(values["seconds"])
        return cls(**values)


class _ActiveFault:
    __slots__ = ("fault", "remaining")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.remaining = fault.times


@dataclass(frozen=True, slots=True)
class _Member:
    membership_id: int
    user_id: int
    name: str
    email: str
    role: str
    email_notify: bool | None  # None: the API leaves the field out
    created_at: str

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.membership_id,
            "user": {"id": self.user_id, "name": self.name, "email": self.email},
            "role": self.role,
        }
        if self.email_notify is not None:
            body["is_email_notify_enabled"] = self.email_notify
        body["created_at"] = self.created_at
        body["updated_at"] = self.created_at
        return body


class _OrgRecord:
    """One organization's state; settings hold only what differs from _ORG_DEFAULTS."""

    __slots__ = (
        "id",
        "name",
        "settings",
        "omitted",
        "members",
        "created_at",
        "updated_at",
        "key",
        "balance",
        "credits_used",
        "initial_balance",
        "balance_expiry",
        "subscription",
        "billing_updated_at",
        # The JSON served for this record, built on first use and dropped on every change:
        # serialising an Organization costs more than the rest of a list request per org.
        "org_json",
        "billing_json",
    )

    def __init__(
        self,
        *,
        org_id: int,
        name: str,
        settings: dict[str, Any],
        omitted: frozenset[str],
        members: tuple[_Member, ...],
        created_at: str,
        key: str,
        balance: Decimal,
        credits_used: Decimal,
        initial_balance: Decimal,
        balance_expiry: str | None,
        subscription: str,
    ) -> None:
        self.id = org_id
        self.name = name
        self.settings = settings
        self.omitted = omitted
        self.members = members
        self.created_at = created_at
        self.updated_at = created_at
        self.key = key
        self.balance = balance
        self.credits_used = credits_used
        self.initial_balance = initial_balance
        self.balance_expiry = balance_expiry
        self.subscription = subscription
        self.billing_updated_at = created_at
        self.org_json: bytes | None = None
        self.billing_json: bytes | None = None

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "name": self.name, **_ORG_DEFAULTS}
        body.update(self.settings)
        for name in self.omitted:
            del body[name]
        body["members"] = [member.payload() for member in self.members]
        body["projects"] = []
        body["created_at"] = self.created_at
        body["updated_at"] = self.updated_at
        return body


_BILLING_TEMPLATE = (
    '{"organization":%d,"credits_remaining":"%s","credits_used":"%s","initial_balance":"%s",'
    '"balance_expiry":%s,"subscription_status":%s,"created_at":"%s","updated_at":"%s"}'
)


class SimulatedApi:
    """The simulator's data: organizations, balances, keys, faults. Every method is thread-safe."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        v2_enabled: bool = True,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.token = token
        # A plain attribute: flipping it at any time is safe, a bool assignment is atomic.
        self.v2_enabled = v2_enabled
        self._clock = clock or _utc_now
        self._lock = threading.Lock()
        self._orgs: dict[int, _OrgRecord] = {}
        self._org_by_key: dict[str, int] = {}
        self._sorted_ids: list[int] | None = []
        self._faults: list[_ActiveFault] = []
        self._history: list[tuple[datetime, int, Decimal]] = []
        # Test-only raw values served in place of validated ones (see corrupt_organization).
        self._raw_org_fields: dict[int, dict[str, Any]] = {}
        self._raw_billing_fields: dict[int, dict[str, Any]] = {}
        # Test-only whole bodies served verbatim (see serve_raw_organization).
        self._raw_org_bodies: dict[int, bytes] = {}
        self._raw_billing_bodies: dict[int, bytes] = {}
        self._request_counts: Counter[str] = Counter()
        self._next_member_id = 1
        self._subscriptions = _subscription_variants(self._clock())

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def generate(
        cls, orgs: int, seed: int = 0, token: str = DEFAULT_TOKEN, **options: Any
    ) -> SimulatedApi:
        """``orgs`` random but reproducible organizations (same seed, same data and keys).

        Ids start at 1 and then leave random gaps.

        ``options`` go to the constructor (``v2_enabled``, ``clock``).
        """
        if orgs < 0:
            raise ValueError("the number of organizations must be >= 0")
        api = cls(token=token, **options)
        rng = random.Random(seed)
        used_names: set[str] = set()
        org_id = 1
        with api._lock:
            for _ in range(orgs):
                api._insert(_generated_org(rng, org_id, used_names, api))
                # Gaps between ids catch clients that confuse positions with ids.
                org_id += rng.randint(1, 3)
        return api

    @classmethod
    def from_seed_file(
        cls, path: str | os.PathLike[str], *, token: str | None = None, **options: Any
    ) -> SimulatedApi:
        """Organizations from a JSON seed file (format in the module docstring).

        ``token`` overrides the file's token. Raises SimulatorError with a one-line message.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"), parse_float=Decimal)
        except OSError as exc:
            raise SimulatorError(f"cannot read seed file {path}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SimulatorError(f"seed file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("organizations"), list):
            raise SimulatorError(f"seed file {path} needs an object with an organizations list")
        file_token = data.get("token")
        if file_token is not None and (not isinstance(file_token, str) or not file_token):
            raise SimulatorError(f"seed file {path}: token must be a non-empty string")
        api = cls(token=token or file_token or DEFAULT_TOKEN, **options)
        next_id = 1
        for index, entry in enumerate(data["organizations"]):
            where = f"seed file {path}: organizations[{index}]"
            if not isinstance(entry, dict):
                raise SimulatorError(f"{where} must be an object")
            spec = dict(entry)
            org_id = spec.pop("id", next_id)
            try:
                added = api.add_org(
                    spec.pop("name", f"Organization {org_id}"), org_id=org_id, **spec
                )
            except (ValueError, TypeError) as exc:
                raise SimulatorError(f"{where}: {exc}") from None
            next_id = added + 1
        return api

    def add_org(
        self,
        name: str,
        *,
        org_id: int | None = None,
        credits_remaining: Decimal | str | int = "0.00",
        api_key: str | None = None,
        members: Iterable[Mapping[str, Any]] | None = None,
        subscription: str = "active",
        **fields: Any,
    ) -> int:
        """Add an organization and return its id.

        ``fields`` are writable Organization fields (validated like a PATCH); None on a
        non-nullable one leaves it out of API responses. ``members`` are
        ``{"name", "email", "role", "is_email_notify_enabled"}`` mappings; None gives one admin.
        """
        if org_id is not None and not _is_int(org_id):
            raise ValueError("id must be an integer")
        if subscription not in SUBSCRIPTIONS:
            raise ValueError(f"subscription must be one of {', '.join(SUBSCRIPTIONS)}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be a non-empty string")
        balance = _money_value(credits_remaining, "credits_remaining")
        settings, omitted = _validated_settings({"name": name, **fields}, trusted=True)
        org_name = settings.pop("name")
        now = _timestamp(self._clock())
        with self._lock:
            if org_id is None:
                org_id = max(self._orgs, default=0) + 1
            if org_id in self._orgs:
                raise ValueError(f"organization {org_id} already exists")
            key = api_key or f"sim_{secrets.token_hex(16)}"
            if key in self._org_by_key:
                raise ValueError("api_key is already used by another organization")
            if members is None:
                members = [{"name": "Admin", "email": f"admin@org-{org_id}.example.com"}]
            record = _OrgRecord(
                org_id=org_id,
                name=org_name,
                settings=settings,
                omitted=frozenset(omitted),
                members=self._members_from_specs(members, now),
                created_at=now,
                key=key,
                balance=balance,
                credits_used=Decimal("0.00"),
                initial_balance=max(balance, Decimal("0.00")),
                balance_expiry=None,
                subscription=self._subscriptions[subscription],
            )
            self._insert(record)
        return org_id

    def remove_org(self, org_id: int) -> None:
        """Delete an organization; its API key stops working."""
        with self._lock:
            record = self._record(org_id)
            del self._orgs[org_id]
            del self._org_by_key[record.key]
            self._sorted_ids = None

    # ---- state changes --------------------------------------------------------------------

    def set_balance(self, org_id: int, amount: Decimal | str | int) -> None:
        """Set credits_remaining; a drop is added to credits_used, as real usage would be."""
        balance = _money_value(amount, "credits_remaining")
        now = self._clock()
        with self._lock:
            record = self._record(org_id)
            if balance < record.balance:
                record.credits_used += record.balance - balance
            record.balance = balance
            record.billing_updated_at = _timestamp(now)
            record.billing_json = None
            self._history.append((now, org_id, balance))

    def update_org(self, org_id: int, **fields: Any) -> None:
        """Change Organization fields as the owner would (validated like a PATCH).

        Also accepts ``name`` and ``members`` (see add_org); None on a non-nullable field
        leaves it out of API responses; unknown field names raise FieldValidationError.
        """
        member_specs = fields.pop("members", None)
        settings, omitted = _validated_settings(fields, trusted=True)
        with self._lock:
            record = self._record(org_id)
            now = _timestamp(self._clock())
            if member_specs is not None:
                record.members = self._members_from_specs(member_specs, now)
            self._apply(record, settings, now)
            record.omitted = (record.omitted - settings.keys()) | omitted

    def corrupt_organization(self, org_id: int, field: str, raw_value: Any) -> None:
        """Test-only: serve ``raw_value`` (any JSON value, never validated) as ``field`` of the
        organization's Organization JSON, e.g. ``low_credits_threshold="abc"``, until
        clear_corruption(). A real API would not do this; a client must survive it anyway."""
        with self._lock:
            self._record(org_id).org_json = None
            self._raw_org_fields.setdefault(org_id, {})[field] = raw_value

    def corrupt_billing(self, org_id: int, field: str, raw_value: Any) -> None:
        """Test-only: like corrupt_organization, for the BillingInfo JSON (e.g.
        ``credits_remaining=None``)."""
        with self._lock:
            self._record(org_id).billing_json = None
            self._raw_billing_fields.setdefault(org_id, {})[field] = raw_value

    def serve_raw_organization(self, org_id: int, body: bytes) -> None:
        """Test-only: serve ``body``, exactly these bytes, as the organization's whole
        Organization JSON (its element of the listings, and its retrieve answer) until
        clear_corruption(): any JSON value, any shape, ids included. The caller makes it one
        JSON value, or every listing page that holds it stops being JSON."""
        with self._lock:
            self._record(org_id).org_json = None
            self._raw_org_bodies[org_id] = bytes(body)

    def serve_raw_billing(self, org_id: int, body: bytes) -> None:
        """Test-only: serve ``body``, exactly these bytes, as the organization's BillingInfo
        answer until clear_corruption()."""
        with self._lock:
            self._record(org_id).billing_json = None
            self._raw_billing_bodies[org_id] = bytes(body)

    def clear_corruption(self) -> None:
        with self._lock:
            for org_id in (*self._raw_org_fields, *self._raw_org_bodies):
                if record := self._orgs.get(org_id):
                    record.org_json = None
            for org_id in (*self._raw_billing_fields, *self._raw_billing_bodies):
                if record := self._orgs.get(org_id):
                    record.billing_json = None
            self._raw_org_fields.clear()
            self._raw_billing_fields.clear()
            self._raw_org_bodies.clear()
            self._raw_billing_bodies.clear()

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(_ActiveFault(fault))

    def clear_faults(self) -> int:
        """Remove every fault; returns how many were active."""
        with self._lock:
            cleared = len(self._faults)
            self._faults = []
            return cleared

    # ---- reading ----------------------------------------------------------------------------

    def keys(self) -> dict[int, str]:
        """Organization id -> its org-scoped API key."""
        with self._lock:
            return {org_id: record.key for org_id, record in self._orgs.items()}

    def org_ids(self) -> list[int]:
        with self._lock:
            return list(self._ordered_ids())

    def balance(self, org_id: int) -> Decimal:
        with self._lock:
            return self._record(org_id).balance

    def organization(self, org_id: int) -> dict[str, Any]:
        """The Organization JSON the API serves for this id (a fresh copy)."""
        with self._lock:
            return self._payload(self._record(org_id))

    def billing(self, org_id: int) -> dict[str, Any]:
        """The BillingInfo JSON the API serves for this id (a fresh copy)."""
        return json.loads(self.billing_body(org_id))

    def balance_history(self) -> list[tuple[datetime, int, Decimal]]:
        """(when, org id, credits_remaining) for every balance each org has had, oldest first."""
        with self._lock:
            return list(self._history)

    def request_counts(self) -> dict[str, int]:
        """API requests received per endpoint (list, list_v2, retrieve, patch, billing)."""
        with self._lock:
            return dict(self._request_counts)

    def faults(self) -> list[Fault]:
        with self._lock:
            return [active.fault for active in self._faults]

    # ---- used by the HTTP layer --------------------------------------------------------------

    def org_for_key(self, key: str) -> int | None:
        return self._org_by_key.get(key)

    def take_faults(self, endpoint: str, org_id: int | None) -> tuple[float, Fault | None]:
        """Count the request and consume matching faults: (total latency, first other fault)."""
        with self._lock:
            self._request_counts[endpoint] += 1
            if not self._faults:
                return 0.0, None
            delay = 0.0
            chosen: Fault | None = None
            kept = []
            for active in self._faults:
                fault = active.fault
                if (
                    fault.endpoint in (None, endpoint)
                    and (fault.org_id is None or fault.org_id == org_id)
                    and (fault.kind == "latency" or chosen is None)
                ):
                    if fault.kind == "latency":
                        delay += fault.seconds
                    else:
                        chosen = fault
                    if active.remaining is not None:
                        active.remaining -= 1
                if active.remaining is None or active.remaining > 0:
                    kept.append(active)
            self._faults = kept
            return delay, chosen

    def visible(self, viewer_org: int | None, org_id: int) -> bool:
        """Whether a caller (None: the token; else a key's org) may see org_id."""
        return (viewer_org is None or viewer_org == org_id) and org_id in self._orgs

    def list_bodies(
        self, viewer_org: int | None, search: str | None, start: int = 0, stop: int | None = None
    ) -> tuple[int, list[bytes]]:
        """(how many orgs the caller sees, the Organization JSON of those in [start:stop])."""
        terms = search.lower().split() if search else []
        with self._lock:
            if viewer_org is not None:
                ids: list[int] = [viewer_org] if viewer_org in self._orgs else []
            else:
                ids = self._ordered_ids()
            if terms:
                ids = [i for i in ids if all(t in self._orgs[i].name.lower() for t in terms)]
            return len(ids), [self._org_json(self._orgs[i]) for i in ids[start:stop]]

    def organization_body(self, org_id: int) -> bytes:
        """The Organization JSON as served."""
        with self._lock:
            return self._org_json(self._record(org_id))

    def prepare_responses(self) -> None:
        """Build the JSON served for every organization and its billing now instead of at its
        first read (the benchmark does, so that no request it measures pays for it)."""
        with self._lock:
            for record in self._orgs.values():
                self._org_json(record)
                self._billing_json(record)

    def patch(self, org_id: int, data: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a PATCH body from the API; raises FieldValidationError with DRF errors."""
        settings, _ = _validated_settings(data, trusted=False)
        with self._lock:
            record = self._record(org_id)
            self._apply(record, settings, _timestamp(self._clock()))
            return self._payload(record)

    def billing_body(self, org_id: int) -> bytes:
        """The BillingInfo JSON as served (the hot path: built once per change of balance)."""
        with self._lock:
            return self._billing_json(self._record(org_id))

    # ---- internals (callers hold the lock) ------------------------------------------------------

    def _billing_json(self, record: _OrgRecord) -> bytes:
        if record.billing_json is None:
            record.billing_json = self._build_billing_json(record)
        return record.billing_json

    def _build_billing_json(self, record: _OrgRecord) -> bytes:
        if (served := self._raw_billing_bodies.get(record.id)) is not None:
            return served
        body = (
            _BILLING_TEMPLATE
            % (
                record.id,
                record.balance,
                record.credits_used,
                record.initial_balance,
                "null" if record.balance_expiry is None else f'"{record.balance_expiry}"',
                record.subscription,
                record.created_at,
                record.billing_updated_at,
            )
        ).encode()
        raw = self._raw_billing_fields.get(record.id)
        if raw:
            return _dumps({**json.loads(body), **raw})
        return body

    def _org_json(self, record: _OrgRecord) -> bytes:
        if record.org_json is None:
            served = self._raw_org_bodies.get(record.id)
            record.org_json = _dumps(self._payload(record)) if served is None else served
        return record.org_json

    def _payload(self, record: _OrgRecord) -> dict[str, Any]:
        body = record.payload()
        raw = self._raw_org_fields.get(record.id)
        if raw:
            body.update(raw)
        return body

    def _insert(self, record: _OrgRecord) -> None:
        self._orgs[record.id] = record
        self._org_by_key[record.key] = record.id
        self._sorted_ids = None
        self._history.append((self._clock(), record.id, record.balance))

    def _record(self, org_id: int) -> _OrgRecord:
        try:
            return self._orgs[org_id]
        except KeyError:
            raise UnknownOrganizationError(org_id) from None

    def _ordered_ids(self) -> list[int]:
        # Cached so paging through 100,000 orgs is not a sort per page.
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self._orgs)
        return self._sorted_ids

    @staticmethod
    def _apply(record: _OrgRecord, settings: dict[str, Any], now: str) -> None:
        if "name" in settings:
            settings = dict(settings)
            record.name = settings.pop("name")
        # A new dict rather than update(): payloads built earlier keep a consistent view.
        record.settings = {**record.settings, **settings}
        record.omitted = record.omitted - settings.keys()
        record.updated_at = now
        record.org_json = None

    def _members_from_specs(
        self, specs: Iterable[Mapping[str, Any]], created_at: str
    ) -> tuple[_Member, ...]:
        members = []
        for index, spec in enumerate(specs):
            where = f"members[{index}]"
            if not isinstance(spec, Mapping):
                raise FieldValidationError({where: ["Must be an object."]})
            unknown = set(spec) - {"name", "email", "role", "is_email_notify_enabled"}
            if unknown:
                raise FieldValidationError({where: [f"Unknown field(s): {', '.join(unknown)}."]})
            name, email = spec.get("name", ""), spec.get("email")
            role = spec.get("role", "admin")
            notify = spec.get("is_email_notify_enabled", True)
            if not isinstance(name, str) or not isinstance(email, str):
                raise FieldValidationError({where: ["name and email must be strings."]})
            if role not in ROLES:
                raise FieldValidationError({where: [f'"{role}" is not a valid role.']})
            if notify is not None and not isinstance(notify, bool):
                raise FieldValidationError({where: ["is_email_notify_enabled: boolean or null."]})
            member_id = self._next_member_id
            self._next_member_id += 1
            # User ids differ from membership ids, as in the real API.
            members.append(
                _Member(member_id, 5000 + member_id, name, email, role, notify, created_at)
            )
        return tuple(members)


# ---- validation (DRF field semantics) ------------------------------------------------------


def _validated_settings(
    data: Mapping[str, Any], *, trusted: bool
) -> tuple[dict[str, Any], set[str]]:
    """Validate Organization fields: (changes, fields to leave out of responses).

    ``trusted`` (the simulator's owner) may blank out fields with None and may not misspell a
    field; an API client's read-only and unknown fields are ignored like DRF does.
    """
    changes: dict[str, Any] = {}
    omitted: set[str] = set()
    errors: dict[str, list[str]] = {}
    for name, value in data.items():
        if trusted and value is None and name not in _NULLABLE_FIELDS and name != "name":
            if name in _ORG_DEFAULTS:
                omitted.add(name)
            else:
                errors[name] = ["Unknown field."]
            continue
        try:
            if name == "name":
                changes[name] = _clean_string(value, max_length=255, allow_blank=False)
            elif name == "discovery_source":
                changes[name] = None if value is None else _clean_string(value, 10_000, True)
            elif name in _BOOLEAN_FIELDS:
                changes[name] = _clean_boolean(value)
            elif name in _DECIMAL_FIELDS:
                changes[name] = _clean_decimal(value, nullable=name in _NULLABLE_FIELDS)
            elif name in _INTEGER_FIELDS:
                changes[name] = _clean_integer(value)
            elif name in _CHOICE_FIELDS:
                changes[name] = _clean_choice(value, _CHOICE_FIELDS[name])
            elif trusted and name not in _ORG_DEFAULTS:
                raise _FieldError("Unknown field.")
            elif trusted and name not in _IGNORED_WRITABLE_FIELDS:
                changes[name] = value  # a read-only field the owner sets directly
        except _FieldError as exc:
            errors[name] = [str(exc)]
    if errors:
        raise FieldValidationError(errors)
    return changes, omitted


class _FieldError(Exception):
    pass


def _clean_boolean(value: Any) -> bool:
    if value is None:
        raise _FieldError("This field may not be null.")
    if isinstance(value, str | int | Decimal):
        if value in _TRUE_VALUES:
            return True
        if value in _FALSE_VALUES:
            return False
    raise _FieldError("Must be a valid boolean.")


def _clean_decimal(value: Any, *, nullable: bool) -> str | None:
    if value is None:
        if nullable:
            return None
        raise _FieldError("This field may not be null.")
    # bool is an int; DRF turns it into "True", which is not a number. Floats never carry money.
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise _FieldError("A valid number is required.")
    text = str(value).strip()
    if len(text) > 1000:
        raise _FieldError("String value too large.")
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise _FieldError("A valid number is required.") from None
    if not number.is_finite():
        raise _FieldError("A valid number is required.")
    _check_precision(number, max_digits=10, decimal_places=2)
    return str(number.quantize(_CENT))


def _check_precision(number: Decimal, *, max_digits: int, decimal_places: int) -> None:
    """DRF DecimalField.validate_precision, messages included."""
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # finite numbers only, checked by the caller
    if exponent >= 0:
        total, places = len(digits) + exponent, 0
    elif len(digits) > -exponent:
        total, places = len(digits), -exponent
    else:
        total, places = -exponent, -exponent
    whole = total - places
    if total > max_digits:
        raise _FieldError(f"Ensure that there are no more than {max_digits} digits in total.")
    if places > decimal_places:
        raise _FieldError(f"Ensure that there are no more than {decimal_places} decimal places.")
    if whole > max_digits - decimal_places:
        raise _FieldError(
            "Ensure that there are no more than "
            f"{max_digits - decimal_places} digits before the decimal point."
        )


def _clean_integer(value: Any) -> int:
    if value is None:
        raise _FieldError("This field may not be null.")
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise _FieldError("A valid integer is required.")
    try:
        number = int(_INTEGER_SUFFIX.sub("", str(value)))
    except ValueError:
        raise _FieldError("A valid integer is required.") from None
    if number > _INT32[1]:
        raise _FieldError(f"Ensure this value is less than or equal to {_INT32[1]}.")
    if number < _INT32[0]:
        raise _FieldError(f"Ensure this value is greater than or equal to {_INT32[0]}.")
    return number


def _clean_choice(value: Any, choices: tuple[str, ...]) -> str:
    if value is None:
        raise _FieldError("This field may not be null.")
    if isinstance(value, bool) or str(value) not in choices:
        raise _FieldError(f'"{value}" is not a valid choice.')
    return str(value)


def _clean_string(value: Any, max_length: int, allow_blank: bool) -> str:
    if value is None:
        raise _FieldError("This field may not be null.")
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise _FieldError("Not a valid string.")
    text = str(value).strip()
    if not text and not allow_blank:
        raise _FieldError("This field may not be blank.")
    if len(text) > max_length:
        raise _FieldError(f"Ensure this field has no more than {max_length} characters.")
    return text


def _money_value(value: Any, field: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError(f"{field} must be a decimal string or Decimal, not {type(value).__name__}")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{field} is not a number: {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"{field} must be finite")
    return number.quantize(_CENT)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- generated data ------------------------------------------------------------------------

_FIRST_NAMES = (
    "Dana", "Lee", "Sam", "Alex", "Priya", "Jordan", "Mina", "Omar", "Chen", "Sofia",
    "Ivan", "Noor", "Kai", "Ana", "Ravi", "Ella", "Tomas", "Yuki", "Zara", "Leo",
)  # fmt: skip
_LAST_NAMES = (
    "Ops", "Patel", "Kim", "Garcia", "Nguyen", "Okafor", "Schmidt", "Rossi", "Silva", "Cohen",
    "Tanaka", "Moreau", "Novak", "Haddad", "Larsen", "Ibrahim", "Walsh", "Mendes", "Fischer",
)  # fmt: skip
_NAME_WORDS = (
    "Acme", "Blue", "Bright", "Cedar", "Clear", "Delta", "Echo", "Golden", "Harbor", "Iron",
    "Juniper", "Lunar", "Maple", "Nova", "Orbit", "Pine", "Quartz", "Red", "Silver", "Summit",
)  # fmt: skip
_NAME_TRADES = (
    "Voice", "Dental", "Health", "Logistics", "Bank", "Insurance", "Travel", "Retail",
    "Support", "Realty", "Telecom", "Energy", "Foods", "Motors", "Clinic", "Legal",
)  # fmt: skip
_NAME_SUFFIXES = ("", " Labs", " Inc", " Group", " AI", " Co")
_CUSTOM_THRESHOLDS = ("100.00", "250.00", "500.00", "750.50", "2000.00", "5000.00")
_GENERATED_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def _generated_org(
    rng: random.Random, org_id: int, used_names: set[str], api: SimulatedApi
) -> _OrgRecord:
    name = f"{rng.choice(_NAME_WORDS)} {rng.choice(_NAME_TRADES)}{rng.choice(_NAME_SUFFIXES)}"
    if name in used_names:
        name = f"{name} {org_id}"
    used_names.add(name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    domain = f"{slug}.test" if rng.random() < 0.3 else f"{slug}.example.com"
    created = _GENERATED_EPOCH + timedelta(seconds=rng.randint(0, 600 * 86400))
    created_at = _timestamp(created)

    settings: dict[str, Any] = {}
    omitted: set[str] = set()
    roll = rng.random()
    if roll < 0.08:
        omitted.add("low_credits_threshold")  # exercises the client's default of 1000
    elif roll < 0.30:
        settings["low_credits_threshold"] = rng.choice(_CUSTOM_THRESHOLDS)
    if rng.random() < 0.10:
        settings["notify_low_credits"] = False
    roll = rng.random()
    if roll < 0.03:
        omitted.add("is_send_emails_enabled")
    elif roll < 0.10:
        settings["is_send_emails_enabled"] = False
    if rng.random() < 0.15:
        settings["cronjob_low_balance_mute_days"] = rng.choice(("3", "7", "14"))
    if rng.random() < 0.10:
        settings.update(
            auto_refill=True, auto_refill_threshold="100.00", auto_refill_amount="500.00"
        )

    members = []
    used_emails: set[str] = set()
    for position in range(rng.choices((1, 2, 3, 4), cum_weights=(35, 65, 85, 100))[0]):
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        email = f"{first}.{last}@{domain}".lower()
        if email in used_emails:
            email = f"{first}.{last}{position}@{domain}".lower()
        used_emails.add(email)
        if position == 0:
            role = "admin" if rng.random() < 0.95 else "member"
        else:
            role = rng.choices(
                ("admin", "member", "view_only", "labs"), cum_weights=(30, 75, 95, 100)
            )[0]
        roll = rng.random()
        notify = None if roll < 0.03 else roll >= 0.15
        member_id = api._next_member_id
        api._next_member_id += 1
        members.append(
            _Member(member_id, 5000 + member_id, f"{first} {last}", email, role, notify, created_at)
        )

    threshold = Decimal(settings.get("low_credits_threshold", DEFAULT_THRESHOLD))
    threshold_cents = int(threshold * 100)
    roll = rng.random()
    if roll < 0.05:
        cents = rng.randint(0, threshold_cents - 1)
    elif roll < 0.06:
        cents = threshold_cents  # exactly at the threshold is not below it
    else:
        cents = threshold_cents + rng.randint(1, 5_000_000)
    balance = Decimal(cents) / 100
    initial = max(Decimal(rng.choice((10_000, 50_000, 100_000))), balance).quantize(_CENT)
    expiry = None
    if rng.random() < 0.2:
        expiry = _timestamp(created + timedelta(days=rng.randint(400, 900)))
    subscription = rng.choices(SUBSCRIPTIONS, cum_weights=(80, 90, 95, 100))[0]
    return _OrgRecord(
        org_id=org_id,
        name=name,
        settings=settings,
        omitted=frozenset(omitted),
        members=tuple(members),
        created_at=created_at,
        key=f"sim_{rng.getrandbits(128):032x}",
        balance=balance.quantize(_CENT),
        credits_used=(initial - balance).quantize(_CENT),
        initial_balance=initial,
        balance_expiry=expiry,
        subscription=api._subscriptions[subscription],
    )


def _subscription_variants(now: datetime) -> dict[str, str]:
    """The SubscriptionStatus JSON for each kind of subscription, serialised once."""
    started = now - timedelta(days=400)

    def status(kind: str, pack: str | None, expire_in: int | None) -> str:
        expire_at = None if expire_in is None else now + timedelta(days=expire_in)
        body = {
            "status": kind,
            "is_active": kind in ("active", "trial"),
            "is_trial": kind == "trial",
            "pack_name": pack,
            "expire_at": expire_at and _timestamp(expire_at),
            "last_payment_at": expire_at and _timestamp(expire_at - timedelta(days=30)),
            "days_until_expiry": expire_in,
            "created_at": None if pack is None else _timestamp(started),
            "pack": None
            if pack is None
            else {
                "name": pack,
                "max_concurrent_runs_limit": 10,
                "max_concurrent_chat_runs_limit": 10,
                "max_agents_limit": 5,
                "max_members_limit": -1,
                "max_projects_limit": 3,
                "billing_type": "subscription" if kind != "trial" else "self_serve",
                "subscription_overage": "-1",
            },
        }
        return _dumps(body).decode()

    return {
        "active": status("active", "Startup", 24),
        "trial": status("trial", "Trial", 10),
        "expired": status("expired", "Startup", -5),
        "inactive": status("inactive", None, None),
    }


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _dumps(body: object) -> bytes:
    # DRF's JSONRenderer: compact separators, UTF-8 rather than \u escapes.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# ---- HTTP: what each request gets ----------------------------------------------------------


# Named tuples rather than dataclasses for the values made per request: cheapest to build.
class _Response(NamedTuple):
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class _Delayed:
    """An answer a latency fault holds back: ``then()`` makes it once ``seconds`` have passed."""

    seconds: float
    then: Callable[[], _Response]


class _Request(NamedTuple):
    """A request as parsed; the last three fields are for the connection, not the API."""

    method: str
    target: str
    headers: Mapping[str, str]  # names lower-cased; of a repeated header the first one counts
    tls: bool
    keep_alive: bool
    body: bytes = b""
    length: int = 0  # of the body still to be read
    expects_continue: bool = False
    refusal: _Response | None = None  # answered instead, then the server hangs up


def _json(status: int, body: object, *headers: tuple[str, str]) -> _Response:
    return _Response(status, _dumps(body), headers)


def _detail(status: int, message: str, *headers: tuple[str, str]) -> _Response:
    return _json(status, {"detail": message}, *headers)


_NOT_FOUND = _detail(404, "Not found.")
_ORG_NOT_FOUND = _detail(404, "No Organization matches the given query.")
_BILLING_NOT_FOUND = _detail(404, "Billing information not found")
_CHALLENGE = ("WWW-Authenticate", 'Bearer realm="api"')
_NO_CREDENTIALS = _detail(401, "Authentication credentials were not provided.", _CHALLENGE)
_BAD_KEY = _detail(401, "Invalid API key.", _CHALLENGE)
_BAD_TOKEN = _detail(401, "Invalid token.", _CHALLENGE)
_DROP = _Response(0, b"")  # a marker: close the connection without answering
_ORG_PATH = re.compile(r"^/user/organizations/([^/]+)/$")
_SIM_ORG_PATH = re.compile(r"^/_sim/orgs/(-?\d+)$")


class _Caller(NamedTuple):
    """Who is asking: ``org`` is the key's organization, None for the token."""

    org: int | None


_TOKEN_CALLER = _Caller(None)


class _ApiHandler:
    """The API and the control endpoints over parsed requests; knows nothing of sockets."""

    def __init__(self, api: SimulatedApi, host_port: str) -> None:
        self.api = api
        self.host_port = host_port

    def respond(self, request: _Request) -> _Response | _Delayed:
        try:
            return self._respond(request)
        except Exception as exc:  # noqa: BLE001 (answer 500 rather than drop the connection)
            return self._failed(request, exc)

    def _delayed_answer(self, request: _Request, *answer: Any) -> _Response:
        try:
            return self._answer(request, *answer)
        except Exception as exc:  # noqa: BLE001 (as in respond)
            return self._failed(request, exc)

    @staticmethod
    def _failed(request: _Request, exc: Exception) -> _Response:
        log.exception("simulator.error", method=request.method, path=_split(request.target)[0])
        return _detail(500, f"Simulator error: {type(exc).__name__}")

    def _respond(self, request: _Request) -> _Response | _Delayed:
        api = self.api
        method = request.method
        path, query_string = _split(request.target)
        if path.startswith("/_sim/"):
            return self._control(method, path, request.body)
        query = _query(query_string)

        if path == "/test_framework/billing/info/":
            endpoint, allowed = "billing", ("GET",)
        elif path == "/user/organizations/":
            endpoint, allowed = "list", ("GET",)
        elif path == "/user/v2/organizations/" and api.v2_enabled:
            endpoint, allowed = "list_v2", ("GET",)
        elif match := _ORG_PATH.match(path):
            endpoint, allowed = ("patch" if method == "PATCH" else "retrieve"), ("GET", "PATCH")
        else:
            return _NOT_FOUND
        if method not in allowed:
            return _detail(405, f'Method "{method}" not allowed.', ("Allow", ", ".join(allowed)))

        caller = self._caller(request.headers)
        path_org = _int_or_none(match.group(1)) if endpoint in ("retrieve", "patch") else None
        fault_org = self._fault_org(endpoint, caller, path_org, query)
        delay, fault = api.take_faults(endpoint, fault_org)
        if delay:
            # Only this connection waits: the server goes on serving the others meanwhile.
            answer = (endpoint, caller, path_org, query, path, fault)
            return _Delayed(delay, partial(self._delayed_answer, request, *answer))
        return self._answer(request, endpoint, caller, path_org, query, path, fault)

    def _answer(
        self,
        request: _Request,
        endpoint: str,
        caller: _Caller | _Response,
        path_org: int | None,
        query: dict[str, str],
        path: str,
        fault: Fault | None,
    ) -> _Response:
        api = self.api
        if fault is not None and fault.kind != "malformed":
            return _fault_response(fault)
        if not isinstance(caller, _Caller):
            response = caller
        elif endpoint == "billing":
            response = self._billing(caller, query)
        elif endpoint == "list":
            bodies = api.list_bodies(caller.org, query.get("search"))[1]
            response = _Response(200, b"[" + b",".join(bodies) + b"]")
        elif endpoint == "list_v2":
            response = self._list_v2(request, caller, query, path)
        elif path_org is None or not api.visible(caller.org, path_org):
            response = _ORG_NOT_FOUND
        elif endpoint == "patch":
            response = self._patch(path_org, request)
        else:
            response = self._organization(path_org)
        if fault is not None:  # malformed: the request took effect, the answer is cut short
            return _Response(200, response.body[: len(response.body) // 2], response.headers)
        return response

    def _caller(self, headers: Mapping[str, str]) -> _Caller | _Response:
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
        endpoint: str, caller: _Caller | _Response, path_org: int | None, query: dict[str, str]
    ) -> int | None:
        key_org = caller.org if isinstance(caller, _Caller) else None
        if endpoint in ("retrieve", "patch"):
            return path_org
        if endpoint == "billing" and key_org is None:
            return _int_or_none(query.get("organization_id"))
        return key_org

    def _billing(self, caller: _Caller, query: dict[str, str]) -> _Response:
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
            return _Response(200, self.api.billing_body(org_id))
        except UnknownOrganizationError:
            return _BILLING_NOT_FOUND

    def _list_v2(
        self, request: _Request, caller: _Caller, query: dict[str, str], path: str
    ) -> _Response:
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
        scheme = "https" if request.tls else "http"
        base = f"{scheme}://{request.headers.get('host') or self.host_port}{path}"
        envelope = _dumps(
            {
                "count": count,
                "next": _page_url(base, query, page + 1) if page < pages else None,
                "previous": _page_url(base, query, page - 1) if page > 1 else None,
                "results": [],
            }
        )
        # The organizations' JSON is cached as bytes: splice it in where "[]}" ends the envelope.
        return _Response(200, envelope[:-2] + b",".join(results) + b"]}")

    def _organization(self, org_id: int) -> _Response:
        try:
            return _Response(200, self.api.organization_body(org_id))
        except UnknownOrganizationError:  # removed between the visibility check and now
            return _ORG_NOT_FOUND

    def _patch(self, org_id: int, request: _Request) -> _Response:
        data = self._parse_body(request)
        if isinstance(data, _Response):
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
    def _parse_body(request: _Request) -> object:
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

    def _control(self, method: str, path: str, body: bytes) -> _Response:
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

    def _settings(self, data: object) -> _Response:
        if not isinstance(data, dict) or not isinstance(data.get("v2_enabled"), bool):
            return _detail(400, 'Send {"v2_enabled": true|false}.')
        self.api.v2_enabled = data["v2_enabled"]
        return _json(200, {"v2_enabled": self.api.v2_enabled})

    def _add_org(self, data: object) -> _Response:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return _detail(400, "Send an organization object with a name.")
        spec = dict(data)
        api = self.api
        org_id = api.add_org(spec.pop("name"), org_id=spec.pop("id", None), **spec)
        return _json(201, {"id": org_id, "api_key": api.keys()[org_id]})

    def _change_org(self, org_id: int, data: object) -> _Response:
        if not isinstance(data, dict):
            return _detail(400, "Send an object of organization fields.")
        api = self.api
        changes = dict(data)
        balance = changes.pop("credits_remaining", None)
        if balance is not None:
            _money_value(balance, "credits_remaining")  # reject before changing anything
        if changes:
            api.update_org(org_id, **changes)
        if balance is not None:
            api.set_balance(org_id, balance)
        return _json(
            200, {"organization": api.organization(org_id), "billing": api.billing(org_id)}
        )


def _fault_response(fault: Fault) -> _Response:
    if fault.kind == "drop":
        return _DROP
    if fault.kind == "rate_limit":
        return _detail(
            429,
            f"Request was throttled. Expected available in {fault.retry_after} seconds.",
            ("Retry-After", str(fault.retry_after)),
        )
    return _detail(fault.status, f"Simulated {fault.status} {HTTPStatus(fault.status).phrase}.")


def _history_json(history: list[tuple[datetime, int, Decimal]]) -> list[dict[str, Any]]:
    return [
        {"at": _timestamp(at), "organization": org_id, "credits_remaining": str(balance)}
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


# ---- HTTP: the protocol ----------------------------------------------------------------------
#
# http.server's limits, so that what it refused is still refused.
_MAX_LINE = 65536
_MAX_HEADERS = 100
# A head still without its blank line at this size is refused rather than buffered further.
_MAX_HEAD = 1 << 20
_METHODS = frozenset({"GET", "PATCH", "POST", "PUT", "DELETE"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _parse_head(buffer: bytes, tls: bool) -> tuple[_Request, int] | _Response | None:
    """The request whose head starts ``buffer`` (without its body) and the head's size with the
    blank line; a _Response if it is refused (the server answers and hangs up); None while it
    is still incomplete."""
    end = buffer.find(b"\n\r\n")
    bare = buffer.find(b"\n\n")  # lines ended by LF alone, as http.server accepts them too
    if bare >= 0 and (end < 0 or bare < end):
        end, size = bare, bare + 2
    elif end >= 0:
        size = end + 3
    else:
        return _incomplete_head(buffer)
    first_end = buffer.find(b"\n", 0, end)
    if first_end < 0:
        first_end = end
    request_line = _request_line(buffer[:first_end])
    if isinstance(request_line, _Response):
        return request_line
    method, target, http11 = request_line
    fields = _header_block(buffer[first_end + 1 : end])
    if isinstance(fields, _Response):
        return fields
    headers, connection, expect, chunked, length = fields
    # Exactly http.server's rules: HTTP/1.1 keeps the connection open unless told otherwise.
    keep_alive = http11
    if connection == "close":
        keep_alive = False
    elif connection == "keep-alive":
        keep_alive = True
    expects_continue = http11 and expect == "100-continue"
    refusal = None
    if method not in _METHODS:
        refusal = _detail(501, f"Unsupported method ({method!r})")
    elif chunked:
        refusal = _detail(411, "Send a Content-Length; chunked bodies are not supported.")
    elif not 0 <= length <= _MAX_BODY:
        refusal = _detail(400, "Bad Content-Length.")
    if refusal is not None:
        length = 0
    request = _Request(
        method, target, headers, tls, keep_alive, b"", length, expects_continue, refusal
    )
    return request, size


def _incomplete_head(buffer: bytes) -> _Response | None:
    newline = buffer.find(b"\n")
    if newline < 0:
        return _detail(414, "Request-URI Too Long") if len(buffer) > _MAX_LINE else None
    # A bad request line is answered at once, as http.server does, not after the headers.
    request_line = _request_line(buffer[:newline])
    if isinstance(request_line, _Response):
        return request_line
    if len(buffer) > _MAX_HEAD:
        return _detail(431, "Request Header Fields Too Large")
    return None


def _request_line(line: bytes) -> tuple[str, str, bool] | _Response:
    """(method, target, HTTP/1.1 or later) as http.server's parse_request reads them."""
    if len(line) >= _MAX_LINE:
        return _detail(414, "Request-URI Too Long")
    words = line.decode("latin-1").split()
    if len(words) == 3 and words[2] == "HTTP/1.1":  # nearly every request
        return words[0], words[1], True
    http11 = False
    if len(words) >= 3:
        version = words[-1]
        number = _http_version(version)
        if number is None:
            return _detail(400, f"Bad request version ({version!r})")
        if number >= (2, 0):
            return _detail(505, f"Invalid HTTP version ({version[5:]})")
        http11 = number >= (1, 1)
    if not 2 <= len(words) <= 3:
        text = line.decode("latin-1").rstrip("\r\n")
        return _detail(400, f"Bad request syntax ({text!r})")
    method, target = words[:2]
    if len(words) == 2 and method != "GET":
        return _detail(400, f"Bad HTTP/0.9 request type ({method!r})")
    return method, target, http11


def _http_version(version: str) -> tuple[int, int] | None:
    if not version.startswith("HTTP/"):
        return None
    parts = version[5:].split(".")
    if len(parts) != 2 or not all(part.isdigit() and len(part) <= 10 for part in parts):
        return None
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:  # a Unicode digit that int() does not take
        return None


@lru_cache(maxsize=256)
def _header_block(block: bytes) -> tuple[dict[str, str], str, str, bool, int] | _Response:
    """(fields, Connection and Expect lower-cased, chunked, Content-Length or -1 if bad).

    Cached: a client sends the same headers with every request, only the request line
    changes, and parsing them is the largest part of reading a request. The dict is shared:
    nothing may change it.
    """
    headers = _header_fields(block.split(b"\n")) if block else {}
    if isinstance(headers, _Response):
        return headers
    try:
        length = int(headers.get("content-length") or 0)
    except ValueError:
        length = -1
    return (
        headers,
        headers.get("connection", "").lower(),
        headers.get("expect", "").lower(),
        bool(headers.get("transfer-encoding")),
        length,
    )


def _header_fields(lines: list[bytes]) -> dict[str, str] | _Response:
    if len(lines) > _MAX_HEADERS:
        return _detail(431, "Too many headers")
    headers: dict[str, str] = {}
    last: str | None = None  # the field a continuation line (obs-fold) extends
    for raw in lines:
        if len(raw) > _MAX_LINE:
            return _detail(431, "Line too long")
        line = raw[:-1] if raw[-1:] == b"\r" else raw
        if line[:1] in (b" ", b"\t"):
            if last is None and not headers:
                return _detail(400, "Bad header line")
            if last is not None:  # RFC 9112: an obs-fold may be replaced by a space
                headers[last] = f"{headers[last]} {line.strip().decode('latin-1')}"
            continue
        name, colon, value = line.partition(b":")
        # RFC 9112: a field name is one token, with no whitespace before the colon.
        if not colon or name.split() != [name]:
            return _detail(400, "Bad header line")
        key = name.decode("latin-1").lower()
        if key in headers:
            last = None
        else:
            headers[key] = value.strip().decode("latin-1")
            last = key
    return headers


_REASONS = {status.value: status.phrase for status in HTTPStatus}
_OK_START = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "


def _encode(response: _Response, close: bool) -> bytes:
    """Head and body in one piece: written separately they would wait on delayed ACKs."""
    body = response.body
    if response.status == 200 and not response.headers and not close:
        return b"%s%d\r\n\r\n%s" % (_OK_START, len(body), body)
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS[response.status]}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---- HTTP: the server ------------------------------------------------------------------------

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_RECV_SIZE = 65536
# Pipelined requests wait while this much of the answers is still unsent (a client that
# sends but does not read cannot make the server buffer without bound).
_MAX_UNSENT = 1 << 20
_TLS_CHUNK = 16384  # one TLS record: a retried write must offer the same bytes again
# After its last answer a connection is half-closed and drained this long, so that what the
# client still sends (the body of a refused request) cannot reset the answer away.
_LINGER_SECONDS = 2.0
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Connection:
    """One client connection: bytes in, requests parsed and answered in order, bytes out."""

    __slots__ = (
        "server",
        "sock",
        "tls",
        "handshaking",
        "events",
        "pending",
        "waiting",
        "out",
        "out_offset",
        "unsent",
        "held",
        "eof",
        "close_after",
        "draining",
        "closed",
    )

    def __init__(self, server: _HttpServer, sock: socket.socket, tls: bool) -> None:
        self.server = server
        self.sock = sock
        self.tls = tls
        self.handshaking = tls
        self.events = 0  # what the selector watches for
        self.pending = b""  # received, not yet part of an answered request
        self.waiting: _Request | None = None  # its head parsed, its body still arriving
        self.out: deque[bytes] = deque()
        self.out_offset = 0  # into out[0]
        self.unsent = 0
        self.held = False  # a latency fault holds back the next answer
        self.eof = False  # the client has finished sending
        self.close_after = False  # no more requests: close once the answers are out
        self.draining = False
        self.closed = False

    def start(self) -> None:
        if self.tls:
            self._handshake()
        else:
            self._watch(_READ)

    def on_event(self, mask: int) -> None:
        try:
            if self.handshaking:
                self._handshake()
                return
            if mask & _WRITE:
                self._flush()
                if not self.out and not self.closed:
                    self._process()  # requests were waiting for their answers to go out
            if mask & _READ and not self.closed:
                self._receive()
            if not self.closed:
                self._watch(self._wanted())
        except Exception:  # noqa: BLE001 (a bug serving one connection must not stop the server)
            log.exception("simulator.connection_error")
            self.close()

    def _wanted(self) -> int:
        if self.draining:
            return _READ
        events = _WRITE if self.out else 0
        if not (self.held or self.close_after or self.unsent >= _MAX_UNSENT):
            events |= _READ
        return events

    def _watch(self, events: int) -> None:
        if events == self.events:
            return
        selector = self.server.selector
        if not events:
            selector.unregister(self.sock)
        elif not self.events:
            selector.register(self.sock, events, self.on_event)
        else:
            selector.modify(self.sock, events, self.on_event)
        self.events = events

    def _handshake(self) -> None:
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(_WRITE)
            return
        except OSError:  # the client refused the certificate, or does not speak TLS
            self.close()
            return
        self.handshaking = False
        self._watch(_READ)
        self._receive()  # the first request may have come with the end of the handshake
        if not self.closed:
            self._watch(self._wanted())

    def _receive(self) -> None:
        try:
            data = self.sock.recv(_RECV_SIZE)
            # The selector reports a plain socket again while bytes remain; TLS may hold
            # decrypted bytes the selector cannot see, so read until it has none.
            if self.tls and data:
                data = self._receive_tls(data)
        except _WOULD_BLOCK:
            return
        except OSError:  # reset by the client, or a broken TLS record
            self.close()
            return
        if not data:
            self.eof = True
        if self.draining:
            if self.eof:
                self.close()
            return
        if data:
            self.pending = self.pending + data if self.pending else data
        self._process()

    def _receive_tls(self, data: bytes) -> bytes:
        chunks = [data]
        while True:
            try:
                more = self.sock.recv(_RECV_SIZE)
            except _WOULD_BLOCK:
                break
            if not more:
                self.eof = True
                break
            chunks.append(more)
        return b"".join(chunks)

    def _process(self) -> None:
        """Answer every complete request received, in order, until one has to wait."""
        while not (self.held or self.close_after or self.closed) and self.unsent < _MAX_UNSENT:
            request = self._next_request()
            if request is None:
                break
            if isinstance(request, _Response):  # unreadable: answer, then hang up
                self.close_after = True
                self._send(_encode(request, close=True))
                break
            answer = self.server.handler.respond(request)
            if isinstance(answer, _Delayed):
                self.held = True
                self.server.call_later(
                    answer.seconds, partial(self._release, answer.then, request.keep_alive)
                )
                break
            if answer is _DROP:
                self.close_after = True
                break
            self.close_after = not request.keep_alive
            self._send(_encode(answer, close=self.close_after))
        if self.eof and not self.held:
            self.close_after = True  # whatever incomplete request is left will never end
        if self.close_after and not self.held and not self.out and not self.closed:
            self._finish()

    def _next_request(self) -> _Request | _Response | None:
        request = self.waiting
        if request is None:
            pending = self.pending
            if not pending:
                return None
            if pending[0] in b"\r\n":
                # RFC 9112 2.2: empty lines before a request line are ignored.
                pending = self.pending = pending.lstrip(b"\r\n")
                if not pending:
                    return None
            parsed = _parse_head(pending, self.tls)
            if parsed is None or isinstance(parsed, _Response):
                return parsed
            request, size = parsed
            if request.expects_continue:
                self._send(_CONTINUE)
            if request.refusal is not None:
                return request.refusal
            self.pending = pending[size:]
            if not request.length:
                return request
        length = request.length
        if len(self.pending) < length:
            self.waiting = request
            return None
        self.waiting = None
        body, self.pending = self.pending[:length], self.pending[length:]
        return request._replace(body=body, length=0)

    def _release(self, then: Callable[[], _Response], keep_alive: bool) -> None:
        """A held-back answer's time has come: send it, then go on with the next requests."""
        if self.closed:
            return
        self.held = False
        try:
            answer = then()
            if answer is _DROP:
                self.close_after = True
            else:
                self._send(_encode(answer, close=not keep_alive))
                self.close_after = not keep_alive
            if not self.closed:
                self._process()
            if not self.closed:
                self._watch(self._wanted())
        except Exception:  # noqa: BLE001 (as in on_event)
            log.exception("simulator.connection_error")
            self.close()

    def _send(self, data: bytes) -> None:
        if not self.out and not self.tls:  # the usual case: straight to the socket
            try:
                sent = self.sock.send(data)
            except _WOULD_BLOCK:
                sent = 0
            except OSError:  # the client went away; nothing to tell anyone
                self.close()
                return
            if sent == len(data):
                return
            data = data[sent:]
        self.out.append(data)
        self.unsent += len(data)
        self._flush()

    def _flush(self) -> None:
        out = self.out
        while out:
            chunk = out[0]
            offset = self.out_offset
            try:
                if self.tls:
                    sent = self.sock.send(memoryview(chunk)[offset : offset + _TLS_CHUNK])
                elif offset:
                    sent = self.sock.send(memoryview(chunk)[offset:])
                else:
                    sent = self.sock.send(chunk)
            except _WOULD_BLOCK:
                return
            except OSError:  # the client went away; nothing to tell anyone
                self.close()
                return
            self.unsent -= sent
            if offset + sent < len(chunk):
                self.out_offset = offset + sent
            else:
                out.popleft()
                self.out_offset = 0

    def _finish(self) -> None:
        if self.eof:
            self.close()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.draining = True
        self.pending = b""
        self.server.call_later(_LINGER_SECONDS, self.close)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.events:
            self.server.selector.unregister(self.sock)
            self.events = 0
        self.server.connections.discard(self)
        self.sock.close()


class _HttpServer:
    """A single-threaded, non-blocking HTTP/1.1 server: one selector loop serves every
    connection, so no thread per connection contends for the GIL; a latency fault holds back
    its own connection's answer through a timer while the others are served."""

    def __init__(
        self, address: tuple[str, int], api: SimulatedApi, ssl_context: ssl.SSLContext | None
    ) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        host, port = listener.getsockname()[:2]
        self.host_port = f"{host}:{port}"
        self.handler = _ApiHandler(api, self.host_port)
        self.selector = selectors.DefaultSelector()
        self.connections: set[_Connection] = set()
        self._listener = listener
        self._ssl_context = ssl_context
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_order = itertools.count()  # equal deadlines run in the order they were set
        self._stopping = False
        # stop() from another thread writes a byte here to end the loop's select() at once.
        self._wake_up, self._waker = socket.socketpair()
        self._wake_up.setblocking(False)
        self.selector.register(listener, _READ, self._accept)
        self.selector.register(self._wake_up, _READ, self._woken)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> None:
        deadline = time.monotonic() + seconds
        heapq.heappush(self._timers, (deadline, next(self._timer_order), callback))

    def serve_forever(self) -> None:
        select = self.selector.select
        timers = self._timers
        try:
            while not self._stopping:
                timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else None
                for key, mask in select(timeout):
                    key.data(mask)
                now = time.monotonic()
                while timers and timers[0][0] <= now and not self._stopping:
                    heapq.heappop(timers)[2]()
        finally:
            for connection in list(self.connections):
                connection.close()
            self.selector.close()
            self._listener.close()
            self._wake_up.close()
            self._waker.close()

    def shutdown(self) -> None:
        """Make serve_forever close every connection and return (from any thread)."""
        self._stopping = True
        try:
            self._waker.send(b"\0")
        except OSError:
            pass  # the loop has ended already

    def _woken(self, mask: int) -> None:
        try:
            self._wake_up.recv(64)
        except OSError:
            pass

    def _accept(self, mask: int) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # none left to accept (or the client gave up already)
                return
            try:
                sock.setblocking(False)
                # Small keep-alive answers would stall ~40 ms each on Nagle + delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._ssl_context is not None:
                    sock = self._ssl_context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
            except OSError:
                sock.close()
                continue
            connection = _Connection(self, sock, tls=self._ssl_context is not None)
            self.connections.add(connection)
            connection.start()


class SimulatorServer:
    """Serves a SimulatedApi over HTTP in a background thread."""

    def __init__(
        self,
        api: SimulatedApi,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.api = api
        self._host = host
        self._port = port
        # Serves https with this (server-side) context: for tests of certificate checking.
        self._ssl_context = ssl_context
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the simulator is not started")
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._httpd.host_port}"

    def start(self) -> SimulatorServer:
        if self._httpd is not None:
            return self
        try:
            self._httpd = _HttpServer((self._host, self._port), self.api, self._ssl_context)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise SimulatorError(f"cannot listen on {self._host}:{self._port}: {reason}") from None
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="cekura-simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; open connections, idle keep-alive ones included, are closed now."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.shutdown()
        thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ---- command line ------------------------------------------------------------------------


def write_keys_file(path: str | os.PathLike[str], keys: Mapping[int, str]) -> None:
    """``<org id> <key>`` per line, readable by the owner only (mode 0600)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # O_CREAT's mode does not apply to a file that already existed.
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as keys_file:
        keys_file.writelines(f"{org_id} {key}\n" for org_id, key in sorted(keys.items()))


def run_simulator(
    *,
    orgs: int,
    port: int,
    token: str | None,
    seed: int,
    keys_file: str | None,
    seed_file: str | None,
    host: str = "127.0.0.1",
) -> None:
    """Serve a simulated Cekura API until SIGINT/SIGTERM (``poller simulate``).

    ``token`` None means the seed file's token, or DEFAULT_TOKEN.
    Raises SimulatorError (one-line message) for a bad seed file, keys file or port.
    """
    if token is not None and not token:
        raise SimulatorError("the simulator token must not be empty")
    if seed_file:
        api = SimulatedApi.from_seed_file(seed_file, token=token)
    elif orgs < 0:
        raise SimulatorError("--orgs must be 0 or more")
    else:
        api = SimulatedApi.generate(orgs, seed=seed, token=token or DEFAULT_TOKEN)
    if keys_file:
        try:
            write_keys_file(keys_file, api.keys())
        except OSError as exc:
            raise SimulatorError(f"cannot write keys file {keys_file}: {exc.strerror}") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: the /_sim/ control endpoints need no credentials and {host} "
            "is reachable from other machines",
            file=sys.stderr,
        )

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with SimulatorServer(api, host=host, port=port) as server:
            where = f"; API keys in {keys_file}" if keys_file else ""
            count = len(api.org_ids())
            print(
                f"Cekura API simulator at {server.url} with {count} organizations{where}",
                flush=True,
            )
            # A timed wait so signals are handled promptly on every platform.
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("Cekura API simulator stopped", flush=True)


__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_TOKEN",
    "MAX_PAGE_SIZE",
    "Fault",
    "FieldValidationError",
    "SimulatedApi",
    "SimulatorError",
    "SimulatorServer",
    "UnknownOrganizationError",
    "run_simulator",
    "write_keys_file",
]

"""The simulated Cekura API's state: organizations, balances, keys, the faults to inject, and
counters of the requests served. Thread-safe; knows nothing of HTTP (docs/simulator.md)."""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from poller.devtools.simulator.generate import SimulatorError, generated_org, read_seed_file
from poller.devtools.simulator.records import (
    DEFAULT_THRESHOLD,
    ROLES,
    SUBSCRIPTIONS,
    FieldValidationError,
    Member,
    OrgRecord,
    dumps,
    is_int,
    money_value,
    subscription_variants,
    timestamp,
    validated_settings,
)
from poller.devtools.simulator.usage import Crossing, UsageModel, micros
from poller.engine.model import utc_now

DEFAULT_TOKEN = "sim-token"
ENDPOINTS = ("list", "list_v2", "retrieve", "patch", "billing")
FAULT_KINDS = ("latency", "status", "rate_limit", "malformed", "drop")
_MAX_PAST_MODEL_DAYS = 30


class UnknownOrganizationError(LookupError):
    """The simulator has no organization with this id."""

    def __init__(self, org_id: object) -> None:
        super().__init__(f"no organization with id {org_id}")
        self.org_id = org_id


@dataclass(frozen=True)
class Fault:
    """A misbehaviour injected into matching API requests (kinds in docs/simulator.md)."""

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
        if self.org_id is not None and not is_int(self.org_id):
            raise ValueError("fault org_id must be an integer or null")
        if not is_int(self.status) or not 400 <= self.status <= 599:
            raise ValueError("fault status must be an HTTP error status (400-599)")
        if not is_int(self.retry_after) or self.retry_after < 0:
            raise ValueError("fault retry_after must be a whole number of seconds >= 0")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int | float):
            raise ValueError("fault seconds must be a number")
        if self.seconds < 0:
            raise ValueError("fault seconds must be >= 0")
        if self.times is not None and (not is_int(self.times) or self.times < 1):
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
        self._clock = clock or utc_now
        self._lock = threading.Lock()
        self._orgs: dict[int, OrgRecord] = {}
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
        self._next_member_id = itertools.count(1).__next__
        self._subscriptions = subscription_variants(self._clock())
        self._usage: UsageModel | None = None
        self._crossings: list[Crossing] = []  # those of the usage model last turned off

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
                api._insert(
                    generated_org(rng, org_id, used_names, api._next_member_id, api._subscriptions)
                )
                # Gaps between ids catch clients that confuse positions with ids.
                org_id += rng.randint(1, 3)
        return api

    @classmethod
    def from_seed_file(
        cls, path: str | os.PathLike[str], *, token: str | None = None, **options: Any
    ) -> SimulatedApi:
        """Organizations from a JSON seed file (format in docs/simulator.md).

        ``token`` overrides the file's token. Raises SimulatorError with a one-line message.
        """
        file_token, organizations = read_seed_file(path)
        api = cls(token=token or file_token or DEFAULT_TOKEN, **options)
        next_id = 1
        for index, entry in enumerate(organizations):
            spec = dict(entry)
            org_id = spec.pop("id", next_id)
            try:
                added = api.add_org(
                    spec.pop("name", f"Organization {org_id}"), org_id=org_id, **spec
                )
            except (ValueError, TypeError) as exc:
                raise SimulatorError(f"seed file {path}: organizations[{index}]: {exc}") from None
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
        if org_id is not None and not is_int(org_id):
            raise ValueError("id must be an integer")
        if subscription not in SUBSCRIPTIONS:
            raise ValueError(f"subscription must be one of {', '.join(SUBSCRIPTIONS)}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be a non-empty string")
        balance = money_value(credits_remaining, "credits_remaining")
        settings, omitted = validated_settings({"name": name, **fields}, trusted=True)
        org_name = settings.pop("name")
        now = timestamp(self._clock())
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
            record = OrgRecord(
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
            if self._usage is not None:
                self._track(self._usage, record, micros(self._clock()), balance)
        return org_id

    def remove_org(self, org_id: int) -> None:
        """Delete an organization; its API key stops working."""
        with self._lock:
            record = self._record(org_id)
            del self._orgs[org_id]
            del self._org_by_key[record.key]
            self._sorted_ids = None
            if self._usage is not None:
                self._usage.forget(org_id, micros(self._clock()))

    # ---- state changes --------------------------------------------------------------------

    def set_balance(self, org_id: int, amount: Decimal | str | int) -> None:
        """Set credits_remaining; a drop is added to credits_used, as real usage would be.
        With the usage model on, the organization burns from this balance from now on."""
        balance = money_value(amount, "credits_remaining")
        with self._lock:
            now = self._clock()  # under the lock: the usage model's changes stay in time order
            record = self._record(org_id)
            if self._usage is not None:
                self._follow_usage(self._usage, record, micros(now))
            if balance < record.balance:
                record.credits_used += record.balance - balance
            record.balance = balance
            record.billing_updated_at = timestamp(now)
            record.billing_json = None
            self._history.append((now, org_id, balance))
            if self._usage is not None:
                self._track(self._usage, record, micros(now), balance)

    def update_org(self, org_id: int, **fields: Any) -> None:
        """Change Organization fields as the owner would (validated like a PATCH).

        Also accepts ``name`` and ``members`` (see add_org); None on a non-nullable field
        leaves it out of API responses; unknown field names raise FieldValidationError.
        """
        member_specs = fields.pop("members", None)
        settings, omitted = validated_settings(fields, trusted=True)
        with self._lock:
            record = self._record(org_id)
            now = timestamp(self._clock())
            if member_specs is not None:
                record.members = self._members_from_specs(member_specs, now)
            self._apply(record, settings, now)
            record.omitted = (record.omitted - settings.keys()) | omitted
            if self._usage is not None:
                self._track(self._usage, record, micros(self._clock()))

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
            record = self._record(org_id)
            if self._usage is not None:
                self._follow_usage(self._usage, record, micros(self._clock()))
            return record.balance

    def organization(self, org_id: int) -> dict[str, Any]:
        """The Organization JSON the API serves for this id (a fresh copy)."""
        with self._lock:
            return self._payload(self._record(org_id))

    def billing(self, org_id: int) -> dict[str, Any]:
        """The BillingInfo JSON the API serves for this id (a fresh copy)."""
        billing: dict[str, Any] = json.loads(self.billing_body(org_id))
        return billing

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

    def crossings(self) -> list[Crossing]:
        """Every balance that fell below its threshold up to now since the usage model was
        last turned on, oldest first (docs/simulator.md)."""
        with self._lock:
            if self._usage is None:
                return list(self._crossings)
            return self._usage.crossings(micros(self._clock()))

    def usage(self) -> UsageModel | None:
        """The usage model in force (read its seed, scale and start only), or None."""
        return self._usage

    # ---- the usage model ----------------------------------------------------------------------

    def enable_usage(self, *, seed: int, scale: float, start: datetime | None = None) -> None:
        """Burn credits from now on (docs/simulator.md, "Usage model"): every balance from its
        current value, along timelines drawn from ``seed`` that begin at ``start`` (None: now;
        at most 30 model days ago), in model time ``scale`` times as fast as real time.
        Reconfiguring starts afresh: the crossings recorded so far are dropped."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError("usage seed must be an integer")
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ValueError("usage scale must be a number")
        if start is not None and start.tzinfo is None:
            raise ValueError("usage start must have a time zone")
        with self._lock:
            now = self._clock()
            usage = UsageModel(seed, scale, start or now)
            # Drawing the timelines up to now is bounded by this.
            if (now - usage.start).total_seconds() * scale > _MAX_PAST_MODEL_DAYS * 86400:
                raise ValueError(
                    f"usage start must be at most {_MAX_PAST_MODEL_DAYS} model days before now"
                )
            at = micros(now)
            if self._usage is not None:
                for record in self._orgs.values():
                    self._follow_usage(self._usage, record, at)
            for record in self._orgs.values():
                self._track(usage, record, at, record.balance)
            self._usage = usage
            self._crossings = []

    def disable_usage(self) -> None:
        """Stop burning: balances keep the values they have now; the crossings so far stay
        readable until the model is turned on again."""
        with self._lock:
            if (usage := self._usage) is None:
                return
            at = micros(self._clock())
            for record in self._orgs.values():
                self._follow_usage(usage, record, at)
            self._crossings = usage.crossings(at)
            self._usage = None

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
        settings, _ = validated_settings(data, trusted=False)
        with self._lock:
            record = self._record(org_id)
            now = self._clock()
            self._apply(record, settings, timestamp(now))
            if self._usage is not None:
                self._track(self._usage, record, micros(now))
            return self._payload(record)

    def billing_body(self, org_id: int) -> bytes:
        """The BillingInfo JSON as served (the hot path: built once per change of balance,
        which with the usage model on is once per cent burnt at most)."""
        with self._lock:
            record = self._record(org_id)
            if self._usage is not None:
                self._follow_usage(self._usage, record, micros(self._clock()))
            return self._billing_json(record)

    # ---- internals (callers hold the lock) ------------------------------------------------------

    @staticmethod
    def _track(
        usage: UsageModel, record: OrgRecord, at: int, balance: Decimal | None = None
    ) -> None:
        """Tell the model the organization's balance (None: unchanged) and alert settings
        as the API serves them, from ``at`` on."""
        if "low_credits_threshold" in record.omitted:
            threshold = DEFAULT_THRESHOLD  # as a client reads a threshold left out
        else:
            threshold = record.settings.get("low_credits_threshold", DEFAULT_THRESHOLD)
        notify = (
            None
            if "notify_low_credits" in record.omitted
            else record.settings.get("notify_low_credits", True)
        )
        usage.track(record.id, at, Decimal(threshold), notify, balance)

    @staticmethod
    def _follow_usage(usage: UsageModel, record: OrgRecord, at: int) -> None:
        """Bring the record's balance to the model's at ``at``; credits burnt are used."""
        balance = Decimal(usage.cents(record.id, at)).scaleb(-2)
        if balance != record.balance:
            record.credits_used += record.balance - balance
            record.balance = balance
            record.billing_json = None

    def _billing_json(self, record: OrgRecord) -> bytes:
        if record.billing_json is None:
            record.billing_json = self._build_billing_json(record)
        return record.billing_json

    def _build_billing_json(self, record: OrgRecord) -> bytes:
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
            return dumps({**json.loads(body), **raw})
        return body

    def _org_json(self, record: OrgRecord) -> bytes:
        if record.org_json is None:
            served = self._raw_org_bodies.get(record.id)
            record.org_json = dumps(self._payload(record)) if served is None else served
        return record.org_json

    def _payload(self, record: OrgRecord) -> dict[str, Any]:
        body = record.payload()
        raw = self._raw_org_fields.get(record.id)
        if raw:
            body.update(raw)
        return body

    def _insert(self, record: OrgRecord) -> None:
        self._orgs[record.id] = record
        self._org_by_key[record.key] = record.id
        self._sorted_ids = None
        self._history.append((self._clock(), record.id, record.balance))

    def _record(self, org_id: int) -> OrgRecord:
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
    def _apply(record: OrgRecord, settings: dict[str, Any], now: str) -> None:
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
    ) -> tuple[Member, ...]:
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
            member_id = self._next_member_id()
            # User ids differ from membership ids, as in the real API.
            members.append(
                Member(member_id, 5000 + member_id, name, email, role, notify, created_at)
            )
        return tuple(members)

"""The simulator's organizations: their records, the JSON they serve, and the validation of
their fields with Django REST Framework's semantics and messages."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

DEFAULT_THRESHOLD = "1000.00"
SUBSCRIPTIONS = ("active", "trial", "expired", "inactive")
ROLES = ("admin", "member", "view_only", "internal_view", "labs", "labs_view_only", "insights_view")
CENT = Decimal("0.01")


# The Organization fields other than id, name, members, projects and timestamps, in spec order.
ORG_DEFAULTS: dict[str, Any] = {
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


class FieldValidationError(ValueError):
    """Invalid organization fields; ``errors`` is the DRF-shaped body ``{field: [messages]}``."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in errors.items()))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Member:
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


class OrgRecord:
    """One organization's state; settings hold only what differs from ORG_DEFAULTS."""

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
        members: tuple[Member, ...],
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
        body: dict[str, Any] = {"id": self.id, "name": self.name, **ORG_DEFAULTS}
        body.update(self.settings)
        for name in self.omitted:
            del body[name]
        body["members"] = [member.payload() for member in self.members]
        body["projects"] = []
        body["created_at"] = self.created_at
        body["updated_at"] = self.updated_at
        return body


# ---- validation (DRF field semantics) ------------------------------------------------------


def validated_settings(
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
            if name in ORG_DEFAULTS:
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
            elif trusted and name not in ORG_DEFAULTS:
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
    return str(number.quantize(CENT))


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


def money_value(value: Any, field: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError(f"{field} must be a decimal string or Decimal, not {type(value).__name__}")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{field} is not a number: {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"{field} must be finite")
    return number.quantize(CENT)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def subscription_variants(now: datetime) -> dict[str, str]:
    """The SubscriptionStatus JSON for each kind of subscription, serialised once."""
    started = now - timedelta(days=400)

    def status(kind: str, pack: str | None, expire_in: int | None) -> str:
        expire_at = None if expire_in is None else now + timedelta(days=expire_in)
        body = {
            "status": kind,
            "is_active": kind in ("active", "trial"),
            "is_trial": kind == "trial",
            "pack_name": pack,
            "expire_at": expire_at and timestamp(expire_at),
            "last_payment_at": expire_at and timestamp(expire_at - timedelta(days=30)),
            "days_until_expiry": expire_in,
            "created_at": None if pack is None else timestamp(started),
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
        return dumps(body).decode()

    return {
        "active": status("active", "Startup", 24),
        "trial": status("trial", "Trial", 10),
        "expired": status("expired", "Startup", -5),
        "inactive": status("inactive", None, None),
    }


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def dumps(body: object) -> bytes:
    # DRF's JSONRenderer: compact separators, UTF-8 rather than \u escapes.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

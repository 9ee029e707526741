"""Data for the simulator: generated fleets (random but reproducible organizations) and the
seed file's format (docs/simulator.md)."""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from poller.devtools.simulator.records import (
    CENT,
    DEFAULT_THRESHOLD,
    SUBSCRIPTIONS,
    Member,
    OrgRecord,
    timestamp,
)


class SimulatorError(Exception):
    """A problem starting the simulator (bad seed file, port in use); the message is one line."""


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


def generated_org(
    rng: random.Random,
    org_id: int,
    used_names: set[str],
    next_member_id: Callable[[], int],
    subscriptions: dict[str, str],
) -> OrgRecord:
    """One organization drawn from ``rng``; ``subscriptions`` maps a kind to its JSON."""
    name = f"{rng.choice(_NAME_WORDS)} {rng.choice(_NAME_TRADES)}{rng.choice(_NAME_SUFFIXES)}"
    if name in used_names:
        name = f"{name} {org_id}"
    used_names.add(name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    domain = f"{slug}.test" if rng.random() < 0.3 else f"{slug}.example.com"
    created = _GENERATED_EPOCH + timedelta(seconds=rng.randint(0, 600 * 86400))
    created_at = timestamp(created)

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
        member_id = next_member_id()
        members.append(
            Member(member_id, 5000 + member_id, f"{first} {last}", email, role, notify, created_at)
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
    initial = max(Decimal(rng.choice((10_000, 50_000, 100_000))), balance).quantize(CENT)
    expiry = None
    if rng.random() < 0.2:
        expiry = timestamp(created + timedelta(days=rng.randint(400, 900)))
    subscription = rng.choices(SUBSCRIPTIONS, cum_weights=(80, 90, 95, 100))[0]
    return OrgRecord(
        org_id=org_id,
        name=name,
        settings=settings,
        omitted=frozenset(omitted),
        members=tuple(members),
        created_at=created_at,
        key=f"sim_{rng.getrandbits(128):032x}",
        balance=balance.quantize(CENT),
        credits_used=(initial - balance).quantize(CENT),
        initial_balance=initial,
        balance_expiry=expiry,
        subscription=subscriptions[subscription],
    )


def read_seed_file(path: str | os.PathLike[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(the file's token or None, its organizations' objects); SimulatorError if the file
    cannot be read or is not shaped as docs/simulator.md says."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), parse_float=Decimal)
    except OSError as exc:
        raise SimulatorError(f"cannot read seed file {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SimulatorError(f"seed file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("organizations"), list):
        raise SimulatorError(f"seed file {path} needs an object with an organizations list")
    token = data.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        raise SimulatorError(f"seed file {path}: token must be a non-empty string")
    for index, entry in enumerate(data["organizations"]):
        if not isinstance(entry, dict):
            raise SimulatorError(f"seed file {path}: organizations[{index}] must be an object")
    return token, data["organizations"]

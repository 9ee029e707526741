"""Commands about organizations as poller knows them: `status`, `forecast`, `configure`."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from poller.cekura.client import CekuraClient
from poller.cli.common import EXIT_INCOMPLETE, fail, open_store
from poller.cli.present import (
    next_read_json,
    no_estimate_reason,
    outlook_json,
    print_forecast,
    print_status_table,
    status_json,
)
from poller.cli.terminal import echo, echo_json
from poller.config.settings import Settings
from poller.engine.model import ScheduledRead, utc_now
from poller.engine.outlook import Outlook, outlooks
from poller.mail import format_credits
from poller.store import StatusRow

# The API's own rule for low_credits_threshold (DRF DecimalField, max_digits=10, places=2).
THRESHOLD_PATTERN = re.compile(r"^\d{1,8}(\.\d{1,2})?$")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(settings: Settings, as_json: bool) -> None:
    """Show every organization poller knows: balance, threshold, state, last alert; on the
    adaptive schedule also when each is read next, and why.

    \b
    Example:
      poller status --json | jq '.[] | select(.state == "alerted")'
    """
    store = open_store(settings)
    rows = store.status_rows()
    now = utc_now()
    schedule = store.scheduled_reads() if settings.schedule == "adaptive" else None
    if schedule is not None:
        # Each org's own last read: the last cycle (a listing) read no balance.
        rows = [_last_read(row, schedule.get(row.org_id)) for row in rows]
    outlook = outlooks(store, settings, [outlook_key(row) for row in rows])
    if as_json:
        echo_json(
            [
                status_json(row)
                | outlook_json(outlook[row.org_id])
                | next_read_json((schedule or {}).get(row.org_id), now)
                for row in rows
            ]
        )
        return
    if not rows:
        echo("no organizations recorded yet: run `poller once` first")
        return
    print_status_table(rows, outlook, schedule, now)


def _last_read(row: StatusRow, read: ScheduledRead | None) -> StatusRow:
    if read is None or read.last_read_at is None:
        return row
    return dataclasses.replace(row, last_checked_at=read.last_read_at)


@click.command("forecast")
@click.option("--org", "org_id", type=int, required=True, help="Organization id.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def forecast_command(settings: Settings, org_id: int, as_json: bool) -> None:
    """Explain an organization's burn rate and runway from its recorded balance history.

    Reads only the database, as of the organization's last check.

    \b
    Example:
      poller forecast --org 37
    """
    outlook = _outlook_for(settings, org_id)
    if as_json:
        echo_json({"org_id": org_id} | outlook_json(outlook))
        return
    print_forecast(org_id, outlook)


@click.command()
@click.option("--org", "org_id", type=int, required=True, help="Organization id.")
@click.option(
    "--enable/--disable", "enable", default=None, help="Turn low-credit emails on or off."
)
@click.option(
    "--threshold",
    metavar="AMOUNT",
    help="Alert when credits drop below AMOUNT; 'suggest' uses the advice of "
    "`poller status` (ADVICE_DAYS days of typical usage).",
)
@click.pass_obj
def configure(settings: Settings, org_id: int, enable: bool | None, threshold: str | None) -> None:
    """Change an organization's low-credit alert settings through the Cekura API.

    \b
    Examples:
      poller configure --org 37 --enable --threshold 2500
      poller configure --org 37 --threshold suggest
    """
    changes: dict[str, Any] = {}
    if threshold is not None and threshold.strip().lower() == "suggest":
        changes["low_credits_threshold"] = str(_suggested_threshold(settings, org_id))
    elif threshold is not None:
        changes["low_credits_threshold"] = str(parse_threshold(threshold))
    if enable is not None:
        changes["notify_low_credits"] = enable
    if not changes:
        raise click.UsageError("nothing to change: give --enable, --disable or --threshold")
    settings.require_credentials()
    with CekuraClient(settings) as client:
        org = client.patch_organization(org_id, changes)
    echo(
        f"{org.name} (id {org.id}): low-credit emails "
        f"{'on' if org.notify_low_credits else 'off'}, "
        f"threshold {format_credits(org.low_credits_threshold)}"
    )


def _suggested_threshold(settings: Settings, org_id: int) -> Decimal:
    outlook = _outlook_for(settings, org_id)
    suggestion = outlook.suggested_threshold
    if suggestion is None:
        fail(
            f"no threshold to suggest for organization {org_id}: "
            f"{no_estimate_reason(outlook.forecast.week)}",
            EXIT_INCOMPLETE,
        )
    return suggestion


def _outlook_for(settings: Settings, org_id: int) -> Outlook:
    """The stored outlook of one org (from the database, as of its last check)."""
    store = open_store(settings)
    row = next((r for r in store.status_rows() if r.org_id == org_id), None)
    if row is None:
        fail(
            f"organization {org_id} is not in the database yet: run `poller once` or "
            f"`poller check --org {org_id}` first",
            EXIT_INCOMPLETE,
        )
    return outlooks(store, settings, [outlook_key(row)])[org_id]


def outlook_key(row: StatusRow) -> tuple[int, Decimal, Decimal, datetime]:
    return (row.org_id, row.balance, row.threshold, row.last_checked_at or row.changed_at)


def parse_threshold(text: str) -> Decimal:
    """Validate an amount as the API would, before any request is made."""
    cleaned = text.strip().replace(",", "").replace("_", "")
    try:
        amount = Decimal(cleaned)
    except InvalidOperation:
        raise click.BadParameter(f"{text!r} is not a number", param_hint="--threshold") from None
    if not THRESHOLD_PATTERN.match(cleaned):
        raise click.BadParameter(
            f"{text!r}: use a non-negative amount with at most 8 digits before the decimal "
            "point and 2 after it (e.g. 2500 or 499.50)",
            param_hint="--threshold",
        )
    return amount

"""How commands show what they found: the check report, the status table, the forecast, and
the JSON forms of each. Everything printed goes through poller.cli.terminal."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from decimal import Decimal
from typing import Any

from poller.cli.terminal import echo, safe_for_terminal
from poller.engine.cycle import CycleReport
from poller.engine.decide import OrgPlan
from poller.engine.forecast import BEYOND_HORIZON, MIN_POINTS, MIN_SPAN, Window
from poller.engine.model import ScheduledRead
from poller.engine.outcomes import delivery_summary
from poller.engine.outlook import Outlook
from poller.engine.schedule import duration
from poller.mail import (
    format_amount,
    format_credits,
    format_detected_at,
    format_rate,
    format_runway,
)
from poller.store import StatusRow


def plan_json(
    plan: OrgPlan, report: CycleReport, dry_run: bool, email: dict[str, Any] | None
) -> dict[str, Any]:
    snap = plan.snapshot
    return {
        "org_id": snap.id,
        "name": snap.name,
        "balance": str(snap.balance),
        "threshold": str(snap.threshold),
        "enabled": snap.enabled,
        "state_before": plan.before.state.value if plan.before else None,
        "state": plan.decision.state.value,
        "breach_count": plan.decision.breach_count,
        "action": report.action(plan),
        "dry_run": dry_run,
        "email": email,
    }


def print_plan(
    plan: OrgPlan,
    report: CycleReport,
    dry_run: bool,
    email: dict[str, Any] | None,
    outlook: Outlook,
) -> None:
    snap = plan.snapshot
    before = plan.before.state.value if plan.before else "new"
    rows = [
        ("organization", f"{snap.name} (id {snap.id})"),
        ("balance", format_credits(snap.balance)),
        ("threshold", format_credits(snap.threshold)),
        ("alerts enabled", "yes" if snap.enabled else "no"),
        ("state", f"{before} -> {plan.decision.state.value}"),
        ("breaches so far", str(plan.decision.breach_count)),
        ("action", ("would be: " if dry_run else "") + report.action(plan)),
        ("burn rate", rate_text(outlook)),
        ("runs out", runs_out_text(outlook)),
    ]
    for label, value in rows:
        echo(f"{label:>16}: {value}")
    if email is not None:
        echo(f"\nTo: {', '.join(email['to']) or '(nobody)'}\nSubject: {email['subject']}\n")
        echo(email["text"])


def status_cells(row: StatusRow, outlook: Outlook) -> tuple[str, ...]:
    def when(value: Any) -> str:
        return value.strftime("%Y-%m-%d %H:%M") if value else "-"

    return (
        str(row.org_id),
        # Escaped before it is measured, so the columns line up with what the terminal shows.
        shorten(safe_for_terminal(row.name), 30),
        format_amount(row.balance),
        format_amount(row.threshold),
        "yes" if row.enabled else "no",
        row.state.value,
        when(row.last_checked_at),
        when(row.last_alert_at),
        delivery_text(row),
        "-" if outlook.forecast.rate is None else f"{outlook.forecast.rate:,.2f}",
        runs_out_text(outlook) if outlook.forecast.rate is not None else "-",
        advice_text(outlook),
    )


def rate_text(outlook: Outlook) -> str:
    day, week = outlook.forecast.day, outlook.forecast.week
    if day.rate is None and week.rate is None:
        return f"no estimate ({no_estimate_reason(week)})"
    parts = [
        f"{format_rate(rate)}/day over the last {label}"
        for label, rate in (("24 h", day.rate), ("7 days", week.rate))
        if rate is not None
    ]
    return "; ".join(parts)


def runs_out_text(outlook: Outlook) -> str:
    prediction = outlook.forecast
    if prediction.balance <= 0:
        return "already out"
    if prediction.beyond_horizon:
        return BEYOND_HORIZON
    if prediction.runs_out_at is None or prediction.runway_days is None:
        return "no estimate"
    when = prediction.runs_out_at
    return f"{when:%Y-%m-%d} ({format_runway(prediction.runway_days)})"


def advice_text(outlook: Outlook) -> str:
    if not outlook.threshold_too_low or outlook.suggested_threshold is None:
        return "-"
    return f"raise threshold to {outlook.suggested_threshold:,.2f}"


def no_estimate_reason(window: Window) -> str:
    hours = window.covered.total_seconds() / 3600
    return (
        f"needs at least {MIN_SPAN.total_seconds() / 3600:g} h of history, {MIN_POINTS} "
        f"points and some usage; has {hours:.1f} h, {window.points} points, "
        f"{format_credits(window.used)} used"
    )


def outlook_json(outlook: Outlook) -> dict[str, Any]:
    prediction = outlook.forecast

    def text(value: Decimal | None) -> str | None:
        return None if value is None else str(value.quantize(Decimal("0.01")))

    return {
        "burn_per_day_24h": text(prediction.day.rate),
        "burn_per_day_7d": text(prediction.week.rate),
        # Beyond the horizon a runway has no number (it may be too long to quantize) or date.
        "runway_days": None if prediction.beyond_horizon else text(prediction.runway_days),
        "runs_out_at": prediction.runs_out_at.isoformat() if prediction.runs_out_at else None,
        "runway_beyond_horizon": prediction.beyond_horizon,
        "threshold_too_low": outlook.threshold_too_low,
        "suggested_threshold": text(outlook.suggested_threshold),
    }


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def delivery_text(row: StatusRow) -> str:
    if row.notification_status is None:
        return "-"
    return delivery_summary(
        row.notification_status, row.notification_recipients, row.notification_deliveries or {}
    )


def status_json(row: StatusRow) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(row).items():
        if isinstance(value, Decimal):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    out["delivery"] = delivery_text(row)
    return out


def window_text(window: Window) -> str:
    hours = window.covered.total_seconds() / 3600
    summary = (
        f"{window.points} points over {hours:.1f} h, {format_credits(window.used)} used, "
        f"{window.topups} top-up(s) of {format_credits(window.topped_up)} excluded"
    )
    if window.rate is None:
        return f"{summary}; no rate ({no_estimate_reason(window)})"
    return f"{summary}; {format_rate(window.rate)}/day"


def next_read_text(read: ScheduledRead, now: datetime) -> str:
    """When the adaptive schedule reads the org next: ``in 17 min``, ``due 5 s ago``, or
    ``reading now`` while a replica holds a live claim on it."""
    if read.claimed_by is not None:
        return "reading now"
    seconds = (read.due_at - now).total_seconds()
    if seconds >= 1:
        return f"in {duration(seconds)}"
    return "due now" if seconds > -1 else f"due {duration(-seconds)} ago"


def next_read_json(read: ScheduledRead | None, now: datetime) -> dict[str, Any]:
    if read is None:
        return {}
    return {
        "next_read_at": read.due_at.isoformat(),
        "next_read": next_read_text(read, now),
        "next_read_reason": read.reason,
        "last_read_at": read.last_read_at.isoformat() if read.last_read_at else None,
    }


def print_status_table(
    rows: list[StatusRow],
    outlook: dict[int, Outlook],
    schedule: dict[int, ScheduledRead] | None = None,
    now: datetime | None = None,
) -> None:
    """``schedule`` (the adaptive schedule's queue) adds each org's next read and why."""
    header: tuple[str, ...] = (
        "ID",
        "NAME",
        "BALANCE",
        "THRESHOLD",
        "ON",
        "STATE",
        "LAST CHECKED",
        "LAST ALERT",
        "DELIVERY",
        "BURN/DAY",
        "RUNS OUT",
        "ADVICE",
    )
    table = [header] + [status_cells(row, outlook[row.org_id]) for row in rows]
    if schedule is not None and now is not None:
        table[0] += ("NEXT READ", "WHY")
        for index, row in enumerate(rows, 1):
            read = schedule.get(row.org_id)
            table[index] += (
                (next_read_text(read, now), read.reason) if read else ("not listed yet", "-")
            )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def print_forecast(org_id: int, outlook: Outlook) -> None:
    prediction = outlook.forecast
    echo(
        f"organization {org_id}: {format_credits(prediction.balance)} as of "
        f"{format_detected_at(prediction.as_of)}"
    )
    for label, window in (("last 24 h", prediction.day), ("last 7 days", prediction.week)):
        echo(f"{label}: {window_text(window)}")
    rate = prediction.rate
    if prediction.balance <= 0:
        echo("runway: none, the balance is at or below zero")
    elif rate is None:
        echo("runway: no estimate (neither window is meaningful)")
    else:
        source = "last 24 h" if prediction.day.rate is not None else "last 7 days"
        runway = (
            BEYOND_HORIZON
            if prediction.runs_out_at is None
            else f"{prediction.runway_days:.1f} days, runs out around "
            f"{format_detected_at(prediction.runs_out_at)}"
        )
        echo(
            f"runway: {format_credits(prediction.balance)} / "
            f"{format_rate(rate)}/day ({source}) = {runway}"
        )
    covered = outlook.covered_days
    if covered is not None and outlook.suggested_threshold is not None:
        verdict = (
            f"less than the {outlook.advice_days} days advised: suggest "
            f"{format_credits(outlook.suggested_threshold)} "
            f"(poller configure --org {org_id} --threshold suggest)"
            if outlook.threshold_too_low
            else "enough"
        )
        echo(
            f"threshold: {format_credits(outlook.threshold)} covers {covered:.1f} days "
            f"of typical usage, {verdict}"
        )

"""What a notification says and who gets it, and the optional notices' own rules.

Every kind (the low-credits alert, runway alert, reminder, recovery notice) is built by
``notification_for``, so who gets an email and which status its row starts with has one
answer. The optional notices beside the main alert are each off by default and never change
the main alert (``poller.engine.rule``):

- **runway alert** (``runway_days``): its own armed/alerted state and breach counter. Armed,
  notifications on, a meaningful forecast and fewer than ``runway_days`` days to zero →
  alerted, one email for that runway breach. Alerted and a top-up (the balance rose) that
  leaves no forecast below ``runway_days`` → armed again.
- **reminder** (``remind_every``): while the main alert stays alerted after a real alert
  (not a ``--baseline`` record), one reminder when ``remind_every`` has passed since the
  alert or the previous reminder. Reminders are numbered per organization; the number is the
  outbox row's sequence, so (org, 'reminder', number) is unique.
- **recovery notice** (``recovery_notice``): one email when an alerted org is re-armed by a
  top-up; written with the re-arm itself (``StateChange.also_notify``), numbered by the breach
  it ends.

Runway and reminder state live in ``notice_state`` (``poller.store.notice_states``). Pure: the
cycle decides them with the main alert in ``poller.engine.decide``.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from poller.engine.forecast import Forecast
from poller.engine.model import (
    AlertState,
    NewNotification,
    NoticeState,
    NotificationKind,
    NotificationStatus,
    OrgSnapshot,
)
from poller.mail import AlertContent, render_subject


def addressees(snapshot: OrgSnapshot, baseline: bool) -> tuple[tuple[str, ...], NotificationStatus]:
    """Who a notice goes to, and the outbox status it starts with."""
    recipients = tuple(member.email for member in snapshot.org.alert_recipients())
    if baseline:
        return recipients, NotificationStatus.BASELINE
    if not snapshot.org.send_emails_enabled:
        return recipients, NotificationStatus.SUPPRESSED
    if not recipients:
        return recipients, NotificationStatus.NO_RECIPIENTS
    return recipients, NotificationStatus.PENDING


def content_for(
    snapshot: OrgSnapshot,
    *,
    kind: NotificationKind,
    number: int,
    billing_url: str,
    now: datetime,
) -> AlertContent:
    return AlertContent(
        org_id=snapshot.id,
        org_name=snapshot.name,
        breach_number=number,
        balance=snapshot.balance,
        threshold=snapshot.threshold,
        detected_at=now,
        billing_url=billing_url,
        auto_refill=snapshot.org.auto_refill,
        kind=kind,
    )


def notification_for(
    content: AlertContent, snapshot: OrgSnapshot, baseline: bool
) -> NewNotification:
    recipients, status = addressees(snapshot, baseline)
    return NewNotification(
        kind=NotificationKind(content.kind),
        breach_number=content.breach_number,
        org_name=snapshot.name,
        recipients=recipients,
        subject=render_subject(content),
        balance=snapshot.balance,
        threshold=snapshot.threshold,
        detected_at=content.detected_at,
        status=status,
        auto_refill=snapshot.org.auto_refill,
        burn_per_day=content.burn_per_day,
        runs_out_at=content.runs_out_at,
    )


def forecast_fields(forecast: Forecast | None) -> dict[str, Any]:
    """burn_per_day and runs_out_at for a notice, when the estimate is worth a sentence.

    A rate without a date means a runway beyond the horizon (see ``mail.runway_phrase``)."""
    if forecast is None or forecast.rate is None or forecast.balance <= 0:
        return {}
    return {"burn_per_day": forecast.rate, "runs_out_at": forecast.runs_out_at}


def runway_transition(
    state: NoticeState,
    *,
    enabled: bool,
    forecast: Forecast | None,
    topped_up: bool,
    runway_days: Decimal,
) -> NoticeState | None:
    """The runway alert's next state, or None when it does not change."""
    days = forecast.runway_days if forecast is not None else None
    short = days is not None and days < runway_days
    if state.runway == AlertState.ARMED and enabled and short:
        return replace(state, runway=AlertState.ALERTED, runway_breaches=state.runway_breaches + 1)
    if state.runway == AlertState.ALERTED and topped_up and not short:
        return replace(state, runway=AlertState.ARMED)
    return None


def reminder_due(
    state: NoticeState,
    *,
    alerted: bool,
    enabled: bool,
    last_alert_at: datetime | None,
    every: timedelta,
    now: datetime,
) -> bool:
    """Whether an alerted org is owed a reminder now (at most one per ``every``)."""
    if not alerted or not enabled or last_alert_at is None:
        return False
    since = last_alert_at
    if state.reminded_at is not None and state.reminded_at > since:
        since = state.reminded_at
    return now - since >= every

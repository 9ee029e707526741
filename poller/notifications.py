"""What an outbox row says: the email's content and its addressees, for every kind of notice.

The main low-credits alert and the optional notices (runway, reminder, recovery) are built
the same way, so who gets an email and which status its row starts with has one answer.
"""

from __future__ import annotations

from datetime import datetime

from poller.mail import AlertContent, render_subject
from poller.records import OrgSnapshot
from poller.store import NewNotification


def addressees(snapshot: OrgSnapshot, baseline: bool) -> tuple[tuple[str, ...], str]:
    """Who a notice goes to, and the outbox status it starts with."""
    recipients = tuple(member.email for member in snapshot.org.alert_recipients())
    if baseline:
        return recipients, "baseline"
    if not snapshot.org.send_emails_enabled:
        return recipients, "suppressed"
    if not recipients:
        return recipients, "no_recipients"
    return recipients, "pending"


def content_for(
    snapshot: OrgSnapshot, *, kind: str, number: int, billing_url: str, now: datetime
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
        kind=content.kind,
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

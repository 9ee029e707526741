"""Everything a cycle decides for one organization, in one pure step.

The alert rule (``poller.engine.rule``), the forecast its email carries, the recovery notice of
a re-arm by a top-up, the runway alert and the reminder are decided together from what the
store held before the cycle and what the API says now. No I/O, no clock: the cycle loads the
inputs, calls ``decide`` per organization, and writes every plan in one persist step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal

from poller.config.settings import Settings
from poller.engine.forecast import Forecast, Point, forecast
from poller.engine.model import (
    NOTICE_INITIAL,
    AlertState,
    Decision,
    NewNotification,
    NoticeChange,
    NoticeState,
    NotificationKind,
    NotificationStatus,
    ObservedOrg,
    OrgSnapshot,
    StateChange,
    StoredRow,
    StoredState,
)
from poller.engine.notices import (
    content_for,
    forecast_fields,
    notification_for,
    reminder_due,
    runway_transition,
)
from poller.engine.rule import evaluate


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings the decisions read, fixed for one cycle."""

    rearm_margin: Decimal
    billing_url: str
    baseline: bool  # first sight: record breaches without email, no optional notices
    recovery_notice: bool
    runway_days: Decimal | None
    remind_every: timedelta | None
    now: datetime

    @classmethod
    def of(cls, settings: Settings, *, baseline: bool, now: datetime) -> Policy:
        every = settings.remind_every
        return cls(
            rearm_margin=settings.rearm_margin,
            billing_url=settings.billing_url,
            baseline=baseline,
            recovery_notice=settings.recovery_notice,
            runway_days=settings.runway_days,
            remind_every=None if every is None else timedelta(seconds=every),
            now=now,
        )

    @property
    def notices(self) -> bool:
        """Whether runway alerts or reminders are decided at all."""
        return not self.baseline and (self.runway_days is not None or self.remind_every is not None)


@dataclass(frozen=True, slots=True)
class Known:
    """What the store held of one organization before this cycle."""

    row: StoredRow | None
    notice: NoticeState | None = None  # None: no notice_state row
    last_alert_at: datetime | None = None  # when its current breach was alerted (by email)


NOTHING_KNOWN = Known(None)


@dataclass(slots=True)
class OrgPlan:
    """What the cycle decided for one organization, before anything is written.

    Read-only by convention: not frozen because a cycle builds one per organization and a
    frozen dataclass takes several times as long to build.
    """

    snapshot: OrgSnapshot
    before: StoredState | None
    decision: Decision
    change: StateChange | None  # None: the alert state and observed values stay as stored
    notice: NoticeChange | None = None  # the runway alert's / reminders' write, if any
    forecast: Forecast | None = None  # computed only where a notice needed one
    # The balance moved (or was first seen): a point for the history.
    record_balance: bool = False

    @property
    def notification(self) -> NewNotification | None:
        return self.change.notification if self.change else None

    @property
    def action(self) -> str:
        """One verb for people: what this cycle did (or would do) for the organization."""
        if self.notification is not None:
            return {
                NotificationStatus.PENDING: "alerted",
                NotificationStatus.SUPPRESSED: (
                    "alerted (emails disabled for the organization: suppressed)"
                ),
                NotificationStatus.NO_RECIPIENTS: (
                    "alerted (no admin with an email address: nobody to notify)"
                ),
                NotificationStatus.BASELINE: "recorded below threshold (baseline: no email)",
            }[self.notification.status]
        if self.decision.rearmed:
            return "re-armed"
        if self.before is None:
            return "first seen"
        return "no change"


def needs_history(snapshot: OrgSnapshot, known: Known, policy: Policy) -> bool:
    """Whether ``decide`` will forecast for this org, so the cycle must load its history.

    An alert's email carries a forecast, and the runway alert and reminders are decided on
    one; an unchanged organization needs none (most of them, on most cycles).
    """
    row = known.row
    decision = evaluate(row.stored if row else None, snapshot, policy.rearm_margin)
    if decision.breached:
        return True
    return policy.notices and (
        _runway_candidate(snapshot, row, policy) or _reminder_due(snapshot, known, decision, policy)
    )


def decide(
    snapshot: OrgSnapshot, known: Known, policy: Policy, history: Sequence[Point] | None
) -> OrgPlan:
    """The organization's plan; ``history`` is its recorded balances (None: not loaded)."""
    row = known.row
    before = row.stored if row is not None else None
    decision = evaluate(before, snapshot, policy.rearm_margin)
    prediction = None
    if history is not None:
        prediction = forecast(with_current(history, Point(policy.now, snapshot.balance)))

    notice = _notice_change(snapshot, known, decision, prediction, policy)
    alert = None
    if decision.breached:
        alert = _notification(
            snapshot, NotificationKind.LOW_CREDITS, decision.breach_count, prediction, policy
        )
    elif (
        row is not None
        and not decision.changed_from(before)
        and not row.differs_from(snapshot, row.stored)
    ):
        # Most organizations on most cycles: no state to write (maybe a reminder is due).
        return OrgPlan(snapshot, before, decision, None, notice, prediction)
    also_notify: tuple[NewNotification, ...] = ()
    if _recovered(snapshot, row, decision, policy):
        also_notify = (
            _notification(snapshot, NotificationKind.RECOVERY, decision.breach_count, None, policy),
        )
    observed = ObservedOrg(
        snapshot.id, snapshot.name, snapshot.enabled, snapshot.threshold, snapshot.balance
    )
    change = StateChange(observed, before, decision.stored, alert, also_notify)
    record_balance = row is None or row.balance != snapshot.balance
    return OrgPlan(snapshot, before, decision, change, notice, prediction, record_balance)


def with_current(points: Sequence[Point], current: Point) -> list[Point]:
    """The recorded series followed by the latest observation (unless it is recorded already)."""
    if points and points[-1].at >= current.at:
        return list(points)
    return [*points, current]


def _notice_change(
    snapshot: OrgSnapshot,
    known: Known,
    decision: Decision,
    prediction: Forecast | None,
    policy: Policy,
) -> NoticeChange | None:
    """The runway alert's and the reminder's write for this cycle, if either moves."""
    if not policy.notices:
        return None
    current = known.notice or NOTICE_INITIAL
    new = current
    notices = []
    row = known.row
    if (
        policy.runway_days is not None
        and row is not None
        and _runway_candidate(snapshot, row, policy)
    ):
        moved = runway_transition(
            current,
            enabled=snapshot.enabled,
            forecast=prediction,
            topped_up=snapshot.balance > row.balance,
            runway_days=policy.runway_days,
        )
        if moved is not None:
            new = moved
            if moved.runway_breaches > current.runway_breaches:
                notices.append(
                    _notification(
                        snapshot, NotificationKind.RUNWAY, moved.runway_breaches, prediction, policy
                    )
                )
    if _reminder_due(snapshot, known, decision, policy):
        new = replace(new, reminders=new.reminders + 1, reminded_at=policy.now)
        notices.append(
            _notification(snapshot, NotificationKind.REMINDER, new.reminders, prediction, policy)
        )
    if not notices and new == current:
        return None
    return NoticeChange(snapshot.id, known.notice, new, tuple(notices))


def _runway_candidate(snapshot: OrgSnapshot, row: StoredRow | None, policy: Policy) -> bool:
    # Only a balance change can shorten the runway (or be the top-up that re-arms it).
    return policy.runway_days is not None and row is not None and row.balance != snapshot.balance


def _reminder_due(snapshot: OrgSnapshot, known: Known, decision: Decision, policy: Policy) -> bool:
    if policy.remind_every is None or decision.breached:
        return False
    return reminder_due(
        known.notice or NOTICE_INITIAL,
        alerted=decision.state == AlertState.ALERTED,
        enabled=snapshot.enabled,
        last_alert_at=known.last_alert_at,
        every=policy.remind_every,
        now=policy.now,
    )


def _recovered(
    snapshot: OrgSnapshot, row: StoredRow | None, decision: Decision, policy: Policy
) -> bool:
    """Re-armed because the balance went up (not because the threshold went down)."""
    return (
        policy.recovery_notice
        and not policy.baseline
        and decision.rearmed
        and snapshot.enabled
        and row is not None
        and snapshot.balance > row.balance
    )


def _notification(
    snapshot: OrgSnapshot,
    kind: NotificationKind,
    number: int,
    prediction: Forecast | None,
    policy: Policy,
) -> NewNotification:
    content = content_for(
        snapshot, kind=kind, number=number, billing_url=policy.billing_url, now=policy.now
    )
    content = replace(content, **forecast_fields(prediction))
    return notification_for(content, snapshot, policy.baseline)

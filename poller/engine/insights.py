"""The cycle's hooks for balance history, forecasts and the optional notices.

``run_cycle`` calls two of them around its one write of alert states:

- ``before_persist`` adds the forecast to this cycle's main alerts (the email's "you will run
  out around ..." line) and the recovery notice to re-arms by a top-up;
- ``after_persist`` records the changed balances, decides runway alerts and reminders with
  guarded writes of their own, and downsamples / prunes the history now and then.

Forecasts are computed only for organizations that need one this cycle (an alert, a balance
change while the runway alert is on, a reminder), so an unchanged cycle reads no history and
writes none. The main alert rule is never consulted or changed here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Protocol

import structlog

from poller.config.settings import Settings
from poller.engine.forecast import WEEK, Forecast, Point, forecast, needs_advice, suggest_threshold
from poller.engine.model import OrgSnapshot
from poller.engine.notices import (
    NOTICE_INITIAL,
    NoticeChange,
    NoticeState,
    NoticeStore,
    forecast_fields,
    reminder_due,
    runway_transition,
)
from poller.engine.notifications import content_for, notification_for
from poller.engine.rule import AlertState, Decision
from poller.store.database import NewNotification, StateChange, Store, StoredRow
from poller.store.history import History

log = structlog.get_logger(__name__)

# `poller status` over more orgs than this reads the whole recent history in one query
# instead of in batches of org ids.
READ_ALL_ABOVE = 2000


# What a cycle does with an org that one of its steps failed on: (org id, step, exception or
# the reason already put in words). The org is then reported as an error, not written.
OrgFailure = Callable[[int, str, BaseException | str], None]


class PlanLike(Protocol):
    """What the hooks read from a cycle's OrgPlan (structural: cycle imports this module)."""

    snapshot: OrgSnapshot
    decision: Decision
    change: StateChange | None


@dataclass
class InsightReport:
    forecasts: dict[int, Forecast] = field(default_factory=dict)
    notices: list[int] = field(default_factory=list)  # outbox ids of runway alerts, reminders
    conflicts: int = 0


def with_current(points: Sequence[Point], current: Point) -> list[Point]:
    """The recorded series followed by the latest observation (unless it is recorded already)."""
    if points and points[-1].at >= current.at:
        return list(points)
    return [*points, current]


class Insights:
    def __init__(self, store: Store, settings: Settings, *, failed: OrgFailure) -> None:
        self.settings = settings
        self.history = History(store, retention=timedelta(days=settings.history_retention_days))
        self.notices = NoticeStore(store)
        self.failed = failed

    def forecasts(self, snapshots: Iterable[OrgSnapshot], now: datetime) -> dict[int, Forecast]:
        """Each org's forecast from its stored history plus the balance observed at ``now``.

        An org whose forecast raises is handed to ``failed`` and has none."""
        by_id = {snapshot.id: snapshot for snapshot in snapshots}
        if not by_id:
            return {}
        series = self.history.series(by_id, since=now - WEEK)
        forecasts = {}
        for org_id, snapshot in by_id.items():
            try:
                forecasts[org_id] = forecast(
                    with_current(series.get(org_id, []), Point(now, snapshot.balance))
                )
            except Exception as error:
                self.failed(org_id, "forecasting", error)
        return forecasts

    def before_persist(
        self,
        plans: Sequence[PlanLike],
        stored: Mapping[int, StoredRow],
        *,
        baseline: bool,
        now: datetime,
        report: InsightReport,
    ) -> dict[int, StateChange]:
        """The changes it amended, by the plan's position: forecasts on alerts, recovery
        notices on re-arms by a top-up. Plans not in the result keep their change."""
        # Only plans with a change can alert or re-arm: a few percent of them on most cycles.
        changing = [(index, plan) for index, plan in enumerate(plans) if plan.change is not None]
        alerting = [plan.snapshot for _, plan in changing if _alert(plan) is not None]
        report.forecasts.update(self.forecasts(alerting, now))
        recovery = self.settings.recovery_notice and not baseline
        amended: dict[int, StateChange] = {}
        for index, plan in changing:
            try:
                change = self._amended(plan, stored, recovery, report.forecasts, now)
            except Exception as error:
                self.failed(plan.snapshot.id, "preparing notices", error)
                continue
            if change is not plan.change:
                amended[index] = change
        return amended

    def _amended(
        self,
        plan: PlanLike,
        stored: Mapping[int, StoredRow],
        recovery: bool,
        forecasts: Mapping[int, Forecast],
        now: datetime,
    ) -> StateChange:
        """The plan's change with its alert's forecast and its recovery notice, if any."""
        change = plan.change
        assert change is not None
        alert = _alert(plan)
        if alert is not None:
            prediction = forecasts.get(plan.snapshot.id)
            change = replace(change, notification=replace(alert, **forecast_fields(prediction)))
        if recovery and _recovered(plan, stored):
            content = content_for(
                plan.snapshot,
                kind="recovery",
                number=plan.decision.breach_count,
                billing_url=self.settings.billing_url,
                now=now,
            )
            change = replace(
                change, also_notify=(notification_for(content, plan.snapshot, baseline=False),)
            )
        return change

    def after_persist(
        self,
        plans: Sequence[PlanLike],
        stored: Mapping[int, StoredRow],
        *,
        baseline: bool,
        now: datetime,
        report: InsightReport,
    ) -> None:
        # A moved balance always makes a change (StoredRow.differs_from), so only plans with
        # one need looking at.
        changed = [
            plan.snapshot
            for plan in plans
            if plan.change is not None
            and (
                (row := stored.get(plan.snapshot.id)) is None
                or row.balance != plan.snapshot.balance
            )
        ]
        if not baseline and (self.settings.runway_days or self.settings.remind_every):
            self._notices(plans, stored, changed, now, report)
        self.history.record([(snapshot.id, snapshot.balance) for snapshot in changed], now)
        self.history.maintain(now)

    def _notices(
        self,
        plans: Sequence[PlanLike],
        stored: Mapping[int, StoredRow],
        changed: Collection[OrgSnapshot],
        now: datetime,
        report: InsightReport,
    ) -> None:
        states = self.notices.load()
        last_alerts = self.notices.last_alerts() if self.settings.remind_every else {}
        reminding = set()
        if self.settings.remind_every is not None:
            every = timedelta(seconds=self.settings.remind_every)
            for plan in plans:
                try:
                    due = not plan.decision.breached and reminder_due(
                        states.get(plan.snapshot.id, NOTICE_INITIAL),
                        alerted=plan.decision.state == AlertState.ALERTED,
                        enabled=plan.snapshot.enabled,
                        last_alert_at=last_alerts.get(plan.snapshot.id),
                        every=every,
                        now=now,
                    )
                except Exception as error:
                    self.failed(plan.snapshot.id, "deciding a reminder", error)
                    continue
                if due:
                    reminding.add(plan.snapshot.id)
        # Only a balance change can shorten the runway (or be the top-up that re-arms it).
        runway_candidates = (
            [s for s in changed if s.id in stored] if self.settings.runway_days else []
        )
        needed = [s for s in runway_candidates if s.id not in report.forecasts]
        needed += [
            p.snapshot
            for p in plans
            if p.snapshot.id in reminding and p.snapshot.id not in report.forecasts
        ]
        report.forecasts.update(self.forecasts(needed, now))
        # An org whose forecast failed gets no notice decision this cycle (it was reported).
        unforecast = {snapshot.id for snapshot in needed} - report.forecasts.keys()

        runway_ids = {snapshot.id for snapshot in runway_candidates}
        changes = []
        for plan in plans:
            org_id = plan.snapshot.id
            if org_id not in runway_ids and org_id not in reminding or org_id in unforecast:
                continue
            expected = states.get(org_id)
            current = expected or NOTICE_INITIAL
            try:
                new, notices = self._org_notices(
                    plan,
                    stored,
                    current,
                    org_id in runway_ids,
                    org_id in reminding,
                    report.forecasts.get(org_id),
                    now,
                )
            except Exception as error:
                self.failed(org_id, "deciding notices", error)
                continue
            if notices or new != current:
                changes.append(NoticeChange(org_id, expected, new, tuple(notices)))
        ids, conflicts, failed = self.notices.apply(changes, now)
        for org_id, why in failed.items():
            self.failed(org_id, "saving notices", why)
        report.notices += ids
        report.conflicts += conflicts
        for change in changes:
            if change.org_id in failed:
                continue
            for notice in change.notifications:
                log.info(
                    f"org.{notice.kind}_notice",
                    org_id=change.org_id,
                    number=notice.breach_number,
                    status=notice.status,
                )

    def _org_notices(
        self,
        plan: PlanLike,
        stored: Mapping[int, StoredRow],
        state: NoticeState,
        check_runway: bool,
        remind: bool,
        prediction: Forecast | None,
        now: datetime,
    ) -> tuple[NoticeState, list[NewNotification]]:
        snapshot = plan.snapshot
        notices: list[NewNotification] = []
        new = state
        if check_runway and self.settings.runway_days is not None:
            moved = runway_transition(
                state,
                enabled=snapshot.enabled,
                forecast=prediction,
                topped_up=snapshot.balance > stored[snapshot.id].balance,
                runway_days=self.settings.runway_days,
            )
            if moved is not None:
                new = moved
                if moved.runway_breaches > state.runway_breaches:
                    notices.append(
                        self._notice(snapshot, "runway", moved.runway_breaches, prediction, now)
                    )
        if remind:
            new = replace(new, reminders=new.reminders + 1, reminded_at=now)
            notices.append(self._notice(snapshot, "reminder", new.reminders, prediction, now))
        return new, notices

    def _notice(
        self,
        snapshot: OrgSnapshot,
        kind: str,
        number: int,
        prediction: Forecast | None,
        now: datetime,
    ) -> NewNotification:
        content = content_for(
            snapshot, kind=kind, number=number, billing_url=self.settings.billing_url, now=now
        )
        return notification_for(
            replace(content, **forecast_fields(prediction)), snapshot, baseline=False
        )


def _alert(plan: PlanLike) -> NewNotification | None:
    notification = plan.change.notification if plan.change else None
    return notification if notification is not None and notification.kind == "low_credits" else None


def _recovered(plan: PlanLike, stored: Mapping[int, StoredRow]) -> bool:
    """Re-armed because the balance went up (not because the threshold went down)."""
    row = stored.get(plan.snapshot.id)
    return (
        plan.decision.rearmed
        and plan.snapshot.enabled
        and row is not None
        and plan.snapshot.balance > row.balance
    )


@dataclass(frozen=True)
class Outlook:
    """One org's forecast as `poller status`, `check`, `forecast` and `configure` show it."""

    forecast: Forecast
    threshold: Decimal
    advice_days: Decimal

    @property
    def suggested_threshold(self) -> Decimal | None:
        """A threshold worth ``advice_days`` of typical usage, if the usage is known."""
        rate = self.forecast.typical_rate
        return None if rate is None else suggest_threshold(rate, self.advice_days)

    @property
    def threshold_too_low(self) -> bool:
        return needs_advice(self.threshold, self.forecast.typical_rate, self.advice_days)

    @property
    def covered_days(self) -> Decimal | None:
        rate = self.forecast.typical_rate
        return None if rate is None else self.threshold / rate


def outlooks(
    store: Store, settings: Settings, orgs: Sequence[tuple[int, Decimal, Decimal, datetime]]
) -> dict[int, Outlook]:
    """(org id, balance, threshold, as of) → each org's outlook from its stored history.

    ``as of`` is when the balance was last seen: the forecast is as of then, not of now.
    """
    if not orgs:
        return {}
    history = History(store, retention=timedelta(days=settings.history_retention_days))
    wanted = None if len(orgs) > READ_ALL_ABOVE else [org_id for org_id, *_ in orgs]
    since = min(as_of for *_, as_of in orgs) - WEEK
    series = history.series(wanted, since=since)
    result = {}
    for org_id, balance, threshold, as_of in orgs:
        points = [point for point in series.get(org_id, []) if point.at <= as_of]
        prediction = forecast(with_current(points, Point(as_of, balance)))
        result[org_id] = Outlook(prediction, threshold, settings.advice_days)
    return result

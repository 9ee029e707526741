"""Each organization's outlook for people: its forecast and the threshold advice.

What `poller status`, `check`, `forecast` and `configure` show; the cycle's own forecasts are
decided in ``poller.engine.decide``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from poller.config.settings import Settings
from poller.engine.decide import with_current
from poller.engine.forecast import WEEK, Forecast, Point, forecast, needs_advice, suggest_threshold
from poller.engine.ports import AlertStore

# `poller status` over more orgs than this reads the whole recent history in one query
# instead of in batches of org ids.
READ_ALL_ABOVE = 2000


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
    store: AlertStore, settings: Settings, orgs: Sequence[tuple[int, Decimal, Decimal, datetime]]
) -> dict[int, Outlook]:
    """(org id, balance, threshold, as of) → each org's outlook from its stored history.

    ``as of`` is when the balance was last seen: the forecast is as of then, not of now.
    """
    if not orgs:
        return {}
    wanted = None if len(orgs) > READ_ALL_ABOVE else [org_id for org_id, *_ in orgs]
    since = min(as_of for *_, as_of in orgs) - WEEK
    series = store.balance_series(wanted, since=since)
    result = {}
    for org_id, balance, threshold, as_of in orgs:
        points = [point for point in series.get(org_id, []) if point.at <= as_of]
        prediction = forecast(with_current(points, Point(as_of, balance)))
        result[org_id] = Outlook(prediction, threshold, settings.advice_days)
    return result

"""The low-credits alert rule, as Cekura documents it: once per breach, re-arm above the threshold.

Each organization is either ``armed`` or ``alerted`` and carries a breach counter. For one
observation (``enabled`` = notify_low_credits, ``threshold`` = low_credits_threshold,
``balance`` = credits_remaining, which may be negative):

- armed, enabled and balance < threshold (strictly) -> alerted, breach counter + 1, and exactly
  one notification for that breach;
- alerted and balance > threshold + rearm_margin (strictly) -> armed again; re-arming looks only
  at balance and threshold, so it happens even while notifications are disabled;
- anything else -> no change.

An organization with no stored state starts armed with no breaches, and the rule applies to it in
the same evaluation. Pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Protocol

from poller.engine.model import INITIAL, AlertState, Decision, StoredState


class Observed(Protocol):
    """What the rule reads of an observation: an Observation, or a cycle's OrgSnapshot as is
    (one object fewer per organization and cycle)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def threshold(self) -> Decimal: ...

    @property
    def balance(self) -> Decimal: ...


@dataclass(frozen=True, slots=True)
class Observation:
    enabled: bool
    threshold: Decimal
    balance: Decimal


def evaluate(
    stored: StoredState | None,
    observation: Observed,
    rearm_margin: Decimal = Decimal(0),
) -> Decision:
    """Apply the alert rule to one organization's stored state and its latest observation."""
    if rearm_margin < 0:
        # A negative margin would re-arm an org that is still below its threshold, so it would be
        # alerted again on the next cycle: one breach, many emails.
        raise ValueError(f"rearm_margin must not be negative, got {rearm_margin}")
    current = stored if stored is not None else INITIAL
    below = observation.balance < observation.threshold

    if current.state == AlertState.ARMED and observation.enabled and below:
        return Decision(AlertState.ALERTED, current.breach_count + 1, breached=True, rearmed=False)
    if (
        current.state == AlertState.ALERTED
        and observation.balance > observation.threshold + rearm_margin
    ):
        return Decision(AlertState.ARMED, current.breach_count, breached=False, rearmed=True)
    return _unchanged(current)


@lru_cache(maxsize=1024)
def _unchanged(current: StoredState) -> Decision:
    """The decision to change nothing, one per stored state: most organizations get it on every
    cycle, and building a frozen dataclass costs over a microsecond (Decisions are immutable)."""
    return Decision(current.state, current.breach_count, breached=False, rearmed=False)

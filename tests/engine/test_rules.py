"""The alert rule: table tests with plain values, then properties over random observation runs."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.engine.model import INITIAL, AlertState, Decision, StoredState
from poller.engine.rule import Observation, evaluate

ARMED = AlertState.ARMED
ALERTED = AlertState.ALERTED
D = Decimal


def armed(breaches: int = 0) -> StoredState:
    return StoredState(ARMED, breaches)


def alerted(breaches: int = 1) -> StoredState:
    return StoredState(ALERTED, breaches)


def seen(balance: str, threshold: str = "100.00", enabled: bool = True) -> Observation:
    return Observation(enabled=enabled, threshold=D(threshold), balance=D(balance))


def breach(number: int) -> Decision:
    return Decision(ALERTED, number, breached=True, rearmed=False)


def rearm(breaches: int) -> Decision:
    return Decision(ARMED, breaches, breached=False, rearmed=True)


def unchanged(stored: StoredState) -> Decision:
    return Decision(stored.state, stored.breach_count, breached=False, rearmed=False)


RULE_TABLE = [
    # Alerting, margin 0.
    pytest.param(
        armed(),
        seen("99.99"),
        "0",
        breach(1),
        id="an armed enabled org strictly below its threshold is alerted for breach 1",
    ),
    pytest.param(
        armed(),
        seen("100.00"),
        "0",
        unchanged(armed()),
        id="an armed org exactly at its threshold is not alerted",
    ),
    pytest.param(
        armed(),
        seen("100"),
        "0",
        unchanged(armed()),
        id="an armed org at its threshold written with another exponent is not alerted",
    ),
    pytest.param(
        armed(),
        seen("100.01"),
        "0",
        unchanged(armed()),
        id="an armed org above its threshold stays armed",
    ),
    pytest.param(
        armed(),
        seen("5.00", enabled=False),
        "0",
        unchanged(armed()),
        id="an armed org below its threshold with notifications off is not alerted",
    ),
    pytest.param(
        armed(3),
        seen("5.00"),
        "0",
        breach(4),
        id="a new breach continues the stored breach counter",
    ),
    pytest.param(
        armed(),
        seen("400.00", threshold="500.00"),
        "0",
        breach(1),
        id="raising the threshold above the balance while armed alerts",
    ),
    # Staying alerted.
    pytest.param(
        alerted(),
        seen("5.00"),
        "0",
        unchanged(alerted()),
        id="an alerted org still below its threshold sends nothing more",
    ),
    pytest.param(
        alerted(),
        seen("100.00"),
        "0",
        unchanged(alerted()),
        id="an alerted org back exactly at its threshold does not re-arm",
    ),
    pytest.param(
        alerted(),
        seen("5.00", enabled=False),
        "0",
        unchanged(alerted()),
        id="turning notifications off while below does not re-arm",
    ),
    # Re-arming.
    pytest.param(
        alerted(2),
        seen("100.01"),
        "0",
        rearm(2),
        id="an alerted org above its threshold re-arms and keeps its breach counter",
    ),
    pytest.param(
        alerted(),
        seen("150.00", enabled=False),
        "0",
        rearm(1),
        id="an alerted org with notifications off still re-arms once above its threshold",
    ),
    pytest.param(
        alerted(),
        seen("400.00", threshold="300.00"),
        "0",
        rearm(1),
        id="lowering the threshold below the balance while alerted re-arms",
    ),
    # Negative balances and thresholds.
    pytest.param(
        armed(),
        seen("-20.00"),
        "0",
        breach(1),
        id="an armed org with a negative balance below a positive threshold is alerted",
    ),
    pytest.param(
        armed(),
        seen("-5.00", threshold="-10.00"),
        "0",
        unchanged(armed()),
        id="a negative balance above a negative threshold is not alerted",
    ),
    pytest.param(
        armed(),
        seen("-10.00", threshold="-10.00"),
        "0",
        unchanged(armed()),
        id="a negative balance equal to a negative threshold is not alerted",
    ),
    pytest.param(
        armed(),
        seen("-10.01", threshold="-10.00"),
        "0",
        breach(1),
        id="a negative balance below a negative threshold is alerted",
    ),
    pytest.param(
        alerted(),
        seen("-9.99", threshold="-10.00"),
        "0",
        rearm(1),
        id="an alerted org rising above a negative threshold re-arms",
    ),
    pytest.param(
        alerted(),
        seen("-3.00", threshold="-10.00"),
        "5.00",
        rearm(1),
        id="an alerted org above a negative threshold plus the margin re-arms",
    ),
    pytest.param(
        alerted(),
        seen("-6.00", threshold="-10.00"),
        "5.00",
        unchanged(alerted()),
        id="an alerted org above a negative threshold but within the margin stays alerted",
    ),
    # A re-arm margin.
    pytest.param(
        alerted(),
        seen("104.99"),
        "5.00",
        unchanged(alerted()),
        id="an alerted org above its threshold but within the margin stays alerted",
    ),
    pytest.param(
        alerted(),
        seen("105.00"),
        "5.00",
        unchanged(alerted()),
        id="an alerted org exactly at threshold plus margin does not re-arm",
    ),
    pytest.param(
        alerted(),
        seen("105.01"),
        "5.00",
        rearm(1),
        id="an alerted org strictly above threshold plus margin re-arms",
    ),
    pytest.param(
        armed(),
        seen("99.99"),
        "5.00",
        breach(1),
        id="the margin does not delay alerting below the threshold",
    ),
    pytest.param(
        armed(),
        seen("102.00"),
        "5.00",
        unchanged(armed()),
        id="an armed org inside the margin above its threshold is not alerted",
    ),
    # Organizations seen for the first time.
    pytest.param(
        None,
        seen("50.00"),
        "0",
        breach(1),
        id="a first-seen org below its threshold with notifications on breaches at once",
    ),
    pytest.param(
        None,
        seen("50.00", enabled=False),
        "0",
        unchanged(INITIAL),
        id="a first-seen org below its threshold with notifications off starts armed",
    ),
    pytest.param(
        None,
        seen("100.00"),
        "0",
        unchanged(INITIAL),
        id="a first-seen org exactly at its threshold starts armed",
    ),
    pytest.param(
        None,
        seen("500.00"),
        "0",
        unchanged(INITIAL),
        id="a first-seen org above its threshold starts armed",
    ),
]


@pytest.mark.parametrize(("stored", "observation", "margin", "expected"), RULE_TABLE)
def test_the_rule_decides_as_documented(
    stored: StoredState | None, observation: Observation, margin: str, expected: Decision
) -> None:
    assert evaluate(stored, observation, D(margin)) == expected


def test_the_margin_defaults_to_zero() -> None:
    assert evaluate(alerted(), seen("100.01")) == rearm(1)
    assert evaluate(alerted(), seen("100.00")) == unchanged(alerted())


def test_it_does_not_resend_while_still_below() -> None:
    first = evaluate(None, seen("90.00"))
    second = evaluate(first.stored, seen("80.00"))
    third = evaluate(second.stored, seen("-10.00"))
    assert [first.breached, second.breached, third.breached] == [True, False, False]
    assert third.stored == alerted(1)


def test_turning_notifications_on_while_below_alerts_exactly_once() -> None:
    off = evaluate(armed(), seen("50.00", enabled=False))
    switched_on = evaluate(off.stored, seen("50.00", enabled=True))
    still_on = evaluate(switched_on.stored, seen("50.00", enabled=True))
    assert (off.breached, switched_on.breached, still_on.breached) == (False, True, False)
    assert still_on.stored == alerted(1)


def test_it_alerts_again_after_a_top_up_and_a_new_drop() -> None:
    drop = evaluate(None, seen("10.00"))
    top_up = evaluate(drop.stored, seen("900.00"))
    second_drop = evaluate(top_up.stored, seen("20.00"))
    assert (drop.breached, top_up.rearmed, second_drop.breached) == (True, True, True)
    assert second_drop.breach_count == 2


def test_a_negative_margin_is_refused_because_it_would_re_alert_on_every_cycle() -> None:
    with pytest.raises(ValueError, match="rearm_margin must not be negative"):
        evaluate(alerted(), seen("99.00"), D("-5.00"))


def test_initial_state_is_armed_with_no_breaches() -> None:
    assert INITIAL == StoredState(AlertState.ARMED, 0)


def test_states_are_stored_as_their_plain_names() -> None:
    assert [str(state) for state in AlertState] == ["armed", "alerted"]
    assert AlertState("alerted") is ALERTED


@pytest.mark.parametrize(
    ("stored", "observation", "must_write"),
    [
        pytest.param(None, seen("500.00"), True, id="a first-seen org is always written"),
        pytest.param(armed(), seen("500.00"), False, id="an unchanged armed org is not written"),
        pytest.param(alerted(), seen("5.00"), False, id="an org still alerted is not written"),
        pytest.param(armed(), seen("5.00"), True, id="a breach is written"),
        pytest.param(alerted(), seen("500.00"), True, id="a re-arm is written"),
    ],
)
def test_a_decision_says_whether_the_stored_state_must_be_written(
    stored: StoredState | None, observation: Observation, must_write: bool
) -> None:
    assert evaluate(stored, observation).changed_from(stored) is must_write


# --- Properties over random runs --------------------------------------------------------------

# A narrow band of cents makes balance == threshold (and == threshold + margin) common; a wide band
# covers the API's full range of 8 integer digits with 2 places, negatives included.
NARROW_MONEY = st.integers(min_value=-300, max_value=300).map(lambda cents: D(cents).scaleb(-2))
WIDE_MONEY = st.decimals(
    min_value=D("-99999999.99"),
    max_value=D("99999999.99"),
    places=2,
    allow_nan=False,
    allow_infinity=False,
)
MONEY = st.one_of(NARROW_MONEY, WIDE_MONEY)
MARGINS = st.one_of(
    st.just(D(0)), st.integers(min_value=0, max_value=200).map(lambda cents: D(cents).scaleb(-2))
)
OBSERVATIONS = st.builds(Observation, enabled=st.booleans(), threshold=MONEY, balance=MONEY)
RUNS = st.lists(OBSERVATIONS, max_size=40)


@dataclass(frozen=True)
class Step:
    before: StoredState | None
    observation: Observation
    decision: Decision


def fold(observations: list[Observation], margin: Decimal) -> list[Step]:
    steps = []
    stored: StoredState | None = None
    for observation in observations:
        decision = evaluate(stored, observation, margin)
        steps.append(Step(stored, observation, decision))
        stored = decision.stored
    return steps


def reference_model(
    observations: list[Observation], margin: Decimal
) -> list[tuple[bool, int, bool, bool]]:
    """The documented rule restated as a boolean "already told them" flag, for comparison."""
    told, breaches, results = False, 0, []
    for seen_ in observations:
        notify = not told and seen_.enabled and seen_.balance < seen_.threshold
        recovered = told and seen_.balance - seen_.threshold > margin
        if notify:
            told, breaches = True, breaches + 1
        elif recovered:
            told = False
        results.append((told, breaches, notify, recovered))
    return results


run_settings = settings(max_examples=200, deadline=None)


@run_settings
@given(observations=RUNS, margin=MARGINS)
def test_it_agrees_with_an_independent_reference_model(
    observations: list[Observation], margin: Decimal
) -> None:
    actual = [
        (
            s.decision.state == ALERTED,
            s.decision.breach_count,
            s.decision.breached,
            s.decision.rearmed,
        )
        for s in fold(observations, margin)
    ]
    assert actual == reference_model(observations, margin)


@run_settings
@given(observations=RUNS, margin=MARGINS)
def test_between_two_notifications_there_is_always_a_re_arm(
    observations: list[Observation], margin: Decimal
) -> None:
    rearmed_since_last_notification = True
    for step in fold(observations, margin):
        assert not (step.decision.breached and step.decision.rearmed)
        if step.decision.breached:
            assert rearmed_since_last_notification
            rearmed_since_last_notification = False
        if step.decision.rearmed:
            rearmed_since_last_notification = True


@run_settings
@given(observations=RUNS, margin=MARGINS)
def test_it_never_notifies_while_notifications_are_disabled(
    observations: list[Observation], margin: Decimal
) -> None:
    for step in fold(observations, margin):
        if not step.observation.enabled:
            assert not step.decision.breached


@run_settings
@given(observations=RUNS, margin=MARGINS)
def test_it_re_arms_only_above_threshold_plus_margin(
    observations: list[Observation], margin: Decimal
) -> None:
    for step in fold(observations, margin):
        if step.decision.rearmed:
            assert step.observation.balance > step.observation.threshold + margin
            assert step.before is not None and step.before.state == ALERTED


@run_settings
@given(observations=RUNS, margin=MARGINS)
def test_breach_numbers_count_up_by_one_per_notification(
    observations: list[Observation], margin: Decimal
) -> None:
    steps = fold(observations, margin)
    numbers = [s.decision.breach_count for s in steps if s.decision.breached]
    assert numbers == list(range(1, len(numbers) + 1))
    final_count = steps[-1].decision.breach_count if steps else 0
    assert final_count == len(numbers)


@run_settings
@given(observations=RUNS, margin=MARGINS)
def test_an_armed_enabled_org_below_its_threshold_always_ends_the_step_alerted(
    observations: list[Observation], margin: Decimal
) -> None:
    for step in fold(observations, margin):
        before = step.before or INITIAL
        seen_ = step.observation
        if before.state == ARMED and seen_.enabled and seen_.balance < seen_.threshold:
            assert step.decision.state == ALERTED
            assert step.decision.breached


@run_settings
@given(observations=RUNS, margin=MARGINS)
def test_it_is_alerted_exactly_when_the_last_notification_is_newer_than_the_last_re_arm(
    observations: list[Observation], margin: Decimal
) -> None:
    last_notification = last_rearm = -1
    for index, step in enumerate(fold(observations, margin)):
        if step.decision.breached:
            last_notification = index
        if step.decision.rearmed:
            last_rearm = index
        assert (step.decision.state == ALERTED) == (last_notification > last_rearm)


@run_settings
@given(observations=RUNS, margin=MARGINS)
def test_only_a_breach_or_a_re_arm_changes_a_known_org(
    observations: list[Observation], margin: Decimal
) -> None:
    for step in fold(observations, margin):
        decision = step.decision
        if step.before is None:
            assert decision.changed_from(None)
        else:
            assert decision.changed_from(step.before) == (decision.breached or decision.rearmed)


@run_settings
@given(observation=OBSERVATIONS, margin=MARGINS)
def test_a_first_seen_org_is_treated_as_initially_armed(
    observation: Observation, margin: Decimal
) -> None:
    assert evaluate(None, observation, margin) == evaluate(INITIAL, observation, margin)

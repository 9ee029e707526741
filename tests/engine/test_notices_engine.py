"""History, forecasts and the optional notices through real cycles: simulator over HTTP, real
SMTP, SQLite and PostgreSQL, with the clock passed in (each cycle runs at a chosen moment)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from poller.cekura.client import CekuraClient
from poller.engine.cycle import CycleReport, run_cycle
from poller.engine.delivery import Deliverer
from poller.engine.forecast import Point
from poller.engine.model import (
    NOTICE_INITIAL,
    AlertState,
    NewNotification,
    NoticeChange,
    NoticeState,
)
from poller.store.history import History
from poller.store.notice_states import NoticeStates
from tests.engine_world import (
    ACME,
    ACME_ADMINS,
    World,
    open_world,
    run_poller,
)
from tests.store.test_store import count_writes

T0 = datetime(2024, 5, 1, tzinfo=UTC)


@pytest.fixture
def sqlite_world(tmp_path, smtp_server) -> Iterator[World]:
    """For what the database kind cannot change (forecast maths, CLI output): SQLite only."""
    with open_world(f"sqlite:///{tmp_path / 'poller.db'}", smtp_server.port) as opened:
        yield opened


def cycle_at(world: World, when: datetime, **extra: str) -> CycleReport:
    """One real cycle (fetch, persist, deliver) as if the clock said ``when``."""
    settings = world.settings(**extra)
    deliverer = Deliverer(store=world.store, settings=settings, now_fn=lambda: when)
    with CekuraClient(settings, sleep=lambda _seconds: None) as client:
        return run_cycle(
            settings=settings,
            client=client,
            store=world.store,
            deliverer=deliverer,
            now_fn=lambda: when,
        )


def acme_emails(smtp_server) -> list:
    return [m.message for m in smtp_server.received if ACME_ADMINS[0] in m.rcpt_tos]


def text_of(message) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


def burn_hourly(
    world: World, start: datetime, hours: int, balance: int, per_hour: int, **settings: str
) -> int:
    """Poll every hour while ACME uses ``per_hour`` credits an hour; returns the balance."""
    for hour in range(hours):
        world.set_balance(ACME, str(balance))
        cycle_at(world, start + timedelta(hours=hour), **settings)
        balance -= per_hour
    return balance + per_hour


# --- the forecast over a week of real cycles -------------------------------------------


def test_a_week_of_usage_forecasts_the_run_out_within_ten_percent_and_every_view_shows_it(
    sqlite_world, smtp_server
):
    world = sqlite_world
    # 100 credits an hour for a week, polled at irregular gaps (up to a 4-hour outage), with a
    # top-up of 5,000 on day 3 and a refund of 50 on day 4; the week ends just below 1,000.
    # The week ends a minute ago, so `poller check` (real clock) sees it as recent history.
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    start = end - timedelta(days=7)
    per_hour = Decimal(100)

    def true_balance(moment: datetime) -> Decimal:
        hours = Decimal((moment - start).total_seconds()) / 3600
        top_ups = (5000 if moment >= start + timedelta(days=3) else 0) + (
            50 if moment >= start + timedelta(days=4) else 0
        )
        return Decimal(12_740) - per_hour * hours + top_ups

    gaps = [37, 190, 55, 240, 150, 61, 300]  # minutes
    moment, index = start, 0
    while moment < end:
        world.set_balance(ACME, str(true_balance(moment).quantize(Decimal("0.01"))))
        cycle_at(world, moment)
        moment = min(end, moment + timedelta(minutes=gaps[index % len(gaps)]))
        index += 1
    world.set_balance(ACME, str(true_balance(end).quantize(Decimal("0.01"))))
    report = cycle_at(world, end)

    true_runway = true_balance(end) / per_hour  # hours
    assert report.breaches == 1
    prediction = report.forecasts[ACME]
    estimated = Decimal((prediction.runs_out_at - end).total_seconds()) / 3600
    assert abs(estimated - true_runway) <= true_runway / 10
    # The top-up is recognised (less what was used between the two polls around it); the
    # refund of 50 falls inside a poll interval that used more, so it only lowers that usage.
    assert prediction.day.topups == 0 and prediction.week.topups == 1
    assert Decimal(4500) < prediction.week.topped_up < Decimal(5000)

    [email] = acme_emails(smtp_server)
    line = re.search(
        r"At your recent usage \(≈ ([\d,.]+) credits/day\) you will run out "
        r"around (\d+ \w+ \d{4}) \(in less than a day\)\.",
        text_of(email),
    )
    assert line is not None, text_of(email)
    assert abs(Decimal(line[1].replace(",", "")) - 2400) <= 240
    assert line[2] == f"{prediction.runs_out_at.day} {prediction.runs_out_at:%B %Y}"

    env = world.env
    status = json.loads(run_poller(env, "status", "--json").stdout)
    acme = next(row for row in status if row["org_id"] == ACME)
    assert abs(Decimal(acme["burn_per_day_24h"]) - 2400) <= 240
    assert acme["runs_out_at"] == prediction.runs_out_at.isoformat()
    # A week at ~2,400 a day (top-up hours count as none): three days of it is ~7,100.
    assert acme["threshold_too_low"]
    assert Decimal(6800) <= Decimal(acme["suggested_threshold"]) <= Decimal(7300)
    table = run_poller(env, "status").stdout
    suggested = f"{Decimal(acme['suggested_threshold']):,.2f}"
    assert "BURN/DAY" in table and f"raise threshold to {suggested}" in table

    explained = run_poller(env, "forecast", "--org", str(ACME))
    assert explained.returncode == 0, explained.stderr
    assert "last 7 days:" in explained.stdout
    assert "1 top-up(s) of 4," in explained.stdout
    assert "runs out around" in explained.stdout

    checked = run_poller(env, "check", "--org", str(ACME), "--dry-run")
    rate = re.search(r"burn rate: ([\d,.]+) credits/day over the last 24 h", checked.stdout)
    assert rate is not None and abs(Decimal(rate[1].replace(",", "")) - 2400) <= 240
    assert "runs out: " in checked.stdout and "(in less than a day)" in checked.stdout


def test_configure_threshold_suggest_applies_the_advice_through_the_api(sqlite_world):
    world = sqlite_world
    burn_hourly(world, T0, 8, 20_000, 100)
    result = run_poller(world.env, "configure", "--org", str(ACME), "--threshold", "suggest")
    assert result.returncode == 0, result.stderr
    assert "threshold 7,200.00 credits" in result.stdout
    cycle_at(world, T0 + timedelta(hours=9))
    assert world.store.load_states()[ACME].threshold == Decimal("7200.00")


def test_configure_threshold_suggest_refuses_without_enough_history(sqlite_world):
    world = sqlite_world
    cycle_at(world, T0)
    result = run_poller(world.env, "configure", "--org", str(ACME), "--threshold", "suggest")
    assert result.returncode == 1
    assert "no threshold to suggest for organization 11" in result.stderr
    assert "Traceback" not in result.stderr


# --- runway alert ------------------------------------------------------------------------

RUNWAY = {"POLLER_RUNWAY_DAYS": "2"}


def runway_emails(smtp_server) -> list:
    return [m for m in acme_emails(smtp_server) if m["Subject"].startswith("Credits running out")]


def test_the_runway_alert_is_sent_once_per_breach_and_re_armed_by_a_top_up(world, smtp_server):
    # 2,400 a day from 20,000: more than 2 days left, no runway alert.
    burn_hourly(world, T0, 8, 20_000, 100, **RUNWAY)
    assert runway_emails(smtp_server) == []
    # Down to 4,000 (under 2 days at the recent rate): one alert, however many cycles follow.
    burn_hourly(world, T0 + timedelta(hours=8), 6, 4000, 100, **RUNWAY)
    [first] = runway_emails(smtp_server)
    assert "you will run out around" in text_of(first)
    assert world.state(ACME) == ("armed", 0)  # the main alert is untouched

    # A top-up re-arms it; the next slide below 2 days alerts again, with its own Message-ID.
    burn_hourly(world, T0 + timedelta(hours=14), 3, 90_000, 100, **RUNWAY)
    assert len(runway_emails(smtp_server)) == 1
    burn_hourly(world, T0 + timedelta(hours=17), 3, 3000, 100, **RUNWAY)
    emails = runway_emails(smtp_server)
    assert len(emails) == 2
    assert emails[0]["Message-ID"] != emails[1]["Message-ID"]
    assert "<runway.11.2." in emails[1]["Message-ID"]
    assert [n.breach_number for n in world.store.notifications_for(ACME) if n.kind == "runway"] == [
        1,
        2,
    ]


def test_the_runway_alert_is_off_by_default(world, smtp_server):
    burn_hourly(world, T0, 8, 20_000, 100)
    burn_hourly(world, T0 + timedelta(hours=8), 4, 3000, 100)
    assert runway_emails(smtp_server) == []


# --- reminders ---------------------------------------------------------------------------

REMIND = {"POLLER_REMIND_EVERY": "1h"}


def test_reminders_go_out_at_most_once_per_period_while_alerted_and_stop_on_recovery(
    world, smtp_server
):
    world.set_balance(ACME, "500")
    cycle_at(world, T0, **REMIND)  # the alert
    for minutes in (30, 59, 61, 62, 90, 125, 126):
        cycle_at(world, T0 + timedelta(minutes=minutes), **REMIND)
    # The same moment again (a second poller, or a retry) adds nothing.
    cycle_at(world, T0 + timedelta(minutes=126), **REMIND)
    subjects = [m["Subject"] for m in acme_emails(smtp_server)]
    assert len(subjects) == 3
    assert not subjects[0].startswith("Reminder")
    assert all(subject.startswith("Reminder: ") for subject in subjects[1:])
    reminder = acme_emails(smtp_server)[1]
    assert "This is a reminder" in text_of(reminder)
    assert "<reminder.11.1." in reminder["Message-ID"]

    world.set_balance(ACME, "5000")  # top-up: re-armed, reminders stop
    for hours in (3, 5, 8):
        cycle_at(world, T0 + timedelta(hours=hours), **REMIND)
    assert len(acme_emails(smtp_server)) == 3
    assert [
        n.breach_number for n in world.store.notifications_for(ACME) if n.kind == "reminder"
    ] == [1, 2]


def test_there_are_no_reminders_by_default(world, smtp_server):
    world.set_balance(ACME, "500")
    for hours in range(0, 50, 7):
        cycle_at(world, T0 + timedelta(hours=hours))
    assert len(acme_emails(smtp_server)) == 1


def test_a_poller_holding_a_stale_notice_state_records_no_second_reminder(world):
    world.set_balance(ACME, "500")
    cycle_at(world, T0)
    notices = NoticeStates(world.store)
    reminder = NewNotification(
        kind="reminder",
        breach_number=1,
        org_name="Acme Voice",
        recipients=("a@b.example",),
        subject="Reminder",
        balance=Decimal(500),
        threshold=Decimal(1000),
        detected_at=T0,
        status="pending",
    )
    reminded = NoticeState(AlertState.ARMED, 0, 1, T0)
    change = NoticeChange(ACME, None, reminded, (reminder,))

    first = notices.apply([change], T0)
    second = notices.apply([change], T0)  # loaded the same (absent) state: loses the race

    assert len(first[0]) == 1 and first[1] == 0
    assert second == ([], 1, {})
    assert notices.load()[ACME] == reminded
    stale = NoticeChange(ACME, NOTICE_INITIAL, reminded, (reminder,))
    assert notices.apply([stale], T0) == ([], 1, {})
    assert [n.kind for n in world.store.notifications_for(ACME)] == ["low_credits", "reminder"]


# --- recovery notice ---------------------------------------------------------------------

RECOVERY = {"POLLER_RECOVERY_NOTICE": "true"}


def recovery_emails(smtp_server) -> list:
    return [m for m in acme_emails(smtp_server) if m["Subject"].startswith("Credits topped up")]


def test_a_recovery_notice_goes_out_once_when_a_top_up_re_arms(world, smtp_server):
    world.set_balance(ACME, "500")
    cycle_at(world, T0, **RECOVERY)
    world.set_balance(ACME, "6000")
    cycle_at(world, T0 + timedelta(hours=1), **RECOVERY)
    cycle_at(world, T0 + timedelta(hours=2), **RECOVERY)
    world.set_balance(ACME, "7000")
    cycle_at(world, T0 + timedelta(hours=3), **RECOVERY)

    [notice] = recovery_emails(smtp_server)
    assert "has credits again" in text_of(notice)
    assert "<recovery.11.1." in notice["Message-ID"]
    assert world.state(ACME) == ("armed", 1)

    world.set_balance(ACME, "100")  # second breach, second recovery
    cycle_at(world, T0 + timedelta(hours=4), **RECOVERY)
    world.set_balance(ACME, "9000")
    cycle_at(world, T0 + timedelta(hours=5), **RECOVERY)
    assert len(recovery_emails(smtp_server)) == 2


def test_re_arming_by_lowering_the_threshold_is_not_a_recovery(world, smtp_server):
    world.set_balance(ACME, "800")
    cycle_at(world, T0, **RECOVERY)
    world.api.update_org(ACME, low_credits_threshold="500.00")
    cycle_at(world, T0 + timedelta(hours=1), **RECOVERY)
    assert world.state(ACME) == ("armed", 1)
    assert recovery_emails(smtp_server) == []


def test_there_is_no_recovery_notice_by_default(world, smtp_server):
    world.set_balance(ACME, "500")
    cycle_at(world, T0)
    world.set_balance(ACME, "6000")
    cycle_at(world, T0 + timedelta(hours=1))
    assert recovery_emails(smtp_server) == []


# --- the history the cycles leave behind ---------------------------------------------------


def test_cycles_record_a_point_only_when_the_balance_changed(world):
    world.set_balance(ACME, "5000")
    for minutes in (0, 5, 10):
        cycle_at(world, T0 + timedelta(minutes=minutes))
    world.set_balance(ACME, "4900")
    cycle_at(world, T0 + timedelta(minutes=15))
    history = History(world.store)
    assert history.series([ACME], since=T0 - timedelta(days=1))[ACME] == [
        Point(T0, Decimal("5000.00")),
        Point(T0 + timedelta(minutes=15), Decimal("4900.00")),
    ]


def test_an_unchanged_cycle_with_every_notice_on_writes_only_its_cycle_run(world):
    everything = {**RUNWAY, **REMIND, **RECOVERY}
    burn_hourly(world, T0, 8, 20_000, 100, **everything)
    writes = count_writes(world.store)
    cycle_at(world, T0 + timedelta(hours=8, minutes=5), **everything)
    assert writes == Counter({"INSERT": 1, "UPDATE": 1})

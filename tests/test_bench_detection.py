"""The detection benchmark as a smoke test at 100 orgs (no figure asserted), and its counting
and goal verdicts on runs made up here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.detection import END, START, Crossing, Email, Figures, Run, Schedule, count, goals
from tests.test_bench import number, run_benchmark, tables

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def test_the_detection_benchmark_runs_both_schedules_and_writes_its_section(
    tmp_path: Path,
) -> None:
    arguments = ["--orgs", "100", "--duration", "20", "--warmup", "3", "--fixed-interval", "2"]
    arguments += ["--min-read-interval", "1", "--max-read-interval", "5", "--listing-interval"]
    arguments += ["2", "--slack", "5", "--drops", "3", "--no-match", "--no-lean"]
    text = run_benchmark(tmp_path, "bench.detection", arguments, (START, END), timeout=150)
    assert "100 organizations" in text
    runs, verdicts = tables(text)
    assert [row["schedule"] for row in runs] == ["fixed 2 s", "adaptive 1-5 s"]
    for row in runs:
        assert number(row["API requests"]) > 100  # at least the first read of every org
        assert row["bursts"] == "3"
    assert [row["goal"] for row in verdicts][2] == "zero missed breaches"
    assert verdicts[0]["verdict"].startswith("pending")  # --no-match


def _run(crossings: list[Crossing], drops: list[Crossing], emails: list[Email]) -> Run:
    return Run(
        schedule=Schedule.fixed(10),
        started=T0,
        ended=T0 + timedelta(seconds=300),
        requests={"billing": 1_000, "list_v2": 10},
        crossings=crossings,
        drops=drops,
        emails=emails,
        emailed_orgs={1, 2, 3, 4, 5},
        poller_cpu_seconds=1.0,
        stopped_cleanly=True,
        tracebacks=0,
        load_average=(1.0, 1.0, 1.0),
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def email(org_id: int, seconds: float, number: int = 1) -> Email:
    return Email(org_id, "low-credits", f"low-credits.{org_id}.{number}", at(seconds))


def test_each_email_answers_its_orgs_latest_crossing_and_the_window_decides_what_counts():
    run = _run(
        crossings=[
            Crossing(1, at(100)),  # counted, emailed 4 s later
            Crossing(2, at(120)),  # counted, never emailed: missed
            Crossing(3, at(30)),  # before the window: not counted (its email neither)
            Crossing(4, at(250)),  # after the window: not counted
            Crossing(9, at(110)),  # not an org alerting by email
            Crossing(5, at(130), notify=False),  # alerts off
            Crossing(6, at(140)),  # a dropped org: measured by its drop alone
        ],
        drops=[Crossing(6, at(150))],
        emails=[
            email(1, 104),
            email(1, 105),  # a second copy: a duplicate
            email(3, 40),
            email(4, 260),
            email(6, 190),
            email(5, 10),  # before any crossing of its org
        ],
    )
    figures = count(run, (60, 220))
    assert figures.breaches.detected == [4.0]
    assert figures.breaches.missed == [Crossing(2, at(120))]
    assert figures.drops.detected == [40.0] and figures.drops.missed == []
    assert figures.duplicates == 1 and figures.unexplained == 1
    assert figures.not_emailed == 1  # org 9


def _figures(name: str, requests: int, delays: list[float], missed: int = 0) -> Figures:
    run = _run([], [], [])
    run.schedule = Schedule(name, {}, 10)
    run.requests = {"billing": requests}
    figures = count(run, (0, 1))
    figures.breaches.detected.extend(delays)
    figures.breaches.missed.extend(Crossing(1, T0) for _ in range(missed))
    return figures


def test_the_goal_is_met_by_a_third_of_the_delay_or_a_fifth_of_the_requests():
    fixed = _figures("fixed 10 s", 60_000, [5.0, 9.0, 12.0])
    adaptive = _figures("adaptive 2-60 s", 11_000, [1.0, 2.0, 3.0])
    matched = _figures("fixed 55 s", 11_500, [20.0, 40.0, 60.0])
    same_requests, same_delay, none_missed = goals(fixed, adaptive, matched, None)
    assert same_requests.verdict == "met"  # 3 / 60
    assert same_delay.verdict == "met"  # 3 ≤ 12 at 11,000 / 60,000
    assert none_missed.verdict == "met"

    slow = _figures("adaptive 2-60 s", 11_000, [1.0, 2.0, 25.0], missed=1)
    same_requests, same_delay, none_missed = goals(fixed, slow, matched, None)
    assert same_requests.verdict == "**not met**"  # 25 / 60 > 1/3
    assert same_delay.verdict.startswith("**not met**: adaptive's p95 is the worse")
    assert none_missed.verdict == "**not met**"
    assert goals(fixed, adaptive, None, None)[0].verdict.startswith("pending")

    # The same-p95 goal is judged on the lean run when there is one.
    costly = _figures("adaptive 2-60 s", 25_000, [1.0, 2.0, 3.0])
    lean = _figures("adaptive 5-120 s (lean)", 11_000, [3.0, 5.0, 9.0])
    assert goals(fixed, costly, None, None)[1].verdict == "**not met**"  # 25,000 / 60,000
    assert goals(fixed, costly, None, lean)[1].verdict == "met"  # 9 ≤ 12 at 11,000

"""The crash/concurrency harness at a small size: `make chaos` runs a large one."""

from __future__ import annotations

from tests.reliability.harness import run_harness


def test_under_concurrent_pollers_and_random_kills_no_recorded_breach_is_lost(
    database_url: str,
) -> None:
    figures = run_harness(
        processes=2, cycles=3, orgs=10, kill_rate=0.5, database_url=database_url, seed=4
    )
    print(figures.report())
    assert figures.violations == []
    assert figures.lost == 0
    assert figures.breaches_recorded > 0  # the run did exercise alerts
    assert figures.emails_delivered == figures.breaches_recorded + figures.duplicates

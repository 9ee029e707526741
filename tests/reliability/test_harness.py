"""The crash/concurrency harness at a small size: `make chaos` runs a large one."""

from __future__ import annotations

import pytest

from tests.reliability.harness import _unattributed, run_harness


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


class _Copy:
    def __init__(self, message_id: str) -> None:
        self.message = {"Message-ID": message_id}


@pytest.mark.parametrize(
    ("copies", "kills", "unattributed"),
    [
        # One kill while both SMTP connections had a message in the window: two duplicates.
        ([("a", 1.0), ("b", 1.1), ("a", 5.0), ("b", 5.1)], [1.5], 0),
        # A third connection's worth is more than one kill explains.
        ([("a", 1.0), ("b", 1.1), ("c", 1.2), ("a", 5.0), ("b", 5.1), ("c", 5.2)], [1.5], 1),
        # A kill before the first copy, or after the second, explains nothing.
        ([("a", 1.0), ("a", 5.0)], [0.5, 6.0], 1),
        # Two kills, each in the window of one duplicate only: matched one to one.
        ([("a", 1.0), ("a", 2.0), ("b", 3.0), ("b", 4.0)], [1.5, 3.5], 0),
        # The earlier kill is left for the duplicate whose window ends first.
        (
            [
                ("a", 1.0),
                ("a", 9.0),
                ("b", 1.1),
                ("b", 2.0),
                ("c", 1.2),
                ("c", 2.1),
                ("d", 1.3),
                ("d", 2.2),
            ],
            [1.5, 5.0],
            1,
        ),
        ([], [1.0], 0),
    ],
)
def test_each_duplicate_needs_a_kill_between_its_copies_at_most_smtp_connections_each(
    copies: list[tuple[str, float]], kills: list[float], unattributed: int
) -> None:
    arrivals = [(_Copy(message_id), at) for message_id, at in copies]
    assert _unattributed(arrivals, kills) == unattributed  # type: ignore[arg-type]

"""The benchmark as a smoke test: 1,000 orgs, SQLite, two cycles. No timing is asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_at_a_thousand_orgs_and_writes_a_sane_table(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--orgs",
            "1000",
            "--cycles",
            "2",
            "--db",
            "sqlite",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    rows = [line for line in output.read_text().splitlines() if line.startswith("| 1,000 |")]
    assert [row.split(" | ")[2] for row in rows] == ["first sight", "changes", "unchanged"]
    cells = {row.split(" | ")[2]: row.strip("| ").split(" | ") for row in rows}
    header = [h.strip() for h in result.stdout.splitlines()[0].strip("|").split("|")]
    first, changes, unchanged = (
        dict(zip(header, cells[k], strict=True)) for k in ("first sight", "changes", "unchanged")
    )
    assert first["rows written"] == "1,000"
    # 3% of the fleet dropped to 1.00 credits: the enabled, armed ones alert; those with an
    # eligible admin and emails switched on get their email.
    assert 10 <= int(changes["breaches"]) <= 30
    assert 0 < int(changes["emails"]) <= int(changes["breaches"])
    assert unchanged["rows written"] == "0" and unchanged["breaches"] == "0"
    for row in (first, changes, unchanged):
        assert float(row["wall s"]) > 0 and 0 < float(row["peak RSS MB"]) < 1000
        assert re.fullmatch(r"[\d,]+", row["floor req/s"])
        # Both floor clients ran; the faster one is the floor the cycle is compared with.
        assert row["floor client"] in ("http.client", "requests")
        assert re.fullmatch(r"[\d,]+", row["requests floor req/s"])
        # The raw-socket client shows the simulator's own limit; how busy the simulator was
        # during the floor and the fetch says whether it was the bottleneck.
        assert int(row["raw socket req/s"].replace(",", "")) > 0
        assert int(row["poller CPU µs/org"].replace(",", "")) > 0
        floor_cores, fetch_cores = (
            float(x) for x in row["simulator cores: floor / fetch"].split(" / ")
        )
        assert 0 < floor_cores < 2 and 0 < fetch_cores < 2
        assert row["simulator saturated"] in ("no", "floor", "fetch", "floor, fetch")
    assert "cores" in output.read_text() and "Python 3." in output.read_text()

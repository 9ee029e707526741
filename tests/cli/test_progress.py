"""The progress line: drawn on a terminal (a real pseudo-terminal), absent on a pipe."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from poller.cli.progress import TerminalProgress, progress_line
from poller.devtools.simulator import Fault, SimulatorServer
from tests.engine_world import ACME, poller_env, run_poller


def test_progress_line_shows_read_of_total_and_errors() -> None:
    assert progress_line(0, 4, 0) == "organizations " + "░" * 24 + " 0/4  0 errors"
    assert progress_line(2, 4, 1) == "organizations " + "█" * 12 + "░" * 12 + " 2/4  1 error"
    assert progress_line(12_345, 100_000, 3).endswith(" 12,345/100,000  3 errors")


def test_progress_redraws_in_place_at_most_ten_times_a_second_and_ends_the_line() -> None:
    stream, now = io.StringIO(), [0.0]
    progress = TerminalProgress(stream, clock=lambda: now[0])
    progress(0, 0, 0, True)  # nothing known yet: nothing drawn
    progress(1, 3, 0, False)
    progress(2, 3, 0, False)  # same instant: skipped
    now[0] = 0.2
    progress(3, 3, 1, False)  # the last one is always drawn
    assert stream.getvalue() == (
        "\r\x1b[K" + progress_line(1, 3, 0) + "\r\x1b[K" + progress_line(3, 3, 1) + "\n"
    )


def test_while_the_listing_goes_on_the_total_is_a_lower_bound_and_the_line_stays_open() -> None:
    assert progress_line(200, 200, 0, listing=True).endswith(" 200/200+  0 errors")
    stream, now = io.StringIO(), [0.0]
    progress = TerminalProgress(stream, clock=lambda: now[0])
    progress(200, 200, 0, True)  # every org listed so far is read, but more pages may follow
    now[0] = 0.2
    progress(200, 400, 0, True)
    now[0] = 0.4
    progress(400, 400, 0, False)
    assert stream.getvalue() == (
        "\r\x1b[K"
        + progress_line(200, 200, 0, listing=True)
        + "\r\x1b[K"
        + progress_line(200, 400, 0, listing=True)
        + "\r\x1b[K"
        + progress_line(400, 400, 0)
        + "\n"
    )


@pytest.fixture
def env(sim: SimulatorServer, tmp_path: Path, smtp_server) -> dict[str, str]:
    return poller_env(sim.url, f"sqlite:///{tmp_path / 'poller.db'}", smtp_server.port)


def run_on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str]:
    """The real command with stderr on a pseudo-terminal; returns (status, terminal output)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "poller", *args],
        env={**clean, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 30)
            if not ready:
                raise AssertionError(f"no output for 30 s; so far: {output!r}")
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(controller)
    return process.wait(timeout=30), output.decode()


def test_a_run_on_a_terminal_shows_the_progress_line(env) -> None:
    status, output = run_on_a_terminal(env, "once")
    assert status == 0, output
    assert "\r\x1b[K" + progress_line(3, 3, 0) in output


def test_errors_so_far_are_counted_on_the_progress_line(sim, env) -> None:
    sim.api.add_fault(Fault(kind="status", status=500, endpoint="billing", org_id=ACME))
    status, output = run_on_a_terminal(env, "once")
    assert status == 1  # an organization could not be read
    assert "\r\x1b[K" + progress_line(3, 3, 1) in output


def test_no_progress_line_when_stderr_is_not_a_terminal(env) -> None:
    result = run_poller(env, "once")
    assert result.returncode == 0, result.stderr
    assert "organizations ░" not in result.stderr and "█" not in result.stderr
    assert "\r" not in result.stderr

"""Monitoring: /metrics and /healthz of a real daemon, `poller health`, and the health rule."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from poller.cli.metrics import endpoint_label, read_store_counts
from poller.devtools.simulator import Fault, SimulatedApi, SimulatorServer
from poller.devtools.smtp_capture import free_port
from poller.engine.health import judge
from tests.engine_world import ACME, TOKEN, World, poller_env, run_poller, seed_organizations

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


# --- the health rule (pure) ---


@pytest.mark.parametrize(
    ("last_success", "running_since", "healthy", "reason"),
    [
        (NOW - timedelta(seconds=599), None, True, "last successful cycle 599s ago"),
        (NOW - timedelta(seconds=600), None, True, "last successful cycle 600s ago"),
        (
            NOW - timedelta(seconds=601),
            None,
            False,
            "601s ago (at 2026-05-01 11:49:59 UTC), longer than 600s",
        ),
        (None, None, False, "no successful cycle recorded in the database yet"),
        (None, NOW - timedelta(seconds=30), True, "starting: no cycle finished yet"),
        (None, NOW - timedelta(seconds=900), False, "no successful cycle in 900s since the start"),
        (NOW - timedelta(seconds=700), NOW - timedelta(hours=1), False, "longer than 600s"),
    ],
)
def test_health_is_a_successful_cycle_younger_than_the_limit(
    last_success, running_since, healthy, reason
) -> None:
    verdict = judge(last_success, now=NOW, max_age=600, running_since=running_since)
    assert verdict.healthy is healthy
    assert reason in verdict.reason
    assert verdict.status_line.startswith("healthy: " if healthy else "unhealthy: ")


@pytest.mark.parametrize(
    ("cycle_seconds", "healthy", "reason"),
    [
        (300, True, "last successful cycle 10s ago (at 2026-05-01 11:59:50 UTC)"),
        (301, True, "overrun: it took 301s, longer than the 300s interval; see Sizing"),
        (600, True, "overrun: it took 600s, longer than the 300s interval"),
        (601, False, "overrun: it took 601s, more than twice the 300s interval; see Sizing"),
    ],
)
def test_an_overrun_is_named_and_unhealthy_beyond_twice_the_interval(
    cycle_seconds, healthy, reason
) -> None:
    verdict = judge(
        NOW - timedelta(seconds=10),
        now=NOW,
        max_age=600,
        cycle_seconds=cycle_seconds,
        interval=300,
    )
    assert (verdict.healthy, reason in verdict.reason) == (healthy, True), verdict
    assert ("overrun" in verdict.reason) is (cycle_seconds > 300)


@pytest.mark.parametrize(
    ("endpoint", "label"),
    [
        ("/user/organizations/37/", "/user/organizations/{id}/"),
        ("/user/organizations/123456789/", "/user/organizations/{id}/"),
        ("/user/v2/organizations/", "/user/v2/organizations/"),
        ("/test_framework/billing/info/", "/test_framework/billing/info/"),
    ],
)
def test_organization_ids_do_not_become_metric_labels(endpoint: str, label: str) -> None:
    assert endpoint_label(endpoint) == label


# --- database queries, on SQLite and PostgreSQL ---


def test_store_counts_group_organizations_by_state_and_enabled(world: World) -> None:
    world.cycle()
    world.set_balance(ACME, "10")
    world.cycle()
    counts = read_store_counts(world.store)
    assert counts.organizations == {("alerted", True): 1, ("armed", True): 1, ("armed", False): 1}
    assert counts.notifications == {"sent": 1}


def test_last_successful_run_ignores_cycles_that_could_not_list(world: World) -> None:
    assert world.store.last_successful_run() is None
    world.cycle()
    good = world.store.last_successful_run()
    assert good is not None and good[0].tzinfo is not None and 0 <= good[1] < 30
    world.api.add_fault(Fault(kind="status", status=503, endpoint="list_v2"))
    assert world.cycle().fatal is not None
    assert world.store.last_successful_run() == good


def test_poller_health_exit_status_follows_the_cycle_history(world: World) -> None:
    never = run_poller(world.env, "health", "--max-age", "60")
    assert never.returncode == 1
    assert never.stderr.strip().endswith(
        "unhealthy: no successful cycle recorded in the database yet"
    )
    world.cycle()
    fresh = run_poller(world.env, "health", "--max-age", "60")
    assert fresh.returncode == 0, fresh.stderr
    assert re.fullmatch(
        r"healthy: last successful cycle \d+\.\ds ago \(at .* UTC\)\n", fresh.stdout
    )
    time.sleep(1.2)
    stale = run_poller(world.env, "health", "--max-age", "1")
    assert stale.returncode == 1
    assert "unhealthy: last successful cycle" in stale.stderr and "longer than 1.0s" in stale.stderr


def test_poller_health_without_a_database_server_says_so_in_one_line(tmp_path: Path) -> None:
    env = {"POLLER_DATABASE_URL": f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/x"}
    result = run_poller(env, "health")
    assert result.returncode == 1
    assert result.stderr.startswith("poller: error: ") and "Traceback" not in result.stderr


# --- a real daemon, scraped over HTTP ---


class Daemon:
    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        self.port = free_port()
        self.log = tmp_path / "daemon.log"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", "--metrics-port", str(self.port)],
            env={**clean, **env},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_for(self, path: str, condition: Callable[[int, str], bool], timeout: float = 40):
        deadline = time.monotonic() + timeout
        last: tuple[int, str] | None = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                last = self.get(path)
            except OSError:  # not listening yet
                last = None
            if last is not None and condition(*last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"{path} never matched; last answer {last}\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            self._log_file.close()


@pytest.fixture
def daemon_world(tmp_path: Path, smtp_server) -> Iterator[tuple[SimulatorServer, dict[str, str]]]:
    api = SimulatedApi(token=TOKEN)
    seed_organizations(api)
    with SimulatorServer(api) as sim:
        env = poller_env(
            sim.url, f"sqlite:///{tmp_path / 'poller.db'}", smtp_server.port, POLLER_JITTER="0"
        )
        yield sim, env


def sample(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_a_running_daemon_serves_prometheus_metrics(daemon_world, smtp_server, tmp_path):
    sim, env = daemon_world
    daemon = Daemon({**env, "POLLER_INTERVAL": "1"}, tmp_path)
    try:
        _, text = daemon.wait_for(
            "/metrics", lambda _s, t: (sample(t, 'poller_cycles_total{outcome="ok"}') or 0) >= 1
        )
        assert (sample(text, "poller_cycle_duration_seconds_count") or 0) >= 1
        assert sample(text, 'poller_organizations{enabled="true",state="armed"}') == 2
        assert sample(text, 'poller_organizations{enabled="false",state="armed"}') == 1
        assert (
            sample(
                text, 'poller_api_requests_total{endpoint="/user/v2/organizations/",status="200"}'
            )
            >= 1
        )
        assert (
            sample(
                text,
                'poller_api_requests_total{endpoint="/test_framework/billing/info/",status="200"}',
            )
            >= 3
        )
        assert abs(sample(text, "poller_last_success_timestamp_seconds") - time.time()) < 30
        assert sample(text, "poller_outbox_pending") == 0

        sim.api.set_balance(ACME, Decimal("12.00"))
        _, text = daemon.wait_for(
            "/metrics", lambda _s, t: sample(t, 'poller_notifications{status="sent"}') == 1
        )
        assert sample(text, 'poller_organizations{enabled="true",state="alerted"}') == 1
        assert len(smtp_server.received) == 1

        sim.api.add_fault(Fault(kind="status", status=500, endpoint="billing", org_id=ACME))
        _, text = daemon.wait_for(
            "/metrics",
            lambda _s, t: (
                (
                    sample(
                        t,
                        "poller_api_errors_total{endpoint="
                        '"/test_framework/billing/info/",status="500"}',
                    )
                    or 0
                )
                >= 1
            ),
        )
        assert daemon.get("/nothing-here")[0] == 404
    finally:
        assert daemon.stop() == 0


def test_healthz_turns_503_when_the_api_is_down_longer_than_two_intervals(daemon_world, tmp_path):
    sim, env = daemon_world
    daemon = Daemon({**env, "POLLER_INTERVAL": "0.5"}, tmp_path)
    try:
        status, body = daemon.wait_for("/healthz", lambda s, b: "last successful cycle" in b)
        assert status == 200 and body.startswith("healthy: ")

        sim.api.add_fault(Fault(kind="status", status=503, endpoint="list_v2"))
        status, body = daemon.wait_for("/healthz", lambda s, _b: s == 503)
        assert body.startswith("unhealthy: last successful cycle")
        assert "longer than 1.0s" in body

        sim.api.clear_faults()
        status, body = daemon.wait_for("/healthz", lambda s, _b: s == 200)
        assert body.startswith("healthy: last successful cycle")
    finally:
        assert daemon.stop() == 0
    assert '"event": "cycle.list_failed"' in daemon.log.read_text()


def test_a_metrics_port_in_use_is_one_line_and_exit_status_2(daemon_world, tmp_path):
    _sim, env = daemon_world
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_poller(
            {**env, "POLLER_METRICS_HOST": "127.0.0.1"}, "run", "--metrics-port", str(port)
        )
    assert result.returncode == 2
    assert f"poller: error: metrics_port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def events(log_text: str, name: str) -> list[dict]:
    return [
        event
        for event in (json.loads(line) for line in log_text.splitlines() if line.startswith("{"))
        if event["event"] == name
    ]


def test_a_daemon_whose_cycles_outlast_the_interval_says_so(daemon_world, tmp_path):
    sim, env = daemon_world
    # Every cycle lists once: 0.6 s of latency makes each cycle longer than the 0.5 s interval
    # and, with room for a slow machine, shorter than twice it.
    sim.api.add_fault(Fault(kind="latency", seconds=0.6, endpoint="list_v2"))
    daemon = Daemon({**env, "POLLER_INTERVAL": "0.5"}, tmp_path)
    try:
        _, text = daemon.wait_for(
            "/metrics", lambda _s, t: (sample(t, "poller_cycle_overruns_total") or 0) >= 2
        )
        assert sample(text, "poller_interval_seconds") == 0.5
        assert 0.6 <= sample(text, "poller_last_cycle_duration_seconds") < 5
        status, body = daemon.wait_for("/healthz", lambda _s, b: "overrun" in b)
        assert status == 200 and body.startswith("healthy: last successful cycle")
        assert "longer than the 0.5s interval; see Sizing in docs/operations.md" in body
        checked = run_poller({**env, "POLLER_INTERVAL": "0.5"}, "health", "--max-age", "60")
        assert checked.returncode == 0, checked.stderr
        assert re.search(
            r"overrun: it took 0\.[6-9]s, longer than the 0\.5s interval", checked.stdout
        ), checked.stdout
    finally:
        assert daemon.stop() == 0
    overruns = events(daemon.log.read_text(), "cycle.overrun")
    assert len(overruns) >= 2
    assert overruns[0]["interval"] == 0.5 and 0.6 <= overruns[0]["seconds"] < 5
    assert "see Sizing in docs/operations.md" in overruns[0]["hint"]


def test_poller_once_compares_with_the_configured_interval_and_health_turns_unhealthy(
    daemon_world,
):
    sim, env = daemon_world
    sim.api.add_fault(Fault(kind="latency", seconds=1.2, endpoint="list_v2"))
    env = {**env, "POLLER_INTERVAL": "0.5"}
    once = run_poller(env, "once")
    assert once.returncode == 0, once.stderr
    (overrun,) = events(once.stderr, "cycle.overrun")
    assert overrun["interval"] == 0.5 and 1.2 <= overrun["seconds"] < 10
    assert "set it to the cron period" in overrun["compared_with"]
    checked = run_poller(env, "health", "--max-age", "60")
    assert checked.returncode == 1
    assert "overrun: it took 1." in checked.stderr
    assert "more than twice the 0.5s interval" in checked.stderr


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses with a socket listening on port, from the kernel's own table."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
@pytest.mark.parametrize(
    ("setting", "listening"),
    [({}, {"127.0.0.1"}), ({"POLLER_METRICS_HOST": "0.0.0.0"}, {"0.0.0.0"})],
)
def test_the_metrics_port_is_local_unless_metrics_host_opens_it(
    daemon_world, tmp_path, setting, listening
):
    # /metrics and /healthz answer anyone who can reach the address: local by default.
    _sim, env = daemon_world
    daemon = Daemon({**env, **setting}, tmp_path)
    try:
        status, _body = daemon.wait_for("/healthz", lambda _s, _b: True)
        assert listening_addresses(daemon.port) == listening
    finally:
        assert daemon.stop() == 0

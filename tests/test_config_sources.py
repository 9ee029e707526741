"""Where settings come from besides flags and the TOML file: stray POLLER_* variables (warned
about, not fatal), secrets read from files (POLLER_*_FILE) and the shared environment file
(--env-file). Each is checked on the real `poller` process too."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from poller.config import load_settings
from poller.simulator import SimulatorServer
from tests.engine_world import ACME, poller_env
from tests.reliability.world import ProcessWorld

SECRET = "sk-live-DO-NOT-LEAK-7f3a9c"
# What Kubernetes injects into every pod for a Service named `poller` (service links).
KUBERNETES_ENV = {
    "POLLER_SERVICE_HOST": "10.96.0.12",
    "POLLER_SERVICE_PORT": "8080",
    "POLLER_SERVICE_PORT_METRICS": "9102",
    "POLLER_PORT": "tcp://10.96.0.12:8080",
    "POLLER_PORT_8080_TCP": "tcp://10.96.0.12:8080",
    "POLLER_PORT_8080_TCP_PROTO": "tcp",
    "POLLER_PORT_8080_TCP_PORT": "8080",
    "POLLER_PORT_8080_TCP_ADDR": "10.96.0.12",
}


@pytest.fixture
def process_world(sim: SimulatorServer, tmp_path: Path, smtp_server) -> Iterator[ProcessWorld]:
    database_url = f"sqlite:///{tmp_path / 'poller.db'}"
    world = ProcessWorld(sim.api, database_url, poller_env(sim.url, database_url, smtp_server.port))
    yield world
    world.close()


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("poller: warning:")]


# --- 1. unknown POLLER_* variables ---


def test_no_kubernetes_service_variable_is_the_name_of_a_setting() -> None:
    settings = load_settings(env=KUBERNETES_ENV)
    assert len(settings.warnings) == len(KUBERNETES_ENV)
    assert all("is not a poller setting, ignored" in w for w in settings.warnings)


def test_an_unknown_variable_warns_with_the_hint_but_never_its_value() -> None:
    settings = load_settings(env={"POLLER_SMTP_PORTS": SECRET})
    assert settings.warnings == (
        "POLLER_SMTP_PORTS is not a poller setting, ignored (did you mean POLLER_SMTP_PORT?)",
    )


def test_once_works_with_kubernetes_service_variables_and_warns(process_world) -> None:
    run = process_world.poller("once", **KUBERNETES_ENV)
    assert run.status == 0, run.stderr
    warned = warning_lines(run.stderr)
    assert len(warned) == len(KUBERNETES_ENV)
    assert any(line.startswith("poller: warning: POLLER_SERVICE_HOST ") for line in warned)
    assert "10.96.0.12" not in run.output


def test_run_works_with_kubernetes_service_variables_and_stops_on_sigterm(
    process_world, smtp_server
) -> None:
    process_world.api.set_balance(ACME, "1")
    process = process_world.start("run", POLLER_INTERVAL="1", POLLER_JITTER="0", **KUBERNETES_ENV)
    try:
        deadline = time.monotonic() + 30  # a cycle has run: its alert arrived
        while not smtp_server.received and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert len(smtp_server.received) == 1
    assert "daemon.stopped" in stderr and "Traceback" not in stderr
    assert any("POLLER_PORT_8080_TCP " in line for line in warning_lines(stderr))

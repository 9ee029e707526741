"""The `poller` command as users run it: real subprocesses against the simulator, a real SMTP
server and both databases."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from poller.devtools.simulator import Fault
from poller.store import open_database
from tests.engine_world import (
    ACME,
    ACME_ADMINS,
    GLOBEX,
    INITECH,
    poller_env,
    run_poller,
)


@pytest.fixture
def env(sim, database_url, smtp_server) -> dict[str, str]:
    return poller_env(sim.url, database_url, smtp_server.port)


@pytest.fixture
def sqlite_env(sim, tmp_path, smtp_server) -> dict[str, str]:
    return poller_env(sim.url, f"sqlite:///{tmp_path / 'poller.db'}", smtp_server.port)


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def test_once_exits_0_when_everything_was_read_and_delivered(env, sim, smtp_server):
    sim.api.set_balance(ACME, "10")
    result = run_poller(env, "once")
    assert result.returncode == 0, result.stderr
    assert len(smtp_server.received) == 1
    finished = [
        json.loads(line) for line in result.stderr.splitlines() if '"cycle.finished"' in line
    ]
    assert finished and finished[0]["breaches"] == 1 and finished[0]["emails_sent"] == 1


def test_once_exits_1_when_an_org_could_not_be_read(sqlite_env, sim):
    sim.api.add_fault(Fault(kind="status", status=500, org_id=GLOBEX, endpoint="billing"))
    result = run_poller(sqlite_env, "once")
    assert result.returncode == 1
    assert "org.read_failed" in result.stderr
    assert_no_traceback(result)


def test_once_exits_1_and_changes_nothing_when_the_api_is_unreachable(sqlite_env, refusing_port):
    sqlite_env["POLLER_API_URL"] = f"http://127.0.0.1:{refusing_port}"
    result = run_poller(sqlite_env, "once")
    assert result.returncode == 1
    assert "cycle.list_failed" in result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("POLLER_SMTP_PORT", "abc", "POLLER_SMTP_PORT"),
        ("POLLER_API_URL", "not a url", "POLLER_API_URL"),
        ("POLLER_API_URL", "http://api.example.com", "POLLER_API_URL"),
        ("POLLER_API_TOKEN", "", "POLLER_API_TOKEN"),
        ("POLLER_MAIL_FROM", "", "POLLER_MAIL_FROM"),
    ],
)
def test_bad_configuration_exits_2_with_one_line_naming_the_setting(
    sqlite_env, variable, value, named
):
    sqlite_env[variable] = value
    result = run_poller(sqlite_env, "once")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith("poller: error:")
    assert_no_traceback(result)


def test_an_unknown_toml_key_exits_2(sqlite_env, tmp_path):
    config = tmp_path / "poller.toml"
    config.write_text('smtp_hots = "mail"\n')
    result = run_poller(sqlite_env, "--config", str(config), "once")
    assert result.returncode == 2 and "smtp_hots" in result.stderr
    assert_no_traceback(result)


def test_library_log_lines_join_the_json_stream_and_pass_the_secret_redaction(sqlite_env, tmp_path):
    # Alembic names its SQLite implementation in a line of its own; configured as a secret,
    # that name must not leave the process, in a line of ours or of a library.
    secret = "SQLiteImpl"
    sqlite_env |= {"POLLER_SMTP_USERNAME": "alerts", "POLLER_SMTP_PASSWORD": secret}
    result = run_poller(sqlite_env, "-vv", "once", "--baseline")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    library = [e for e in events if e.get("logger", "").startswith("alembic")]
    assert {"event": "Context impl ***.", "level": "info"}.items() <= library[0].items()
    assert "timestamp" in library[0]
    assert any(e["event"] == "cycle.finished" for e in events)
    assert secret not in result.stderr

    # Without -vv the libraries say only what is at least a warning.
    sqlite_env["POLLER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'second.db'}"
    quiet = run_poller(sqlite_env, "once", "--baseline")
    assert quiet.returncode == 0, quiet.stderr
    assert "alembic" not in quiet.stderr and "cycle.finished" in quiet.stderr


def test_check_dry_run_prints_the_decision_and_the_email_and_writes_nothing(
    sqlite_env, sim, smtp_server, tmp_path
):
    sim.api.set_balance(ACME, "123.45")
    result = run_poller(sqlite_env, "check", "--org", str(ACME), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "Acme Voice (id 11)" in result.stdout
    assert "123.45 credits" in result.stdout
    assert "would be: alerted" in result.stdout
    assert "Subject: Low credits: Acme Voice" in result.stdout
    assert ", ".join(ACME_ADMINS) in result.stdout
    assert smtp_server.received == []
    assert open_database(sqlite_env["POLLER_DATABASE_URL"]).load_states() == {}


def test_check_json_reports_what_it_did_for_one_org(env, sim, smtp_server):
    sim.api.set_balance(INITECH, "100")
    result = run_poller(env, "check", "--org", str(INITECH), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["org_id"] == INITECH and data["balance"] == "100.00"
    assert data["state_before"] is None and data["state"] == "alerted"
    assert data["action"] == "alerted" and data["dry_run"] is False
    assert [m.rcpt_tos for m in smtp_server.received] == [("bill@initech.example",)]


def test_check_for_an_unknown_org_says_so_and_exits_1(sqlite_env):
    result = run_poller(sqlite_env, "check", "--org", "999999")
    assert result.returncode == 1
    assert "organization 999999 could not be read" in result.stderr
    assert_no_traceback(result)


def test_configure_patches_the_alert_settings_through_the_api(sqlite_env, sim):
    result = run_poller(
        sqlite_env, "configure", "--org", str(GLOBEX), "--enable", "--threshold", "2,500.5"
    )
    assert result.returncode == 0, result.stderr
    assert "Globex (id 12): low-credit emails on, threshold 2,500.50 credits" in result.stdout
    org = sim.api.organization(GLOBEX)
    assert org["notify_low_credits"] is True and org["low_credits_threshold"] == "2500.50"


@pytest.mark.parametrize("amount", ["abc", "12.345", "-5", "123456789"])
def test_configure_refuses_a_bad_amount_before_any_request(sqlite_env, sim, amount):
    before = dict(sim.api.request_counts())
    result = run_poller(sqlite_env, "configure", "--org", str(ACME), "--threshold", amount)
    assert result.returncode == 2
    assert "--threshold" in result.stderr
    assert dict(sim.api.request_counts()) == before
    assert_no_traceback(result)


def test_status_lists_every_org_with_its_state_and_last_delivery(env, sim):
    sim.api.set_balance(ACME, "10")
    assert run_poller(env, "once").returncode == 0
    table = run_poller(env, "status")
    assert table.returncode == 0
    acme_line = next(line for line in table.stdout.splitlines() if "Acme Voice" in line)
    assert "alerted" in acme_line and "sent" in acme_line and "10.00" in acme_line
    rows = json.loads(run_poller(env, "status", "--json").stdout)
    by_id = {row["org_id"]: row for row in rows}
    assert by_id[ACME]["state"] == "alerted" and by_id[ACME]["balance"] == "10.00"
    assert by_id[GLOBEX]["state"] == "armed" and by_id[GLOBEX]["notification_status"] is None


def test_db_upgrade_creates_the_schema_and_is_idempotent(sqlite_env):
    first = run_poller(sqlite_env, "db", "upgrade")
    assert first.returncode == 0 and "upgraded from empty" in first.stdout
    again = run_poller(sqlite_env, "db", "upgrade")
    assert again.returncode == 0 and "already at revision" in again.stdout


def test_three_concurrent_once_processes_send_each_breach_exactly_once(env, sim, smtp_server):
    assert run_poller(env, "once").returncode == 0  # create the schema and first states
    for org_id in (ACME, INITECH):
        sim.api.set_balance(org_id, "1")
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: run_poller(env, "once"), range(3)))
    for result in results:
        assert result.returncode in (0, 1), result.stderr
        assert_no_traceback(result)
    message_ids = [m.message["Message-ID"] for m in smtp_server.received]
    assert len(message_ids) == 2 and len(set(message_ids)) == 2
    # Whatever the exit statuses said, a final run finds nothing left to do.
    assert run_poller(env, "once").returncode == 0
    assert len(smtp_server.received) == 2


def test_a_process_killed_mid_delivery_loses_nothing(env, sim, smtp_server):
    assert run_poller(env, "once").returncode == 0
    sim.api.set_balance(ACME, "1")
    smtp_server.delay_data(30)
    env = {**env, "POLLER_DELIVERY_LEASE": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "poller", "once"],
        env={**_clean_env(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: smtp_server.connections >= 1, timeout=30)  # delivery has begun
    time.sleep(0.5)  # well inside DATA: the server holds its answer
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    smtp_server.accept_again()

    time.sleep(2.5)  # let the dead process's lease expire
    result = run_poller(env, "once")

    assert result.returncode == 0, result.stderr
    received = smtp_server.received
    assert len(received) >= 1
    # If the server had accepted the first copy, the resend is recognisable as the same mail.
    assert len({m.message["Message-ID"] for m in received}) == 1
    [row] = open_database(env["POLLER_DATABASE_URL"]).notifications_for(ACME)
    assert row.status == "sent" and row.attempts == 2


def test_the_daemon_runs_a_cycle_at_start_and_stops_cleanly_on_sigterm(env, sim, smtp_server):
    sim.api.set_balance(ACME, "1")
    env = {**env, "POLLER_INTERVAL": "1", "POLLER_JITTER": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "poller", "run"],
        env={**_clean_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: len(smtp_server.received) == 1, timeout=30)
        sim.api.set_balance(ACME, "5000")
        sim.api.set_balance(ACME, "2")  # re-armed only if a cycle saw 5000: it did not
        sim.api.set_balance(INITECH, "3")
        _wait_for(lambda: len(smtp_server.received) == 2, timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "daemon.stopped" in stderr
    assert_no_traceback(subprocess.CompletedProcess([], 0, "", stderr))
    assert sorted(m.rcpt_tos[0] for m in smtp_server.received) == sorted(
        [ACME_ADMINS[0], "bill@initech.example"]
    )


def test_python_dash_m_poller_and_version_work():
    result = subprocess.run(
        [sys.executable, "-m", "poller", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("poller, version ")


def test_templates_are_found_from_an_installed_wheel(tmp_path: Path):
    """`pip install .` elsewhere: the templates must travel inside the wheel."""
    repo = Path(__file__).resolve().parents[2]
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(repo),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = wheel_dir.glob("poller-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    probe = subprocess.run(
        [sys.executable, "-c", RENDER_FROM_THE_PACKAGE],
        env={**_clean_env(), "PYTHONPATH": str(target)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(target)


# Renders an email from the installed package; prints where its text template came from.
RENDER_FROM_THE_PACKAGE = """
from datetime import UTC, datetime
from decimal import Decimal
from poller.mail.render import TEXT_TEMPLATE, AlertContent, render_email, template_environment
now = datetime.now(UTC)
sample = AlertContent(1, "Acme", 1, Decimal(1), Decimal(2), now, "https://x.example", False)
assert "Acme" in render_email(sample).text
print(template_environment().get_template(TEXT_TEMPLATE).filename)
"""


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}


def _wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a condition")
        time.sleep(0.05)


def test_poller_simulate_serves_50_orgs_that_the_client_reads_in_both_auth_modes(tmp_path):
    from decimal import Decimal

    from poller.config.settings import load_settings
    from poller.devtools.smtp_capture import free_port

    port, keys_file = free_port(), tmp_path / "keys.txt"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "poller",
            "simulate",
            "--orgs",
            "50",
            "--port",
            str(port),
            "--token",
            "t0ken-for-test",
            "--keys-file",
            str(keys_file),
            "--seed",
            "7",
        ],
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: keys_file.exists() and _listening(port), timeout=30)
        keys = [line.split() for line in keys_file.read_text().splitlines()]
        assert len(keys) == 50
        url = f"http://127.0.0.1:{port}"
        by_token = _fetch(
            load_settings(env={"POLLER_API_URL": url, "POLLER_API_TOKEN": "t0ken-for-test"})
        )
        by_keys = _fetch(
            load_settings(
                env={"POLLER_API_URL": url, "POLLER_API_KEYS": ",".join(k for _, k in keys)}
            )
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert process.returncode == 0
    assert len(by_token) == 50 and by_token == by_keys
    assert sorted(by_token) == sorted(int(org_id) for org_id, _ in keys)
    assert all(isinstance(balance, Decimal) for balance in by_token.values())


def _fetch(settings) -> dict:
    from poller.cekura.client import CekuraClient

    with CekuraClient(settings) as client:
        result = client.fetch_snapshots()
    assert result.errors == []
    return {snapshot.id: snapshot.balance for snapshot in result.snapshots}


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_poller_simulate_on_a_port_in_use_exits_2_with_one_line(sim):
    port = sim.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "poller", "simulate", "--port", port],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Address already in use" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("scale", "message"),
    [("0", "Invalid value for '--usage-scale'"), ("1e9", "usage scale must be > 0 and <= 100000")],
)
def test_poller_simulate_refuses_a_usage_scale_out_of_range(scale, message):
    result = subprocess.run(
        [sys.executable, "-m", "poller", "simulate", "--port", "0", "--usage-scale", scale],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr

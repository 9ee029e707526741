"""Secrets never leave the process: the output of failing runs of the real `poller` (with -v,
stdout and stderr, every command that can fail) is searched for the API keys, the bearer
token, the SMTP password and the database password."""

from __future__ import annotations

import os
import signal
import time
from decimal import Decimal
from pathlib import Path

from poller.devtools.simulator import Fault, SimulatedApi, SimulatorServer
from poller.devtools.smtp_capture import free_port
from tests.engine_world import poller_env, run_poller
from tests.fixtures.smtp import TEST_LOGIN, SmtpTestServer
from tests.reliability.world import ProcessWorld, Run, add_orgs

TOKEN_SECRET = "tok-SECRET-5b1f0c7e9a2d4"
KEY_SECRETS = ("key-SECRET-aa11bb22cc33", "key-SECRET-dd44ee55ff66")
SMTP_SECRET = "smtp-SECRET-pw-4242x"
DB_SECRET = "db-SECRET-pw-7777y"
SECRETS = (TOKEN_SECRET, *KEY_SECRETS, SMTP_SECRET, DB_SECRET)


def _assert_no_secret(output: str) -> None:
    for secret in SECRETS:
        assert secret not in output
        assert secret[-8:] not in output  # not even a recognisable tail


def test_no_secret_appears_in_the_output_of_any_failing_run(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    api = SimulatedApi(token=TOKEN_SECRET)
    add_orgs(api, [1, 2])
    api.set_balance(1, Decimal("10"))
    # The API echoes credentials back in its errors; the keys are unknown to it (401).
    api.add_fault(Fault("status", status=500, org_id=2, endpoint="billing"))
    database_url = f"sqlite:///{tmp_path / 'poller.db'}"
    outputs: list[str] = []
    with SimulatorServer(api) as sim:
        env = poller_env(
            sim.url,
            database_url,
            smtp_server.port,
            POLLER_API_TOKEN=TOKEN_SECRET,
            POLLER_API_KEYS=",".join(KEY_SECRETS),
            POLLER_SMTP_USERNAME=TEST_LOGIN,
            POLLER_SMTP_PASSWORD=SMTP_SECRET,  # rejected
            POLLER_LOG_FORMAT="console",
        )
        world = ProcessWorld(api, database_url, env)
        runs = [
            world.poller("-v", "once"),  # keys rejected, org 2 fails, SMTP refuses STARTTLS
            world.poller("-v", "once", POLLER_SMTP_SECURITY="none"),  # login rejected
            world.poller("-v", "check", "--org", "2"),
            world.poller("-v", "check", "--org", "1", "--dry-run", "--json"),
            world.poller("-v", "status"),
            world.poller("-v", "status", "--json"),
            world.poller("-v", "configure", "--org", "1", "--threshold", "abc"),
            world.poller("-v", "once", POLLER_API_TOKEN="tok-SECRET-wrong-00000"),
            world.poller(
                "-v",
                "once",
                POLLER_DATABASE_URL=(
                    f"postgresql://poller:{DB_SECRET}@127.0.0.1:{free_port()}/poller"
                ),
            ),
        ]
        daemon = world.start("-v", "run", POLLER_INTERVAL="1", POLLER_JITTER="0")
        time.sleep(2.5)
        daemon.send_signal(signal.SIGTERM)
        stdout, stderr = daemon.communicate(timeout=30)
        world.close()
    outputs = [run.output for run in runs] + [stdout + stderr]
    assert [run.status for run in runs] == [1, 1, 1, 0, 0, 0, 2, 1, 1]
    assert any("rejected" in output for output in outputs)  # the failures did happen
    assert "Traceback" not in "".join(outputs)
    for output in outputs:
        _assert_no_secret(output)


def test_a_config_file_with_secrets_readable_by_others_gets_a_warning_from_the_cli(
    tmp_path: Path,
) -> None:
    config = tmp_path / "poller.toml"
    config.write_text(
        f'api_token = "{TOKEN_SECRET}"\ndatabase_url = "sqlite:///{tmp_path / "p.db"}"\n'
    )
    os.chmod(config, 0o644)
    done = run_poller({}, "--config", str(config), "status")
    run = Run(done.returncode, done.stdout, done.stderr, 0.0)
    assert run.status == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.startswith("poller: warning:")]
    assert len(warnings) == 1 and str(config) in warnings[0]
    _assert_no_secret(run.output)

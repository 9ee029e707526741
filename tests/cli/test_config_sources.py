"""Where settings come from besides flags and the TOML file: stray POLLER_* variables (warned
about, not fatal), secrets read from files (POLLER_*_FILE) and the shared environment file
(--env-file). Each is checked on the real `poller` process too."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from poller.config.envfile import parse_env_text
from poller.config.settings import ConfigError, Secret, load_settings
from poller.devtools.simulator import SimulatedApi, SimulatorServer
from tests.engine_world import ACME, poller_env, run_poller, seed_organizations
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


def config_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message, message
    return message


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


# --- 2. secrets from files ---


def secret_file(tmp_path: Path, content: str, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_bytes(content.encode())
    return str(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(SECRET, SECRET), (SECRET + "\n", SECRET), (SECRET + "\r\n", SECRET)],
)
def test_a_secret_file_loses_one_trailing_newline(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = secret_file(tmp_path, content)
    settings = load_settings(
        env={
            "POLLER_API_TOKEN_FILE": path,
            "POLLER_API_KEYS_FILE": path,
            "POLLER_SMTP_USERNAME": "poller",
            "POLLER_SMTP_PASSWORD_FILE": path,
        }
    )
    assert settings.api_token == Secret(expected)
    assert settings.api_keys == (Secret(expected),)
    assert settings.smtp_password == Secret(expected)


def test_only_one_newline_is_taken_off(tmp_path: Path) -> None:
    path = secret_file(tmp_path, SECRET + "\n\n")
    message = config_error(env={"POLLER_API_TOKEN_FILE": path})
    assert message == f"POLLER_API_TOKEN_FILE ({path}): must be a single line"


def test_the_database_url_may_come_from_a_file(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://poller:{SECRET}@db.internal/poller"
    settings = load_settings(env={"POLLER_DATABASE_URL_FILE": secret_file(tmp_path, url + "\n")})
    assert settings.database_url == url


def test_a_toml_file_may_name_a_secret_file(tmp_path: Path) -> None:
    path = secret_file(tmp_path, SECRET + "\n")
    config = tmp_path / "poller.toml"
    config.write_text(f'api_token_file = "{path}"\n', encoding="utf-8")
    assert load_settings(env={}, config_path=str(config)).api_token == Secret(SECRET)


def test_a_variable_and_its_file_together_are_an_error_naming_both(tmp_path: Path) -> None:
    env = {"POLLER_API_TOKEN": SECRET, "POLLER_API_TOKEN_FILE": secret_file(tmp_path, SECRET)}
    message = config_error(env=env)
    assert message == (
        "POLLER_API_TOKEN and POLLER_API_TOKEN_FILE are both set; set only one of them"
    )


def test_a_missing_secret_file_names_the_variable_and_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    message = config_error(env={"POLLER_SMTP_PASSWORD_FILE": missing})
    assert message == (
        f"POLLER_SMTP_PASSWORD_FILE: cannot read {missing} (No such file or directory)"
    )


def test_a_secret_that_is_not_valid_stays_out_of_the_message(tmp_path: Path) -> None:
    path = secret_file(tmp_path, f"nosuchdb://{SECRET}@x/y")
    message = config_error(env={"POLLER_DATABASE_URL_FILE": path})
    assert message.startswith(f"POLLER_DATABASE_URL_FILE ({path}): unknown database kind")
    assert SECRET not in message


def test_once_reads_its_token_and_database_url_from_files(process_world, tmp_path: Path) -> None:
    env = process_world.env
    token = secret_file(tmp_path, env.pop("POLLER_API_TOKEN") + "\n", "token")
    database = secret_file(tmp_path, env.pop("POLLER_DATABASE_URL") + "\n", "database")
    run = process_world.poller(
        "once", POLLER_API_TOKEN_FILE=token, POLLER_DATABASE_URL_FILE=database
    )
    assert run.status == 0, run.stderr
    assert warning_lines(run.stderr) == []
    assert process_world.states()  # the cycle wrote to the database named in the file


def test_once_with_an_unreadable_secret_file_exits_2_with_one_line(
    process_world, tmp_path: Path
) -> None:
    process_world.env.pop("POLLER_API_TOKEN")
    run = process_world.poller("once", POLLER_API_TOKEN_FILE=str(tmp_path / "absent"))
    assert run.status == 2
    assert run.stderr.strip() == (
        f"poller: error: POLLER_API_TOKEN_FILE: cannot read {tmp_path / 'absent'} "
        "(No such file or directory)"
    )


# --- 3. the environment file shared with systemd ---


# What systemd's EnvironmentFile= gives for each line (systemd.exec(5); `sh` would turn the
# password into "pa" and fail on the `<` of the sender).
@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        ("POLLER_SMTP_PASSWORD=pa$word1", "POLLER_SMTP_PASSWORD", "pa$word1"),
        (
            "POLLER_MAIL_FROM=Cekura alerts <alerts@example.com>",
            "POLLER_MAIL_FROM",
            "Cekura alerts <alerts@example.com>",
        ),
        ("  A =  spaced out \t", "A", "spaced out"),
        ("A=b # part of the value", "A", "b # part of the value"),
        ("A=", "A", ""),
        ("A=x\r", "A", "x"),  # CRLF line ends
        ("A=pa\\$word\\\\x\\ ", "A", "pa$word\\x "),
        ('A=x"y"', "A", 'x"y"'),
        ("A='pa$word \\n \"q\"'", "A", 'pa$word \\n "q"'),
        ('A="pa$word \\"q\\" \\\\ \\$ \\x \'s\'"', "A", "pa$word \"q\" \\ $ \\x 's'"),
        ('A=  "quoted"  ', "A", "quoted"),
        ("A=''", "A", ""),
    ],
)
def test_each_line_reads_as_systemd_reads_it(line: str, name: str, value: str) -> None:
    assert parse_env_text(f"# comment\n; comment\n\n{line}\n", "env") == {name: value}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (f"export POLLER_API_TOKEN={SECRET}", "write NAME=VALUE without 'export'"),
        (SECRET, "not a NAME=VALUE line"),
        (f"{SECRET} x=1", "the text before '=' is not a variable name"),
        (f'POLLER_API_TOKEN="{SECRET}', "POLLER_API_TOKEN: the quote is not closed"),
        (f"POLLER_API_TOKEN='{SECRET}' x", "POLLER_API_TOKEN: text after the closing quote"),
        (f"POLLER_API_TOKEN={SECRET}\\", "POLLER_API_TOKEN: a trailing backslash"),
    ],
)
def test_a_bad_line_is_an_error_with_file_and_line_but_no_value(line: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_env_text(f"A=1\n{line}\n", "/etc/poller/env")
    assert str(caught.value).startswith(f"/etc/poller/env:2: {problem}")
    assert SECRET not in str(caught.value)


def test_a_later_assignment_wins_as_in_systemd() -> None:
    assert parse_env_text("A=1\nA=2\n", "env") == {"A": "2"}


def test_once_reads_an_env_file_with_values_sh_would_mangle(tmp_path: Path, smtp_server) -> None:
    token = 'pa$word1 "quoted" <x>'
    api = SimulatedApi(token=token)
    seed_organizations(api)
    api.set_balance(ACME, "1")
    with SimulatorServer(api) as server:
        env = poller_env(server.url, f"sqlite:///{tmp_path / 'poller.db'}", smtp_server.port)
        env_file = tmp_path / "env"
        env_file.write_text(
            "# the file systemd's EnvironmentFile= reads too\n"
            "POLLER_MAIL_FROM=Cekura alerts <alerts@example.com>\n"
            "POLLER_API_TOKEN='pa$word1 \"quoted\" <x>'\n"
            "POLLER_API_URL=http://192.0.2.1/not-used\n",
            encoding="utf-8",
        )
        del env["POLLER_MAIL_FROM"], env["POLLER_API_TOKEN"]
        # POLLER_API_URL is in the environment too: the environment wins over the file.
        done = run_poller(env, "--env-file", str(env_file), "once")
    assert done.returncode == 0, done.stderr
    [message] = smtp_server.received
    assert message.message["From"] == "Cekura alerts <alerts@example.com>"


def test_poller_env_file_names_the_file_and_a_bad_line_is_exit_2(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(f"POLLER_LOG_FORMAT=json\nexport POLLER_API_TOKEN={SECRET}\n")
    done = run_poller({"POLLER_ENV_FILE": str(env_file)}, "once")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"poller: error: {env_file}:2: write NAME=VALUE without 'export' (systemd ignores it)"
    )


def test_a_missing_env_file_is_exit_2_naming_it(tmp_path: Path) -> None:
    done = run_poller({}, "--env-file", str(tmp_path / "absent"), "once")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"poller: error: environment file {tmp_path / 'absent'}: cannot read it "
        "(No such file or directory)"
    )

"""Deployment files say what the docs promise. (Docker itself cannot run on the CI machine, so
the Dockerfile is checked statically: instructions, user, and that everything it copies exists.)
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)  # join continuation lines
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in logical.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_the_image_is_small_python_311_and_runs_poller_run_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    values = dict(instructions)  # last one of each kind wins, as in Docker
    assert json.loads(values["ENTRYPOINT"]) == ["poller"]
    assert json.loads(values["CMD"]) == ["run"]
    assert values["USER"] not in ("root", "0")
    users = [value for kind, value in instructions if kind == "USER"]
    assert instructions.index(("USER", users[-1])) < instructions.index(
        ("ENTRYPOINT", values["ENTRYPOINT"])
    )
    assert any(kind == "RUN" and "pip install ." in value for kind, value in instructions)


def test_everything_the_dockerfile_copies_exists_and_is_what_the_package_needs() -> None:
    copied = set()
    for kind, value in dockerfile_instructions():
        if kind == "COPY":
            *sources, _destination = value.split()
            copied.update(sources)
    for source in copied:
        assert (ROOT / source).exists(), source
    # setup.cfg reads README.md (long_description) and packages poller/ and templates/.
    assert {"pyproject.toml", "setup.cfg", "README.md", "poller", "templates"} <= copied


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(ROOT / "deploy" / "poller.service", encoding="utf-8")
    return parser


def test_the_systemd_unit_restarts_on_failure_with_secrets_from_an_environment_file() -> None:
    service = unit()["Service"]
    assert service["ExecStart"].endswith("/poller run")
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # configuration errors are not retried
    assert service["EnvironmentFile"] == "/etc/poller/env"
    assert service["User"] == "poller"
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert service[hardening] in ("yes", "strict"), hardening


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_accepts_the_unit_file() -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(ROOT / "deploy" / "poller.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The only complaint allowed here: the poller is not installed at /opt/poller on this box.
    problems = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "/opt/poller/.venv/bin/poller is not executable" not in line
    ]
    assert problems == []


def test_the_crontab_example_runs_every_5_minutes_logs_and_explains_exit_statuses() -> None:
    text = (ROOT / "crontab.example").read_text(encoding="utf-8")
    [job] = [line for line in text.splitlines() if line.startswith("*/5 ") and " once" in line]
    assert ">>" in job and "2>&1" in job
    for status in ("#   0 ", "#   1 ", "#   2 "):
        assert status in text
    assert "poller health" in text


def test_cron_reads_the_systemd_environment_file_with_env_file_not_sh() -> None:
    text = (ROOT / "crontab.example").read_text(encoding="utf-8")
    jobs = [line for line in text.splitlines() if line.startswith("*/5 ")]
    path = unit()["Service"]["EnvironmentFile"]
    assert jobs and all(f"poller --env-file {path} " in job for job in jobs)
    assert not any(". /etc/poller/env" in job for job in jobs)

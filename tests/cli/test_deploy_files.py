"""Deployment files say what the docs promise. (Docker itself cannot run on the CI machine, so
the Dockerfile is checked statically: instructions, user, and that everything it copies exists.)
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


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
    users = [value for kind, value in instructions if kind == "USER"]
    assert instructions.index(("USER", users[-1])) < instructions.index(
        ("ENTRYPOINT", values["ENTRYPOINT"])
    )


def test_the_image_runs_as_a_numeric_non_root_uid_that_the_image_creates() -> None:
    # Kubernetes' runAsNonRoot can only verify a numeric user (a name would need the passwd).
    values = dict(dockerfile_instructions())
    uid, _, gid = values["USER"].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0 and int(gid) != 0
    runs = " ".join(value for kind, value in dockerfile_instructions() if kind == "RUN")
    assert f"--uid {uid} --gid {gid}" in runs and f"groupadd --system --gid {gid}" in runs


def test_the_image_health_check_is_poller_health() -> None:
    values = dict(dockerfile_instructions())
    command = json.loads(values["HEALTHCHECK"].split("CMD", 1)[1])
    assert command[0] == "poller" and command[-1] == "health"


def test_the_image_serves_metrics_on_all_interfaces_as_a_published_port_needs() -> None:
    # poller's own default is 127.0.0.1, which `docker run -p` cannot reach.
    envs = [value for kind, value in dockerfile_instructions() if kind == "ENV"]
    assert any("POLLER_METRICS_HOST=0.0.0.0" in value.split() for value in envs)


def requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_the_image_installs_poller_with_the_lock_file() -> None:
    instructions = dockerfile_instructions()
    installs = [value for kind, value in instructions if kind == "RUN" and "pip install" in value]
    assert installs and all("pip install -c constraints.txt ." in value for value in installs)
    copied = [value.split()[:-1] for kind, value in instructions if kind == "COPY"]
    assert any("constraints.txt" in sources for sources in copied)


def test_the_lock_file_pins_every_runtime_dependency_within_setup_cfg() -> None:
    locked = {}
    for line in requirement_lines((ROOT / "constraints.txt").read_text(encoding="utf-8")):
        pin = Requirement(line)
        [(operator, version)] = [(spec.operator, spec.version) for spec in pin.specifier]
        assert operator == "==", line
        locked[canonicalize_name(pin.name)] = version
    setup = configparser.ConfigParser(interpolation=None)
    setup.read(ROOT / "setup.cfg", encoding="utf-8")
    for line in requirement_lines(setup["options"]["install_requires"]):
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in locked, f"{wanted.name} is not in constraints.txt: run `make lock`"
        assert wanted.specifier.contains(locked[name], prereleases=True), (line, locked[name])


def test_the_lock_file_is_exactly_what_poller_resolves_to(tmp_path: Path) -> None:
    # pip's own resolver, without installing: nothing unpinned, nothing stale or conflicting.
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
        + ["--report", str(report), "-c", str(ROOT / "constraints.txt"), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text(encoding="utf-8"))["install"]
    }
    del resolved["poller"]
    locked = {}
    for line in requirement_lines((ROOT / "constraints.txt").read_text(encoding="utf-8")):
        name, _, version = line.partition("==")
        locked[canonicalize_name(name)] = version
    assert resolved == locked


def test_everything_the_dockerfile_copies_exists_and_is_what_the_package_needs() -> None:
    copied = set()
    for kind, value in dockerfile_instructions():
        if kind == "COPY":
            *sources, _destination = value.split()
            copied.update(sources)
    for source in copied:
        assert (ROOT / source).exists(), source
    # setup.cfg reads README.md (long_description) and packages poller/ (templates inside).
    assert {"pyproject.toml", "setup.cfg", "README.md", "poller"} <= copied


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

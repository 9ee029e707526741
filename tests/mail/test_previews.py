"""See before you send: `poller preview` and `poller send-test` as an operator runs them."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from poller.devtools.simulator import SimulatedApi, SimulatorServer
from tests.engine_world import ACME, MAIL_FROM, TOKEN, poller_env, run_poller, seed_organizations


@pytest.fixture
def env(tmp_path: Path, smtp_server) -> Iterator[dict[str, str]]:
    api = SimulatedApi(token=TOKEN)
    seed_organizations(api)
    api.set_balance(ACME, Decimal("250.00"))
    with SimulatorServer(api) as sim:
        yield poller_env(sim.url, f"sqlite:///{tmp_path / 'poller.db'}", smtp_server.port)


def test_preview_of_a_live_organization_prints_recipients_subject_and_text(env) -> None:
    result = run_poller(env, "preview", "--org", str(ACME))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "To: dana@acme.example, sam@acme.example"
    assert lines[1] == (
        "Subject: Low credits: Acme Voice has 250.00 credits left (threshold 1,000.00 credits)"
    )
    assert "  Balance:    250.00 credits" in lines
    assert "poller configure --org 11 --disable" in result.stdout
    assert "Note:" not in result.stdout  # below its threshold and enabled: it would be sent


def test_preview_says_when_the_organization_would_not_get_it(env) -> None:
    result = run_poller(env, "preview", "--org", "12")  # Globex: 5,000 credits, alerts off
    assert result.returncode == 0, result.stderr
    assert "Note: the balance (5,000.00 credits) is not below the threshold" in result.stdout
    assert "Note: low-credit alerts are off for this organization" in result.stdout


def test_preview_html_writes_the_html_version(env, tmp_path: Path) -> None:
    html_file = tmp_path / "email.html"
    result = run_poller(env, "preview", "--org", str(ACME), "--html", str(html_file))
    assert result.returncode == 0, result.stderr
    html = html_file.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "Acme Voice" in html and "250.00 credits" in html and ">Add credits</a>" in html
    assert f"wrote the HTML version to {html_file}" in result.stderr


def test_preview_with_sample_data_needs_no_credentials(tmp_path: Path) -> None:
    result = run_poller(
        {"POLLER_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"}, "preview", "--sample"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "To: dana@example.com\nSubject: Low credits: Example Voice Labs has 412.50 credits left"
    )


def test_preview_of_an_unknown_organization_fails_in_one_line(env) -> None:
    result = run_poller(env, "preview", "--org", "999")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("poller: error: organization 999 could not be read:")
    )


def test_preview_needs_exactly_one_source(env) -> None:
    result = run_poller(env, "preview")
    assert result.returncode == 2 and "give exactly one of --org ID or --sample" in result.stderr


# --- send-test against a real SMTP server ---


def test_send_test_delivers_the_real_template_with_sample_data(env, smtp_server) -> None:
    result = run_poller(env, "send-test", "--to", "ops@example.com")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"sent: 127.0.0.1:{smtp_server.port} accepted the test email to ops@example.com\n"
    )
    [received] = smtp_server.received
    assert received.rcpt_tos == ("ops@example.com",)
    message = received.message
    assert message["Subject"].startswith("[poller test] Low credits: Example Voice Labs")
    assert message["From"] == MAIL_FROM
    html = message.get_body(("html",)).get_content()
    assert "412.50 credits" in html and ">Add credits</a>" in html


def test_send_test_reports_the_servers_exact_refusal(env, smtp_server) -> None:
    answer = "550 5.7.1 <ops@example.com>: relay access denied for this sender"
    smtp_server.reject_recipient("ops@example.com", answer)
    result = run_poller(env, "send-test", "--to", "ops@example.com")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"poller: error: the test email to ops@example.com was not sent through "
        f"127.0.0.1:{smtp_server.port}: all recipients refused: ops@example.com: {answer}"
    )
    assert smtp_server.received == []


def test_send_test_reports_a_refused_data_answer(env, smtp_server) -> None:
    smtp_server.answer_data("554 5.6.0 message rejected: content policy")
    result = run_poller(env, "send-test", "--to", "ops@example.com")
    assert result.returncode == 1
    assert "554 5.6.0 message rejected: content policy" in result.stderr


def test_send_test_to_a_server_that_is_not_there(env, refusing_port: int) -> None:
    result = run_poller(
        {**env, "POLLER_SMTP_PORT": str(refusing_port)}, "send-test", "--to", "ops@example.com"
    )
    assert result.returncode == 1
    assert f"cannot talk to SMTP server 127.0.0.1:{refusing_port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_send_test_refuses_a_malformed_address_as_usage_error(env, smtp_server) -> None:
    result = run_poller(env, "send-test", "--to", "not an address")
    assert result.returncode == 2 and "--to" in result.stderr
    assert smtp_server.connections == 0

"""Transport security of the real `poller` process: the API's TLS certificate is always
checked (REQUESTS_CA_BUNDLE is the one way to trust a private CA), SMTP credentials never
travel without TLS unless POLLER_SMTP_SECURITY=none says so, and the API credential never goes
over plain http to another host."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from poller.devtools.simulator import SimulatedApi, SimulatorServer
from tests.engine_world import TOKEN, poller_env
from tests.fixtures.smtp import TEST_LOGIN, TEST_PASSWORD, SelfSignedCertificate, SmtpTestServer
from tests.reliability.world import ProcessWorld, add_orgs, assert_one_clear_line


@pytest.fixture
def https_world(
    tmp_path: Path, smtp_server: SmtpTestServer, test_certificate: SelfSignedCertificate
) -> Iterator[ProcessWorld]:
    api = SimulatedApi(token=TOKEN)
    add_orgs(api, [1])
    url = f"sqlite:///{tmp_path / 'poller.db'}"
    with SimulatorServer(api, ssl_context=test_certificate.server_context()) as sim:
        world = ProcessWorld(api, url, poller_env(sim.url, url, smtp_server.port))
        yield world
        world.close()


@pytest.mark.parametrize(
    "attempt_to_disable",
    [
        {},
        {
            "REQUESTS_CA_BUNDLE": "",
            "CURL_CA_BUNDLE": "",
            "POLLER_ALLOW_INSECURE_HTTP": "true",
            "PYTHONHTTPSVERIFY": "0",
        },
    ],
    ids=["default", "empty_ca_bundles_and_insecure_switches"],
)
def test_an_untrusted_api_certificate_is_refused_whatever_the_environment_says(
    https_world: ProcessWorld, attempt_to_disable: dict[str, str]
) -> None:
    assert https_world.env["POLLER_API_URL"].startswith("https://")
    run = https_world.poller("once", **attempt_to_disable)
    assert run.status == 1
    assert_one_clear_line(run)
    assert "certificate could not be verified" in run.error_lines()[0]
    assert "REQUESTS_CA_BUNDLE" in run.error_lines()[0]
    assert https_world.api.request_counts() == {}  # no request got past the handshake


@pytest.mark.parametrize("setting", ["POLLER_VERIFY"])
def test_there_is_no_setting_that_turns_certificate_checks_off(
    https_world: ProcessWorld, setting: str
) -> None:
    run = https_world.poller("once", **{setting: "false"})
    # Ignored with a warning (unknown variables never stop poller), and the check still holds.
    assert f"poller: warning: {setting} is not a poller setting, ignored" in run.stderr
    assert run.status == 1
    assert "certificate could not be verified" in run.error_lines()[0]
    assert https_world.api.request_counts() == {}


def test_requests_ca_bundle_is_how_a_private_ca_is_trusted(
    https_world: ProcessWorld, test_certificate: SelfSignedCertificate
) -> None:
    run = https_world.poller("once", REQUESTS_CA_BUNDLE=str(test_certificate.cert_file))
    assert run.status == 0, run.stderr
    assert https_world.states() == {1: ("armed", 0)}


def test_smtp_credentials_are_not_sent_without_tls_unless_security_is_none(
    sqlite_world: ProcessWorld, smtp_server: SmtpTestServer
) -> None:
    add_orgs(sqlite_world.api, [1])
    sqlite_world.api.set_balance(1, Decimal("10"))
    login = {"POLLER_SMTP_USERNAME": TEST_LOGIN, "POLLER_SMTP_PASSWORD": TEST_PASSWORD}
    # The server offers AUTH over plaintext and no STARTTLS: the default (starttls) refuses.
    without_security = {k: v for k, v in sqlite_world.env.items() if k != "POLLER_SMTP_SECURITY"}
    sqlite_world.env = without_security

    refused = sqlite_world.poller("once", **login)

    assert refused.status == 1
    assert smtp_server.auth_attempts == [] and smtp_server.received == []
    assert "STARTTLS" in refused.stderr
    [row] = sqlite_world.notifications()
    assert row.status == "pending"

    sqlite_world.make_retries_due()
    allowed = sqlite_world.poller("once", POLLER_SMTP_SECURITY="none", **login)

    assert allowed.status == 0, allowed.stderr
    [attempt] = smtp_server.auth_attempts
    assert not attempt.over_tls
    assert len(smtp_server.received) == 1


def test_the_api_credential_is_never_sent_over_plain_http_to_another_host(
    tmp_path: Path,
) -> None:
    world = ProcessWorld(
        SimulatedApi(),
        f"sqlite:///{tmp_path / 'p.db'}",
        poller_env("http://api.cekura.example", f"sqlite:///{tmp_path}/p.db", 25),
    )
    run = world.poller("once")
    assert run.status == 2
    assert_one_clear_line(run)
    assert "refusing to send the API credential over plain http" in run.error_lines()[0]

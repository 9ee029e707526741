"""The simulator on the wire, over real sockets: latency that holds back only its own
connection (64 at once as well as one), drops, stopping, TLS, clients that hang up or do not
read, and other clients (requests, http.client, urllib3, curl) talking to it. HTTP framing is
aiohttp's and tested there."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import pytest
import requests
import urllib3
from structlog.testing import capture_logs

from poller.devtools.simulator import Fault, SimulatedApi, SimulatorServer
from tests.fixtures.api import SIM_TOKEN
from tests.fixtures.smtp import SelfSignedCertificate

BILLING = "/test_framework/billing/info/"
AUTH = f"Authorization: Bearer {SIM_TOKEN}\r\n"


def billing_request(org_id: int) -> bytes:
    lines = [f"GET {BILLING}?organization_id={org_id} HTTP/1.1", "Host: sim"]
    return ("\r\n".join(lines) + "\r\n" + AUTH + "\r\n").encode()


def connect(server: SimulatorServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_answer(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One response from a stream that may hold several: (status, headers, body)."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def billing_answer(stream: BinaryIO) -> tuple[int, int]:
    """(status, organization) of the next answer, a BillingInfo."""
    status, _, body = read_answer(stream)
    return status, json.loads(body)["organization"]


def at_end_of_stream(sock: socket.socket) -> bool:
    """Whether the server closed the connection (after anything it still had to say)."""
    sock.settimeout(5)
    try:
        while data := sock.recv(65536):
            assert not data.startswith(b"HTTP/"), data  # no answer beyond those expected
        return True
    except TimeoutError:
        return False


@pytest.fixture
def conversation(simulator: SimulatorServer) -> Iterator[tuple[socket.socket, BinaryIO]]:
    sock = connect(simulator)
    stream = sock.makefile("rb")
    yield sock, stream
    stream.close()
    sock.close()


@pytest.fixture
def big_sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatedApi.generate(orgs=400, seed=2, token=SIM_TOKEN)) as server:
        yield server


# ---- how requests arrive -------------------------------------------------------------------


def test_an_absolute_form_target_as_sent_through_a_proxy_is_served(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    org_id = simulator.api.org_ids()[1]
    sock.sendall(
        f"GET {simulator.url}{BILLING}?organization_id={org_id} HTTP/1.1\r\nHost: x\r\n{AUTH}"
        "\r\n".encode()
    )
    assert billing_answer(stream) == (200, org_id)


# ---- clients that misbehave ----------------------------------------------------------------------


def test_a_client_that_hangs_up_mid_request_is_no_error_and_others_are_served(
    simulator: SimulatorServer,
) -> None:
    org_id = simulator.api.org_ids()[0]
    with capture_logs() as logs:
        for cut in (10, len(billing_request(org_id)) - 2):
            sock = connect(simulator)
            sock.sendall(billing_request(org_id)[:cut])
            # SO_LINGER 0: the close is a reset, as from a killed client.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        slow = connect(simulator)
        simulator.api.add_fault(Fault("latency", seconds=0.2, times=1))
        slow.sendall(billing_request(org_id))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        slow.close()  # before its answer is written
        time.sleep(0.6)  # until well after the answer was due
        response = requests.get(
            simulator.url + BILLING,
            params={"organization_id": org_id},
            headers={"Authorization": f"Bearer {SIM_TOKEN}"},
            timeout=5,
        )
    assert response.status_code == 200
    assert [entry for entry in logs if entry["log_level"] in ("error", "critical")] == []


def test_a_client_that_sends_but_never_reads_does_not_stop_the_others(
    big_sim: SimulatorServer,
) -> None:
    pages = 8  # of 200 organizations: megabytes of answers the client does not read yet
    greedy = connect(big_sim)
    request = f"GET /user/v2/organizations/?page_size=200 HTTP/1.1\r\nHost: s\r\n{AUTH}\r\n"
    greedy.sendall(request.encode() * pages)
    time.sleep(0.2)
    # A server stuck writing to the greedy client would let this time out.
    other = requests.get(
        big_sim.url + BILLING,
        params={"organization_id": big_sim.api.org_ids()[0]},
        headers={"Authorization": f"Bearer {SIM_TOKEN}"},
        timeout=3,
    )
    assert other.status_code == 200
    with greedy.makefile("rb") as stream:
        answers = [read_answer(stream) for _ in range(pages)]
    assert [len(json.loads(body)["results"]) for _, _, body in answers] == [200] * pages
    greedy.close()


# ---- faults on the wire ----------------------------------------------------------------------


def test_latency_holds_back_only_its_own_connection(simulator: SimulatorServer) -> None:
    slow_org, fast_org = simulator.api.org_ids()[:2]
    simulator.api.add_fault(Fault("latency", seconds=2.0, org_id=slow_org, times=1))
    finished: dict[str, float] = {}
    started = time.monotonic()

    def read(org_id: int, label: str) -> None:
        with connect(simulator) as sock, sock.makefile("rb") as stream:
            sock.sendall(billing_request(org_id))
            assert read_answer(stream)[0] == 200
        finished[label] = time.monotonic() - started

    slow = threading.Thread(target=read, args=(slow_org, "slow"))
    slow.start()
    time.sleep(0.1)  # the slow request is being held when the fast one arrives
    read(fast_org, "fast")
    slow.join()
    assert finished["fast"] < 1.5
    assert finished["slow"] >= 2.0


def test_latency_on_64_connections_at_once_is_served_concurrently(
    big_sim: SimulatorServer,
) -> None:
    """The wide-area benchmark's case: every billing read waits 50 ms, 64 readers at a time."""
    big_sim.api.add_fault(Fault("latency", seconds=0.05, endpoint="billing"))
    ids = big_sim.api.org_ids()[:64]
    sockets = [connect(big_sim) for _ in ids]
    try:
        started = time.monotonic()
        for sock, org_id in zip(sockets, ids, strict=True):
            sock.sendall(billing_request(org_id))
        answers = []
        for sock in sockets:
            with sock.makefile("rb") as stream:
                answers.append(billing_answer(stream))
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert answers == [(200, org_id) for org_id in ids]
    # Served one after another they would take 64 x 50 ms = 3.2 s; half that is generous slack
    # for a loaded machine and still rules out any serial wait.
    assert 0.05 <= elapsed < 1.6
    assert big_sim.api.request_counts()["billing"] == 64


def test_a_drop_closes_the_connection_after_the_answers_before_it(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    first, dropped = simulator.api.org_ids()[:2]
    simulator.api.add_fault(Fault("drop", org_id=dropped, times=1))
    sock.sendall(billing_request(first) + billing_request(dropped) + billing_request(first))
    assert json.loads(read_answer(stream)[2])["organization"] == first
    assert stream.read() == b""  # nothing for the dropped request, nor for the one after it


def test_stop_does_not_wait_for_an_answer_held_back_by_latency(sim_api: SimulatedApi) -> None:
    server = SimulatorServer(sim_api).start()
    sim_api.add_fault(Fault("latency", seconds=30))
    sock = connect(server)
    sock.sendall(billing_request(sim_api.org_ids()[0]))
    time.sleep(0.1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    assert at_end_of_stream(sock)
    sock.close()


# ---- other clients ---------------------------------------------------------------------------


def test_urllib3_keeps_one_connection_for_many_requests(simulator: SimulatorServer) -> None:
    ids = simulator.api.org_ids()
    host, port = simulator.url.removeprefix("http://").split(":")
    with urllib3.HTTPConnectionPool(host, int(port), maxsize=1) as pool:
        for org_id in ids:
            response = pool.request(
                "GET",
                BILLING,
                fields={"organization_id": str(org_id)},
                headers={"Authorization": f"Bearer {SIM_TOKEN}"},
            )
            assert json.loads(response.data)["organization"] == org_id
        assert pool.num_connections == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_curl_reuses_its_connection_for_two_requests(simulator: SimulatorServer) -> None:
    first, second = simulator.api.org_ids()[:2]
    urls = [f"{simulator.url}{BILLING}?organization_id={org_id}" for org_id in (first, second)]
    auth = ["-H", f"Authorization: Bearer {SIM_TOKEN}"]
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--verbose", *auth, urls[0], "--next", *auth, urls[1]],
        timeout=10,
        capture_output=True,
        text=True,
        check=True,
    )
    bodies = result.stdout.replace("}{", "}\n{").splitlines()
    assert [json.loads(body)["organization"] for body in bodies] == [first, second]
    assert re.search("Re-?using existing connection", result.stderr)


def test_https_serves_pipelined_requests_and_large_answers(
    test_certificate: SelfSignedCertificate,
) -> None:
    api = SimulatedApi.generate(orgs=400, seed=2, token=SIM_TOKEN)
    with SimulatorServer(api, ssl_context=test_certificate.server_context()) as server:
        assert server.url.startswith("https://127.0.0.1:")
        client = ssl.create_default_context(cafile=str(test_certificate.cert_file))
        host, port = server.url.removeprefix("https://").split(":")
        raw = socket.create_connection((host, int(port)), timeout=5)
        with client.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            stream = sock.makefile("rb")
            ids = api.org_ids()[:5]
            sock.sendall(b"".join(billing_request(org_id) for org_id in ids))
            answers = [json.loads(read_answer(stream)[2])["organization"] for _ in ids]
            assert answers == ids
            page = f"GET /user/v2/organizations/?page_size=200 HTTP/1.1\r\nHost: h\r\n{AUTH}\r\n"
            sock.sendall(page.encode())
            status, _, body = read_answer(stream)
            listed = json.loads(body)
            assert (status, len(listed["results"])) == (200, 200)
            assert listed["next"].startswith("https://h/")
            stream.close()
        verified = requests.get(
            server.url + BILLING,
            params={"organization_id": ids[0]},
            headers={"Authorization": f"Bearer {SIM_TOKEN}"},
            verify=str(test_certificate.cert_file),
            timeout=5,
        )
        assert verified.json()["organization"] == ids[0]


def test_a_client_that_refuses_the_certificate_leaves_the_server_serving(
    test_certificate: SelfSignedCertificate,
) -> None:
    api = SimulatedApi.generate(orgs=2, seed=2, token=SIM_TOKEN)
    with SimulatorServer(api, ssl_context=test_certificate.server_context()) as server:
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(server.url + BILLING, timeout=5)  # the system CAs do not know it
        plain = connect_plain_to_tls(server)
        plain.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS at all
        try:
            assert at_end_of_stream(plain)
        except ConnectionResetError:
            pass  # closed, with some of the bytes unread: as good
        plain.close()
        response = requests.get(
            server.url + BILLING,
            params={"organization_id": api.org_ids()[0]},
            headers={"Authorization": f"Bearer {SIM_TOKEN}"},
            verify=str(test_certificate.cert_file),
            timeout=5,
        )
        assert response.status_code == 200


def connect_plain_to_tls(server: SimulatorServer) -> socket.socket:
    host, port = server.url.removeprefix("https://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_http_client_reads_every_kind_of_answer_on_one_connection(
    simulator: SimulatorServer,
) -> None:
    api = simulator.api
    org_id = api.org_ids()[0]
    host, port = simulator.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    token = {"Authorization": f"Bearer {SIM_TOKEN}"}
    api.add_fault(Fault("rate_limit", retry_after=2, times=1))
    requests_and_statuses: list[tuple[str, str, dict[str, Any], int]] = [
        ("GET", f"{BILLING}?organization_id={org_id}", token, 429),
        ("GET", f"{BILLING}?organization_id={org_id}", token, 200),
        ("GET", f"{BILLING}?organization_id=nope", token, 400),
        ("GET", BILLING, {}, 401),
        ("GET", "/nowhere/", token, 404),
        ("DELETE", f"/user/organizations/{org_id}/", token, 405),
        ("GET", "/_sim/requests", {}, 200),
    ]
    local_ports = set()
    for method, path, headers, status in requests_and_statuses:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        assert response.status == status, (method, path)
        json.loads(response.read())
        local_ports.add(connection.sock.getsockname()[1])
    connection.close()
    assert len(local_ports) == 1

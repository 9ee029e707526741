"""The simulator's HTTP/1.1 server over real sockets: requests split, pipelined or refused,
keep-alive and closing, latency that holds back one connection only, TLS, clients that hang up,
and other clients (requests, http.client, urllib3, curl) talking to it."""

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


def billing_request(org_id: int, *extra: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"GET {BILLING}?organization_id={org_id} {version}", "Host: sim", *extra]
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


def test_pipelined_requests_are_answered_in_order_on_one_connection(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    ids = simulator.api.org_ids()
    sock.sendall(b"".join(billing_request(org_id) for org_id in ids))
    answers = [read_answer(stream) for _ in ids]
    assert [json.loads(body)["organization"] for _, _, body in answers] == ids
    assert {status for status, _, _ in answers} == {200}


def test_a_request_split_into_pieces_is_answered_once_it_is_complete(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    org_id = simulator.api.org_ids()[2]
    request = billing_request(org_id)
    # A byte at a time for the request line, then the rest across the header/blank line seam.
    for index in range(20):
        sock.sendall(request[index : index + 1])
    sock.sendall(request[20:-3])
    time.sleep(0.05)
    sock.sendall(request[-3:])
    assert billing_answer(stream) == (200, org_id)


def test_a_body_arriving_in_parts_is_read_whole(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    org_id = simulator.api.org_ids()[0]
    body = json.dumps({"low_credits_threshold": "321.00", "ignored": "x" * 200_000}).encode()
    head = (
        f"PATCH /user/organizations/{org_id}/ HTTP/1.1\r\nHost: sim\r\n{AUTH}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[:1000])
    time.sleep(0.05)
    sock.sendall(body[1000:])
    status, _, answer = read_answer(stream)
    assert status == 200
    assert json.loads(answer)["low_credits_threshold"] == "321.00"
    assert simulator.api.organization(org_id)["low_credits_threshold"] == "321.00"


def test_a_body_up_to_the_limit_is_accepted_and_one_byte_more_is_refused(
    simulator: SimulatorServer,
) -> None:
    org_id = simulator.api.org_ids()[0]
    url = f"{simulator.url}/user/organizations/{org_id}/"
    headers = {"Authorization": f"Bearer {SIM_TOKEN}", "Content-Type": "application/json"}
    prefix, suffix = b'{"notify_low_credits": false, "padding": "', b'"}'
    limit = 1_000_000
    body = prefix + b"x" * (limit - len(prefix) - len(suffix)) + suffix
    accepted = requests.patch(url, data=body, headers=headers, timeout=10)
    assert accepted.status_code == 200
    assert accepted.json()["notify_low_credits"] is False
    refused = requests.patch(url, data=body + b" ", headers=headers, timeout=10)
    assert refused.status_code == 400
    assert refused.json() == {"detail": "Bad Content-Length."}
    assert refused.headers["Connection"] == "close"


def test_a_chunked_body_is_411_and_the_client_sees_the_answer(
    simulator: SimulatorServer,
) -> None:
    org_id = simulator.api.org_ids()[0]
    simulator.api.update_org(org_id, notify_low_credits=True)

    def chunks() -> Iterator[bytes]:
        yield b'{"notify_low_credits": '
        yield b"false}"

    response = requests.patch(
        f"{simulator.url}/user/organizations/{org_id}/",
        data=chunks(),
        headers={"Authorization": f"Bearer {SIM_TOKEN}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert response.status_code == 411
    assert response.json() == {"detail": "Send a Content-Length; chunked bodies are not supported."}
    assert response.headers["Connection"] == "close"
    assert simulator.api.organization(org_id)["notify_low_credits"] is True  # nothing applied


def test_expect_100_continue_gets_the_interim_answer_before_the_body(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    first = simulator.api.org_ids()[0]
    body = b'{"name": "Continued Co", "credits_remaining": "7.00"}'
    sock.sendall(
        billing_request(first)
        + f"POST /_sim/orgs HTTP/1.1\r\nHost: sim\r\nExpect: 100-continue\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    assert json.loads(read_answer(stream)[2])["organization"] == first  # in order, before it
    assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert stream.readline() == b"\r\n"
    sock.sendall(body)
    status, _, answer = read_answer(stream)
    assert status == 201
    assert simulator.api.balance(json.loads(answer)["id"]) == 7


def test_empty_lines_before_a_request_are_ignored(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    org_id = simulator.api.org_ids()[0]
    sock.sendall(b"\r\n\r\n" + billing_request(org_id))
    assert read_answer(stream)[0] == 200


def test_lines_ended_by_a_bare_newline_are_read_too(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    org_id = simulator.api.org_ids()[0]
    sock.sendall(billing_request(org_id).replace(b"\r\n", b"\n"))
    assert billing_answer(stream) == (200, org_id)


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


# ---- what is refused -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "status", "detail"),
    [
        (b"NONSENSE", 400, "Bad request syntax ('NONSENSE')"),
        (b"GET /a b HTTP/1.1", 400, "Bad request syntax ('GET /a b HTTP/1.1')"),
        (b"GET / HTTP/1.1 extra", 400, "Bad request version ('extra')"),
        (b"GET / HTTP/one", 400, "Bad request version ('HTTP/one')"),
        (b"POST /_sim/orgs", 400, "Bad HTTP/0.9 request type ('POST')"),
        (b"GET / HTTP/2.0", 505, "Invalid HTTP version (2.0)"),
        (b"BREW /pot HTTP/1.1", 501, "Unsupported method ('BREW')"),
    ],
)
def test_a_bad_request_line_is_refused_and_the_connection_closed(
    conversation: tuple[socket.socket, BinaryIO], request_line: bytes, status: int, detail: str
) -> None:
    sock, stream = conversation
    sock.sendall(request_line + b"\r\nHost: sim\r\n\r\n")
    answer = read_answer(stream)
    assert (answer[0], json.loads(answer[2])) == (status, {"detail": detail})
    assert answer[1]["connection"] == "close"
    assert at_end_of_stream(sock)


def test_a_bad_request_line_is_answered_without_waiting_for_the_headers(
    conversation: tuple[socket.socket, BinaryIO],
) -> None:
    sock, stream = conversation
    sock.sendall(b"GET / HTTP/9\r\n")  # and nothing more
    assert read_answer(stream)[0] == 400


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /" + b"a" * 70_000, 414),  # no end of line at all
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-Long: " + b"y" * 70_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-Many: y\r\n" * 100_000, 431),  # a head without an end
        (b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nName : space before the colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: twelve\r\n\r\n", 400),
    ],
)
def test_oversized_or_malformed_heads_are_refused(
    conversation: tuple[socket.socket, BinaryIO], head: bytes, status: int
) -> None:
    sock, stream = conversation
    sock.sendall(head)
    answer = read_answer(stream)
    assert answer[0] == status
    assert answer[1]["connection"] == "close"
    assert at_end_of_stream(sock)


def test_a_folded_header_line_continues_the_header(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    org_id = simulator.api.org_ids()[0]
    sock.sendall(
        f"GET {BILLING}?organization_id={org_id} HTTP/1.1\r\nAuthorization: Bearer\r\n"
        f"  {SIM_TOKEN}\r\n\r\n".encode()
    )
    assert read_answer(stream)[0] == 200


# ---- keeping and closing connections -----------------------------------------------------------


def test_connection_close_is_honoured_after_the_answer(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    org_id = simulator.api.org_ids()[0]
    # The second request is never read: the first one asked to close.
    sock.sendall(billing_request(org_id, "Connection: close") + billing_request(org_id))
    status, headers, _ = read_answer(stream)
    assert (status, headers["connection"]) == (200, "close")
    assert at_end_of_stream(sock)


def test_http_1_0_closes_unless_it_asks_for_keep_alive(simulator: SimulatorServer) -> None:
    org_id = simulator.api.org_ids()[0]
    with connect(simulator) as sock, sock.makefile("rb") as stream:
        sock.sendall(billing_request(org_id, version="HTTP/1.0"))
        assert read_answer(stream)[1]["connection"] == "close"
        assert at_end_of_stream(sock)
    with connect(simulator) as sock, sock.makefile("rb") as stream:
        for _ in range(2):
            sock.sendall(billing_request(org_id, "Connection: keep-alive", version="HTTP/1.0"))
            status, headers, _ = read_answer(stream)
            assert (status, "connection" in headers) == (200, False)


def test_requests_sent_before_the_client_half_closes_are_still_answered(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    ids = simulator.api.org_ids()[:2]
    sock.sendall(b"".join(billing_request(org_id) for org_id in ids))
    sock.shutdown(socket.SHUT_WR)
    assert [json.loads(read_answer(stream)[2])["organization"] for _ in ids] == ids
    assert at_end_of_stream(sock)


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


def test_requests_pipelined_behind_a_delayed_one_wait_their_turn(
    simulator: SimulatorServer, conversation: tuple[socket.socket, BinaryIO]
) -> None:
    sock, stream = conversation
    ids = simulator.api.org_ids()[:3]
    simulator.api.add_fault(Fault("latency", seconds=0.3, org_id=ids[0], times=1))
    started = time.monotonic()
    sock.sendall(b"".join(billing_request(org_id) for org_id in ids))
    answers = [json.loads(read_answer(stream)[2])["organization"] for _ in ids]
    assert answers == ids
    assert time.monotonic() - started >= 0.3


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
                fields={"organization_id": org_id},
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

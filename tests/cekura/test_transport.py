"""The API client's HTTP transport (urllib3) against real servers on 127.0.0.1: keep-alive,
bodies framed every way a server may, the limits (size, total deadline), no redirects, abort,
proxies from the environment. Raw-socket servers script the exact bytes of each answer."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from poller.cekura.client import LIST_V1_MAX_BYTES
from poller.cekura.transport import (
    HttpTransport,
    ResponseTooLarge,
    TransportError,
    TransportTimeout,
    environment_proxy,
)

PROXY_VARIABLES = [
    variable
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    for variable in (name, name.upper())
]


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# One scripted answer: the pieces a server writes for one request, and whether it then hangs up.
Answer = tuple[list[bytes], bool]


@contextmanager
def raw_server(answer: Callable[[int], Answer]) -> Iterator[tuple[str, list[bytes]]]:
    """Serves answer(request number) on each connection; records every request received,
    each starting with the number of the connection it came on (b"1 GET / ...")."""
    requests: list[bytes] = []
    accepted = [0]
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(connection: socket.socket, number: int) -> None:
        buffer = b""
        with connection:
            while not stop.is_set():
                while b"\r\n\r\n" not in buffer:
                    data = connection.recv(65536)
                    if not data:
                        return
                    buffer += data
                request, buffer = buffer.split(b"\r\n\r\n", 1)
                requests.append(b"%d %s" % (number, request))
                pieces, hang_up = answer(len(requests))
                for piece in pieces:
                    try:
                        connection.sendall(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client gave up on the answer (a limit test)
                    time.sleep(0.005)  # separate segments: the reader must reassemble them
                if hang_up:
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted[0] += 1
            threading.Thread(target=serve, args=(connection, accepted[0]), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", requests
    finally:
        stop.set()
        listener.close()


def transport_for(url: str) -> HttpTransport:
    return HttpTransport(url, connect_timeout=2, read_timeout=2, user_agent="poller/test")


# Far above any body these tests send: the limits themselves have tests of their own.
ANY_SIZE = 1 << 30


def get(
    url: str, transport: HttpTransport | None = None, *, max_body: int = ANY_SIZE
) -> tuple[int, bytes]:
    """One GET on ``transport`` (kept open), or on a transport of its own."""
    if transport is None:
        with closing(transport_for(url)) as own:
            return get(url, own, max_body=max_body)
    headers = {**transport.headers, "Accept": "application/json"}
    response = transport.request("GET", url + "/thing/", headers=headers, max_body=max_body)
    return response.status, response.content


def keep_alive(body: bytes) -> Answer:
    return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)], False


def connections_used(requests: list[bytes]) -> list[int]:
    return [int(request.split(b" ", 1)[0]) for request in requests]


# --- keep-alive ------------------------------------------------------------------------------


def test_a_keep_alive_connection_carries_every_request_of_a_worker() -> None:
    with raw_server(lambda number: keep_alive(b'{"n": %d}' % number)) as (url, requests):
        with closing(transport_for(url)) as transport:
            assert [get(url, transport) for _ in range(3)] == [
                (200, b'{"n": 1}'),
                (200, b'{"n": 2}'),
                (200, b'{"n": 3}'),
            ]
    assert connections_used(requests) == [1, 1, 1]
    first = requests[0].decode()
    assert first.startswith("1 GET /thing/ HTTP/1.1\r\nHost: 127.0.0.1:")
    assert "\r\nAccept-Encoding: identity" in first and "\r\nUser-Agent: poller/test" in first


def test_each_worker_keeps_its_connection_and_no_more_are_opened() -> None:
    workers, rounds = 4, 25
    with raw_server(lambda _: keep_alive(b"{}")) as (url, requests):
        with closing(transport_for(url)) as transport:
            barrier = threading.Barrier(workers)

            def work() -> None:
                barrier.wait()
                for _ in range(rounds):
                    assert get(url, transport) == (200, b"{}")

            threads = [threading.Thread(target=work) for _ in range(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert len(requests) == workers * rounds
    assert sorted(set(connections_used(requests))) == list(range(1, workers + 1))


@pytest.mark.parametrize(
    "pieces, body",
    [
        # chunked, with a chunk extension and a trailer field
        (
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b'4;ext=1\r\n{"a"\r\n',
                b"6\r\n: 1.5}\r\n0\r\nX-Trailer: t\r\n\r\n",
            ],
            b'{"a": 1.5}',
        ),
        # the head split in the middle of a line, the body in three pieces
        ([b"HTTP/1.1 200 OK\r\nContent-Le", b'ngth: 9\r\n\r\n{"a"', b": ", b"12}"], b'{"a": 12}'),
        # an interim 100 before the real answer
        (
            [
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            ],
            b"{}",
        ),
        # no length at all: the body ends when the server closes
        ([b"HTTP/1.1 200 OK\r\n\r\n", b'{"until": ', b'"close"}'], b'{"until": "close"}'),
    ],
)
def test_it_reads_every_framing_a_server_may_use(pieces: list[bytes], body: bytes) -> None:
    with raw_server(lambda _: (pieces, True)) as (url, _):
        assert get(url) == (200, body)


@pytest.mark.parametrize(
    "pieces",
    [
        [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"],
        [b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"],
    ],
)
def test_a_connection_that_must_not_be_reused_is_replaced(pieces: list[bytes]) -> None:
    with raw_server(lambda _: (pieces, False)) as (url, requests):
        with closing(transport_for(url)) as transport:
            assert get(url, transport) == (200, b"{}")
            assert get(url, transport) == (200, b"{}")
    assert connections_used(requests) == [1, 2]


def test_a_get_on_a_connection_the_server_closed_after_its_last_answer_goes_on_a_new_one() -> None:
    # The hang-up is not announced and the next request follows at once: only sending it
    # again on a new connection saves it (GET: the server never read it).
    with raw_server(lambda number: (keep_alive(b'{"n": %d}' % number)[0], True)) as (url, requests):
        with closing(transport_for(url)) as transport:
            assert get(url, transport) == (200, b'{"n": 1}')
            assert get(url, transport) == (200, b'{"n": 2}')
    assert connections_used(requests) == [1, 2]


def test_no_answer_on_a_new_connection_is_a_failure_not_a_reason_to_resend() -> None:
    with raw_server(lambda _: ([], True)) as (url, requests):
        with closing(transport_for(url)) as transport:
            with pytest.raises(TransportError, match="connection failed"):
                get(url, transport)
    assert connections_used(requests) == [1]


def test_a_patch_is_never_sent_twice_by_the_transport() -> None:
    # The server reads the PATCH and hangs up without answering: it may have applied it.
    answers = {1: keep_alive(b"{}"), 2: ([], True)}
    with raw_server(answers.__getitem__) as (url, requests):
        with closing(transport_for(url)) as transport:
            assert get(url, transport) == (200, b"{}")
            with pytest.raises(TransportError, match="connection failed"):
                transport.request("PATCH", url + "/o/1/", headers={}, body="{}", max_body=ANY_SIZE)
    assert connections_used(requests) == [1, 1]


def test_a_patch_checks_its_connection_first_and_takes_a_new_one_if_the_server_closed_it() -> None:
    with raw_server(lambda _: (keep_alive(b"{}")[0], True)) as (url, requests):
        with closing(transport_for(url)) as transport:
            transport.request("PATCH", url + "/o/1/", headers={}, body="{}", max_body=ANY_SIZE)
            time.sleep(0.2)  # the hang-up arrives before the next request
            transport.request("PATCH", url + "/o/1/", headers={}, body="{}", max_body=ANY_SIZE)
    assert connections_used(requests) == [1, 2]


def test_no_body_is_read_for_204_and_the_connection_stays_usable() -> None:
    answers = {1: ([b"HTTP/1.1 204 No Content\r\n\r\n"], False), 2: keep_alive(b"{}")}
    with raw_server(answers.__getitem__) as (url, requests):
        with closing(transport_for(url)) as transport:
            assert get(url, transport) == (204, b"")
            assert get(url, transport) == (200, b"{}")
    assert connections_used(requests) == [1, 1]


@pytest.mark.parametrize(
    "pieces",
    [
        [b"ICY 200 OK\r\n\r\n"],
        [b"HTTP/1.1 2x0 OK\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"],
        [],
        [b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000],
    ],
    ids=["not_http", "bad_status", "bad_chunk", "short_body", "nothing", "endless_header"],
)
def test_an_answer_that_cannot_be_framed_fails_the_request(pieces: list[bytes]) -> None:
    with raw_server(lambda _: (pieces, True)) as (url, _), pytest.raises(TransportError) as caught:
        get(url)
    assert str(caught.value).startswith("connection failed (")
    assert "127.0.0.1" not in str(caught.value)


def test_a_redirect_is_an_answer_not_followed() -> None:
    redirect = [b"HTTP/1.1 302 Found\r\nLocation: http://evil.test/\r\nContent-Length: 0\r\n\r\n"]
    with raw_server(lambda _: (redirect, False)) as (url, requests):
        assert get(url) == (302, b"")
    assert len(requests) == 1


@pytest.mark.parametrize("value", ["k\r\nX-Evil: 1", "k\u2603"], ids=["line_break", "not_latin_1"])
def test_a_header_http_cannot_carry_is_never_sent_and_its_value_never_shown(value: str) -> None:
    with raw_server(lambda _: keep_alive(b"{}")) as (url, requests):
        with closing(transport_for(url)) as transport, pytest.raises(TransportError) as caught:
            transport.request("GET", url + "/", headers={"X-Key": value}, max_body=ANY_SIZE)
    assert "line break or a character HTTP cannot carry" in str(caught.value)
    assert value not in str(caught.value) and repr(value.encode()) not in str(caught.value)
    assert requests == []


# --- the limits: size and total deadline ------------------------------------------------------


def test_a_body_as_large_as_a_big_fleets_one_piece_v1_listing_is_read() -> None:
    # The v1 listing carries every organization in one body: about 2 KB each.
    body = b"x" * (80 * 1024 * 1024)  # some 40,000 organizations' worth
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    with raw_server(lambda _: ([head, body], True)) as (url, _):
        status, received = get(url, max_body=LIST_V1_MAX_BYTES)
    assert status == 200 and len(received) == len(body)


@pytest.mark.parametrize(
    "pieces",
    [
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000],
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"400\r\n" + b"x" * 1024 + b"\r\n",
            b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n",
        ],
        [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"x" * 1024, b"x" * 1024],
    ],
    ids=["content_length", "chunked", "until_closed"],
)
def test_a_body_over_the_callers_limit_fails_the_request_and_the_connection_is_dropped(
    pieces: list[bytes],
) -> None:
    with raw_server(lambda n: (pieces, True) if n == 1 else keep_alive(b"{}")) as (url, requests):
        with closing(transport_for(url)) as transport:
            with pytest.raises(ResponseTooLarge, match="too large"):
                get(url, transport, max_body=1500)
            assert get(url, transport) == (200, b"{}")
    assert [r.split(b" ", 1)[0] for r in requests] == [b"1", b"2"]


@pytest.mark.parametrize("where", ["head", "body", "close_delimited_body"])
def test_an_answer_trickled_slower_than_its_deadline_times_out_though_every_read_is_quick(
    where: str,
) -> None:
    # One byte every 5 ms or so: no read waits anywhere near the 2 s read timeout, yet the
    # answer would take many seconds in all.
    pieces = {
        "head": [b"HTTP/1.1 200 OK\r\n"] + [b"X"] * 2000,
        "body": [b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n"] + [b"x"] * 2000,
        "close_delimited_body": [b"HTTP/1.1 200 OK\r\n\r\n"] + [b"x"] * 2000,
    }[where]
    with raw_server(lambda _: (pieces, True)) as (url, _):
        with closing(transport_for(url)) as transport:
            started = time.monotonic()
            with pytest.raises(TransportTimeout):
                transport.request(
                    "GET", url + "/", headers={}, max_body=ANY_SIZE, deadline=time.monotonic() + 1
                )
            elapsed = time.monotonic() - started
    assert 1 <= elapsed < 3


# --- abort ----------------------------------------------------------------------------------


def test_abort_breaks_a_request_in_flight_and_starts_no_new_one() -> None:
    slow = [b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n"] + [b"x"] * 2000
    with raw_server(lambda _: (slow, True)) as (url, requests):
        transport = transport_for(url)
        failure: list[BaseException] = []

        def fetch() -> None:
            try:
                get(url, transport)
            except TransportError as exc:
                failure.append(exc)

        worker = threading.Thread(target=fetch)
        worker.start()
        time.sleep(0.3)  # reading the answer by now
        started = time.monotonic()
        transport.abort()
        worker.join(timeout=5)
        assert time.monotonic() - started < 1
        assert [str(exc) for exc in failure] == ["stopped"]
        with pytest.raises(TransportError, match="stopped"):
            get(url, transport)
        transport.close()
    assert len(requests) == 1


@contextmanager
def json_server(close_after_each: bool) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Answers every GET with the request line it saw; optionally hangs up after each answer
    without announcing it (as an idle-timeout on a keep-alive connection does)."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(
                {
                    "path": self.path,
                    "proxy_authorization": self.headers.get("Proxy-Authorization", ""),
                }
            )
            body = json.dumps({"path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = close_after_each

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def transport(url: str) -> HttpTransport:
    return transport_for(url)


def test_requests_go_through_the_proxy_the_environment_names_with_its_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api_url = "http://api.cekura.invalid:8080"
    with json_server(close_after_each=False) as (proxy_url, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("http://", "http://user:s3cret@"))
        http = transport(api_url)
        try:
            response = http.request(
                "GET",
                api_url + "/test_framework/billing/info/",
                headers={},
                params={"organization_id": 7},
                max_body=ANY_SIZE,
            )
        finally:
            http.close()
    assert response.status == 200
    # A plain-http request through a proxy names the whole URL, with the proxy's credentials.
    assert seen == [
        {
            "path": "http://api.cekura.invalid:8080/test_framework/billing/info/?organization_id=7",
            "proxy_authorization": "Basic " + base64.b64encode(b"user:s3cret").decode(),
        }
    ]


def test_no_proxy_sends_the_api_requests_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    with json_server(close_after_each=False) as (api_url, seen):
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        http = transport(api_url)
        try:
            response = http.request("GET", api_url + "/x/", headers={}, max_body=ANY_SIZE)
        finally:
            http.close()
    assert response.status == 200 and [s["path"] for s in seen] == ["/x/"]


def test_a_keep_alive_connection_the_server_closed_while_idle_is_replaced_not_failed() -> None:
    with json_server(close_after_each=True) as (api_url, seen):
        http = transport(api_url)
        try:
            answers = []
            for n in range(3):
                answers.append(
                    http.request("GET", f"{api_url}/n/{n}/", headers={}, max_body=ANY_SIZE)
                )
                time.sleep(0.2)  # the server's hang-up arrives before the connection is reused
        finally:
            http.close()
    assert [a.status for a in answers] == [200, 200, 200]
    assert [json.loads(a.content)["path"] for a in answers] == ["/n/0/", "/n/1/", "/n/2/"]


def test_what_a_server_wrote_on_an_idle_connection_is_not_taken_for_the_next_answer() -> None:
    # Some servers and proxies answer an idle keep-alive connection with a 408 and then hang
    # up; the next GET must go out on a new connection instead of reading that 408.
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        for _ in range(2):
            connection, _ = listener.accept()
            with connection:
                seen.append(connection.recv(65536).split(b"\r\n", 1)[0])
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                time.sleep(0.05)
                connection.sendall(
                    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                    b"Content-Length: 0\r\n\r\n"
                )

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    api_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    http = transport(api_url)
    try:
        first = http.request("GET", f"{api_url}/a/", headers={}, max_body=ANY_SIZE)
        time.sleep(0.3)  # the 408 arrives meanwhile
        second = http.request("GET", f"{api_url}/b/", headers={}, max_body=ANY_SIZE)
    finally:
        http.close()
        server.join(timeout=5)
        listener.close()
    assert (first.status, second.status) == (200, 200)
    assert seen == [b"GET /a/ HTTP/1.1", b"GET /b/ HTTP/1.1"]


# --- proxies from the environment -------------------------------------------------------------


@pytest.mark.parametrize(
    "environment, url, proxy",
    [
        ({}, "https://api.cekura.ai", None),
        ({"HTTPS_PROXY": "http://p:3128"}, "https://api.cekura.ai", "http://p:3128"),
        ({"https_proxy": "http://p:3128"}, "https://api.cekura.ai", "http://p:3128"),
        ({"HTTP_PROXY": "http://p:3128"}, "https://api.cekura.ai", None),
        ({"HTTP_PROXY": "http://p:3128"}, "http://127.0.0.1:8000", "http://p:3128"),
        ({"ALL_PROXY": "http://a:1"}, "https://api.cekura.ai", "http://a:1"),
        ({"all_proxy": "http://a:1", "HTTPS_PROXY": "http://p:2"}, "https://x.ai", "http://p:2"),
        # lower case wins over upper case, for the proxy and for the exceptions
        (
            {"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"},
            "https://x.ai",
            "http://low:1",
        ),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "x.ai", "NO_PROXY": ""}, "https://x.ai", None),
        # NO_PROXY: host names, domain suffixes (with or without a dot), ports, *, addresses
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.cekura.ai"}, "https://api.cekura.ai", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "cekura.ai"}, "https://api.cekura.ai", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".cekura.ai"}, "https://api.cekura.ai", None),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "ekura.ai"},
            "https://api.cekura.ai",
            "http://p:1",
        ),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "a.b, x.ai:8443"}, "https://x.ai:8443", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "x.ai:8443"}, "https://x.ai", "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, "https://api.cekura.ai", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "http://10.1.2.3:80", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "http://11.1.2.3", "http://p:1"),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "::1"}, "http://[::1]:8000", None),
    ],
)
def test_the_proxy_for_the_api_comes_from_the_environment_as_curl_and_requests_read_it(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], url: str, proxy: str | None
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert environment_proxy(url) == proxy

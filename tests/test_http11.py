"""The direct path's HTTP/1.1 client against a real socket server that answers byte for byte.

Each test scripts the exact bytes a server sends (framing the simulator never produces:
chunked bodies, interim answers, bodies ended by closing, malformed heads) and reads them
through the real transport, over real loopback connections.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import pytest

from poller.cekura import http11
from poller.cekura.client import LIST_V1_MAX_BYTES
from poller.cekura.transport import (
    HttpTransport,
    ResponseTooLarge,
    TransportError,
    TransportTimeout,
)

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


def transport_for(url: str) -> closing[HttpTransport]:
    return closing(
        HttpTransport(url, pool_size=1, connect_timeout=2, read_timeout=2, user_agent="poller/test")
    )


# Far above any body these tests send: the limits themselves have tests of their own.
ANY_SIZE = 1 << 30


def get(
    url: str, transport: HttpTransport | None = None, *, max_body: int = ANY_SIZE
) -> tuple[int, bytes]:
    """One GET on ``transport`` (kept open), or on a transport of its own."""
    if transport is None:
        with transport_for(url) as own:
            return get(url, own, max_body=max_body)
    response = transport.request(
        "GET", url + "/thing/", headers={"Accept": "application/json"}, max_body=max_body
    )
    return response.status, response.content


def keep_alive(body: bytes) -> Answer:
    return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)], False


def connections_used(requests: list[bytes]) -> list[int]:
    return [int(request.split(b" ", 1)[0]) for request in requests]


def test_a_keep_alive_connection_carries_every_request_of_a_worker() -> None:
    with raw_server(lambda number: keep_alive(b'{"n": %d}' % number)) as (url, requests):
        with transport_for(url) as transport:
            assert [get(url, transport) for _ in range(3)] == [
                (200, b'{"n": 1}'),
                (200, b'{"n": 2}'),
                (200, b'{"n": 3}'),
            ]
    assert connections_used(requests) == [1, 1, 1]
    first = requests[0].decode()
    assert first.startswith("1 GET /thing/ HTTP/1.1\r\nHost: 127.0.0.1:")
    assert "\r\nAccept-Encoding: identity" in first and "\r\nUser-Agent: poller/test" in first


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
        # an interim 100 and a 103 before the real answer
        (
            [
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            ],
            b"{}",
        ),
        # no length at all: the body ends when the server closes
        ([b"HTTP/1.1 200 OK\r\n\r\n", b'{"until": ', b'"close"}'], b'{"until": "close"}'),
        # the same Content-Length twice is one length
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n[]"], b"[]"),
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
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",
            b"2\r\n{}\r\n0\r\n\r\n",
        ],
        # bytes after the response: the next answer on this connection could not be trusted
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\n"],
    ],
)
def test_a_connection_that_must_not_be_reused_is_replaced(pieces: list[bytes]) -> None:
    with raw_server(lambda _: (pieces, False)) as (url, requests):
        with transport_for(url) as transport:
            assert get(url, transport) == (200, b"{}")
            assert get(url, transport) == (200, b"{}")
    assert connections_used(requests) == [1, 2]


def test_a_get_on_a_connection_the_server_closed_after_its_last_answer_goes_on_a_new_one() -> None:
    # The hang-up is not announced and the next request follows at once: only sending it
    # again on a new connection saves it (GET: the server never read it).
    with raw_server(lambda number: (keep_alive(b'{"n": %d}' % number)[0], True)) as (url, requests):
        with transport_for(url) as transport:
            assert get(url, transport) == (200, b'{"n": 1}')
            assert get(url, transport) == (200, b'{"n": 2}')
    assert connections_used(requests) == [1, 2]


def test_no_answer_on_a_new_connection_is_a_failure_not_a_reason_to_resend() -> None:
    with raw_server(lambda _: ([], True)) as (url, requests), transport_for(url) as transport:
        with pytest.raises(TransportError, match="without answering"):
            get(url, transport)
    assert connections_used(requests) == [1]


def test_a_patch_is_never_sent_twice_by_the_transport() -> None:
    # The server reads the PATCH and hangs up without answering: it may have applied it.
    answers = {1: keep_alive(b"{}"), 2: ([], True)}
    with raw_server(answers.__getitem__) as (url, requests), transport_for(url) as transport:
        assert get(url, transport) == (200, b"{}")
        with pytest.raises(TransportError, match="without answering"):
            transport.request("PATCH", url + "/o/1/", headers={}, body="{}", max_body=ANY_SIZE)
    assert connections_used(requests) == [1, 1]


def test_a_patch_checks_its_connection_first_and_takes_a_new_one_if_the_server_closed_it() -> None:
    with raw_server(lambda _: (keep_alive(b"{}")[0], True)) as (url, requests):
        with transport_for(url) as transport:
            transport.request("PATCH", url + "/o/1/", headers={}, body="{}", max_body=ANY_SIZE)
            time.sleep(0.2)  # the hang-up arrives before the next request
            transport.request("PATCH", url + "/o/1/", headers={}, body="{}", max_body=ANY_SIZE)
    assert connections_used(requests) == [1, 2]


def test_no_body_is_read_for_204_and_the_connection_stays_usable() -> None:
    answers = {1: ([b"HTTP/1.1 204 No Content\r\n\r\n"], False), 2: keep_alive(b"{}")}
    with raw_server(answers.__getitem__) as (url, requests):
        with transport_for(url) as transport:
            assert get(url, transport) == (204, b"")
            assert get(url, transport) == (200, b"{}")
    assert connections_used(requests) == [1, 1]


@pytest.mark.parametrize(
    "pieces, problem",
    [
        ([b"ICY 200 OK\r\n\r\n"], "the status line is not HTTP/1.x"),
        ([b"HTTP/1.1 2x0 OK\r\n\r\n"], "the status line is not HTTP/1.x"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}"], "a response header is malformed"),
        ([b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n"], "a response header is malformed"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n{}"], "conflicting Content-Length"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"], "is not a number"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"], "not a hexadecimal"),
        # int(text, 16) alone would read these as sizes
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n"], "not a hexadecimal"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\n{}"], "not a hexadecimal"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX"], "does not end"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"], "mid-response"),
        ([], "without answering"),
        ([b"HTTP/1.1 200 OK\r\nX: " + b"y" * (http11.MAX_HEAD_BYTES + 10)], "too long"),
    ],
)
def test_an_answer_it_cannot_frame_fails_the_request_with_a_reason(
    pieces: list[bytes], problem: str
) -> None:
    with raw_server(lambda _: (pieces, True)) as (url, _), pytest.raises(TransportError) as caught:
        get(url)
    assert problem in str(caught.value)
    assert str(caught.value).startswith("connection failed (")


def test_a_line_break_in_a_header_value_is_never_sent() -> None:
    with raw_server(lambda _: keep_alive(b"{}")) as (url, requests):
        with transport_for(url) as transport, pytest.raises(TransportError, match="line break"):
            transport.request(
                "GET", url + "/", headers={"X-Key": "k\r\nX-Evil: 1"}, max_body=ANY_SIZE
            )
    assert requests == []


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
        with transport_for(url) as transport:
            with pytest.raises(ResponseTooLarge, match="too large"):
                get(url, transport, max_body=1500)
            assert get(url, transport) == (200, b"{}")
    assert [r.split(b" ", 1)[0] for r in requests] == [b"1", b"2"]


def test_an_answer_trickled_slower_than_its_deadline_times_out_though_every_read_is_quick() -> None:
    # One byte every 5 ms or so: no read waits anywhere near the 2 s read timeout, yet the
    # answer would take many seconds in all.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n"
    pieces = [head] + [b"x"] * 2000
    with raw_server(lambda _: (pieces, True)) as (url, _), transport_for(url) as transport:
        started = time.monotonic()
        with pytest.raises(TransportTimeout):
            transport.request(
                "GET", url + "/", headers={}, max_body=ANY_SIZE, deadline=time.monotonic() + 1
            )
    assert time.monotonic() - started < 5


def test_a_character_latin_1_cannot_carry_fails_the_request_with_its_reason() -> None:
    with raw_server(lambda _: keep_alive(b"{}")) as (url, requests):
        with transport_for(url) as transport, pytest.raises(TransportError, match="cannot carry"):
            transport.request("GET", url + "/", headers={"X-Key": "k\u2603"}, max_body=ANY_SIZE)
    assert requests == []


def test_a_connection_that_switched_protocols_is_not_used_again() -> None:
    # Poller never asks for an upgrade; if a server switches anyway, what follows is not HTTP.
    answers = {
        1: ([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"], False),
        2: keep_alive(b"{}"),
    }
    with raw_server(answers.__getitem__) as (url, requests):
        with transport_for(url) as transport:
            assert get(url, transport) == (101, b"")
            assert get(url, transport) == (200, b"{}")
    assert connections_used(requests) == [1, 2]


def test_format_request_puts_the_body_length_and_host_in_the_head() -> None:
    request = http11.format_request("PATCH", "/o/1/", "api.example", {"A": "b"}, b'{"x":1}')
    assert request == (
        b'PATCH /o/1/ HTTP/1.1\r\nHost: api.example\r\nA: b\r\nContent-Length: 7\r\n\r\n{"x":1}'
    )

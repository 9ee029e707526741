"""The floor: the same billing requests made by the simplest keep-alive clients there are.

Two clients, each with one keep-alive connection per worker thread at the poller's
concurrency, no parsing, no retries, no rate limit: a ``requests.Session`` per thread (what
most Python code would write) and the standard library's ``http.client`` per thread (the
leanest standard one). What they reach is what the simulator and the HTTP stack allow on this
machine; the benchmark compares poller against the faster of the two, the stricter comparison.

A third client, "raw socket", is no HTTP library at all: it writes the request bytes and reads
the answer by its Content-Length. It is not a floor a real client could meet (it checks
nothing); it shows how many requests per second the simulator itself can answer, so a table
can say whether the simulator or the client limits a run.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlsplit

import requests

BILLING_PATH = "/test_framework/billing/info/"
FLOOR_CLIENTS = ("http.client", "requests")
CEILING_CLIENT = "raw socket"


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


class _PerThread(Generic[C]):
    """One keep-alive client per worker thread, made on first use; close() ends them all."""

    def __init__(self, make: Callable[[], C]) -> None:
        self._make = make
        self._local = threading.local()
        self._made: list[C] = []

    def get(self) -> C:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._make()
            self._made.append(client)
        return client

    def close(self) -> None:
        for client in self._made:
            client.close()


def measure_floor(
    api_url: str, token: str, org_ids: Sequence[int], concurrency: int, client: str
) -> float:
    """Seconds for one billing request per org id; raises if any answer is not 200."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    make_fetch = {
        "http.client": _http_client_fetch,
        "requests": _requests_fetch,
        CEILING_CLIENT: _socket_fetch,
    }[client]
    fetch, close = make_fetch(api_url, headers)
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in pool.map(fetch, org_ids):
            pass
    elapsed = time.monotonic() - started
    close()
    return elapsed


def _requests_fetch(
    api_url: str, headers: dict[str, str]
) -> tuple[Callable[[int], None], Callable[[], None]]:
    sessions = _PerThread(requests.Session)
    url = api_url + BILLING_PATH

    def fetch(org_id: int) -> None:
        response = sessions.get().get(url, params={"organization_id": org_id}, headers=headers)
        _check(org_id, response.status_code)

    return fetch, sessions.close


def _http_client_fetch(
    api_url: str, headers: dict[str, str]
) -> tuple[Callable[[int], None], Callable[[], None]]:
    parts = urlsplit(api_url)
    if parts.scheme != "http":
        raise ValueError("the http.client floor runs against the benchmark's plain-http simulator")
    connections = _PerThread(lambda: http.client.HTTPConnection(parts.netloc))

    def fetch(org_id: int) -> None:
        connection = connections.get()
        connection.request("GET", f"{BILLING_PATH}?organization_id={org_id}", headers=headers)
        response = connection.getresponse()
        response.read()  # the whole body, so the connection can carry the next request
        _check(org_id, response.status)

    return fetch, connections.close


def _socket_fetch(
    api_url: str, headers: dict[str, str]
) -> tuple[Callable[[int], None], Callable[[], None]]:
    parts = urlsplit(api_url)
    if parts.scheme != "http":
        raise ValueError("the raw socket client runs against the benchmark's plain-http simulator")
    address = (parts.hostname or "", parts.port or 80)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    template = (
        f"GET {BILLING_PATH}?organization_id={{}} HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}\r\n"
    )

    def connect() -> socket.socket:
        sock = socket.create_connection(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    sockets = _PerThread(connect)

    def fetch(org_id: int) -> None:
        sock = sockets.get()
        sock.sendall(template.format(org_id).encode())
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += sock.recv(65536)
        status = int(data[9:12])
        length = int(data.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(data) < end + 4 + length:
            data += sock.recv(65536)
        _check(org_id, status)

    return fetch, sockets.close


def _check(org_id: int, status: int) -> None:
    if status != 200:
        raise RuntimeError(f"floor request for org {org_id}: HTTP {status}")

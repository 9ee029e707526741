"""The API client's HTTP transport: proxies from the environment, and keep-alive connections
that the server closed while idle."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from poller.cekura.transport import HttpTransport


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


ANY_SIZE = 1 << 20  # far above any body these tests send


def transport(url: str) -> HttpTransport:
    return HttpTransport(
        url, pool_size=2, connect_timeout=5, read_timeout=5, user_agent="poller/test"
    )


def test_requests_go_through_the_proxy_the_environment_names_with_its_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api_url = "http://api.cekura.invalid:8080"
    with json_server(close_after_each=False) as (proxy_url, seen):
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
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


def test_a_keep_alive_connection_the_server_closed_while_idle_is_replaced_not_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
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


def test_what_a_server_wrote_on_an_idle_connection_is_not_taken_for_the_next_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Some servers and proxies answer an idle keep-alive connection with a 408 and then hang
    # up; the next GET must go out on a new connection instead of reading that 408.
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("poller.cekura.transport.IDLE_CHECK_AFTER", 0.1)
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
        time.sleep(0.3)  # idle past IDLE_CHECK_AFTER; the 408 arrived meanwhile
        second = http.request("GET", f"{api_url}/b/", headers={}, max_body=ANY_SIZE)
    finally:
        http.close()
        server.join(timeout=5)
        listener.close()
    assert (first.status, second.status) == (200, 200)
    assert seen == [b"GET /a/ HTTP/1.1", b"GET /b/ HTTP/1.1"]

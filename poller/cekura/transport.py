"""HTTP for the Cekura client: one keep-alive connection per fetch worker, reused.

Why neither requests nor http.client: at 100,000 organizations per cycle the HTTP library's
own CPU cost decides the cycle time on a small machine. Measured single-threaded against the
simulator, CPU per request: `requests` about 1,180 µs, urllib3 (which requests wraps) about
333 µs, the standard library's http.client about 141 µs, and poller.cekura.http11 (the part of
HTTP/1.1 poller needs, on a plain socket) about a third of http.client's. So the direct path
(no proxy) is poller.cekura.http11 with one connection per worker thread; behind a proxy, urllib3's
ProxyManager does the proxying (CONNECT tunnels, https proxies, proxy credentials) at a little
more CPU.

What poller relied on requests for is kept, resolved once when the client is built instead
of on every request:

- proxies from HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY for the API URL, exactly as
  requests reads them (``requests.utils.get_environ_proxies``);
- the CA bundle: REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE, else certifi's (what requests
  picks); a directory works too. Certificate and host name verification are always on.

No redirects are followed and nothing is retried here: the client owns retries, back-off and
the decision never to send a credential anywhere but the API's own origin.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote_plus, urlencode, urlsplit

import certifi
import urllib3
from requests.utils import get_auth_from_url, get_environ_proxies, select_proxy
from urllib3.exceptions import HTTPError, LocationParseError, NewConnectionError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import parse_url
from urllib3.util.wait import wait_for_read

from poller.cekura import http11
from poller.config.settings import ConfigError

# Seconds a connection may sit unused before a GET checks it first (_DirectConnections.send). Far
# above the gap between two requests of a running cycle, far below any server's idle timeout.
IDLE_CHECK_AFTER = 1.0
# What one read of a proxied answer's body asks for.
_READ_BYTES = 256 * 1024


class TransportError(Exception):
    """One HTTP attempt failed before an answer arrived. Messages name no URL or credential."""


class TransportTimeout(TransportError):
    """Connecting or reading took longer than the configured timeout."""


class ResponseTooLarge(TransportError):
    """The answer's body is larger than the caller allowed for its endpoint."""


class TransportTlsError(TransportError):
    """The server's certificate could not be verified (or TLS failed otherwise)."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    # A proxied body is handed over in the buffer it was read into, not copied once more.
    content: bytes | bytearray
    retry_after: str | None


class _Connections(Protocol):
    def send(
        self,
        method: str,
        url: str,
        query: str,
        headers: dict[str, str],
        body: bytes | None,
        max_body: int,
        deadline: float,
    ) -> HttpResponse: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class HttpTransport:
    """Thread-safe keep-alive connections to the API: one per thread that uses it (the fetch
    workers and the listing thread), or up to ``pool_size`` through a proxy."""

    def __init__(
        self,
        api_url: str,
        *,
        pool_size: int,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
    ) -> None:
        # identity: poller decodes no compressed bodies, so it must not invite one.
        self._headers = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
        ca_bundle = ca_bundle_path()
        proxy = select_proxy(api_url, get_environ_proxies(api_url))
        self._connections: _Connections
        if proxy:
            self._connections = _ProxiedConnections(
                proxy, ca_bundle, pool_size, connect_timeout, read_timeout
            )
        else:
            self._connections = _DirectConnections(
                api_url, ca_bundle, connect_timeout, read_timeout
            )

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        params: dict[str, object] | None = None,
        body: str | None = None,
        max_body: int,
        deadline: float = math.inf,
    ) -> HttpResponse:
        """One exchange. ResponseTooLarge for a body over ``max_body`` bytes; TransportTimeout
        when the whole answer has not arrived by ``deadline`` (time.monotonic()), even if it
        keeps trickling in (the read timeout alone applies to each read)."""
        return self._connections.send(
            method,
            url,
            _query(params) if params else "",
            {**self._headers, **headers},
            body.encode() if body is not None else None,
            max_body,
            deadline,
        )

    @staticmethod
    def origin(url: str) -> tuple[str, str, int]:
        """(scheme, host, port) as urllib3, which connects through a proxy, reads ``url``;
        ValueError if it cannot. The direct path connects to the API's host whatever the
        URL says, so urllib3's reading is the one that decides where a request may go."""
        try:
            parts = parse_url(url)
        except LocationParseError as exc:
            raise ValueError("not a URL urllib3 can parse") from exc
        scheme = (parts.scheme or "").lower()
        default = {"http": 80, "https": 443}.get(scheme)
        if default is None or not parts.host:
            raise ValueError("not an http(s) URL")
        return scheme, parts.host.lower().strip("[]"), parts.port or default

    def abort(self) -> None:
        """Break every connection, in-flight exchanges included (they fail at once), and make
        no new one: how a stop request reaches a thread blocked reading an answer (and keeps
        a resend from starting over). Usable from any thread; the transport is done after."""
        self._connections.abort()

    def close(self) -> None:
        self._connections.close()


def _query(params: dict[str, object]) -> str:
    # urlencode quotes every value through several layers of calls; the integers it would get
    # on the hot path (the organization_id of each billing read) need no quoting at all.
    return "&".join(
        f"{_quoted(name)}={value}" if type(value) is int else urlencode({name: value})
        for name, value in params.items()
    )


@functools.lru_cache(maxsize=64)
def _quoted(name: str) -> str:
    return quote_plus(name)


def _with_query(url: str, query: str) -> str:
    if not query:
        return url
    return url + ("&" if "?" in url else "?") + query


# The client sends nearly every request to the same URL (the billing endpoint, its query
# apart): split it once, not 100,000 times a cycle.
@functools.lru_cache(maxsize=256)
def _request_target(url: str) -> str:
    """The origin-form target of an absolute URL: its path and query."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def ca_bundle_path() -> str:
    """The CA bundle requests would use: REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, else certifi's.

    An empty variable counts as unset, as in requests: it never turns verification off.
    """
    return (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
    )


class _DirectConnections:
    """One keep-alive connection per thread to the API's own host (the caller checks that)."""

    def __init__(
        self, api_url: str, ca_bundle: str, connect_timeout: float, read_timeout: float
    ) -> None:
        parts = urlsplit(api_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        default_port = self._port == (443 if self._https else 80)
        name = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = name if default_port else f"{name}:{self._port}"
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._tls: ssl.SSLContext | None = None
        if self._https:
            location = "capath" if os.path.isdir(ca_bundle) else "cafile"
            self._tls = ssl.create_default_context(**{location: ca_bundle})
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[http11.Connection] = set()
        self._aborted = False

    def send(
        self,
        method: str,
        url: str,
        query: str,
        headers: dict[str, str],
        body: bytes | None,
        max_body: int,
        deadline: float,
    ) -> HttpResponse:
        target = _with_query(_request_target(url), query)
        try:
            request = http11.format_request(method, target, self._host_header, headers, body)
        except ValueError as exc:
            raise TransportError(str(exc)) from exc
        # A GET can be sent again when a connection turns out to be closed: the server never
        # read it. Checking a connection before every request costs a system call and a GIL
        # hand-off each (about a sixth of a worker's CPU per request), so a GET pays for it
        # only after the connection sat idle (between a daemon's cycles, say), when a server
        # may also have written something on it (a 408 before closing) that would otherwise
        # be read as the GET's answer. A PATCH, which is never sent twice, always checks.
        idempotent = method == "GET"
        check_after = IDLE_CHECK_AFTER if idempotent else 0.0
        connection = self._connection(check_after)
        try:
            try:
                response = connection.exchange(request, max_body=max_body, deadline=deadline)
            except http11.NoResponse:
                if not (idempotent and connection.exchanges):
                    raise
                # A keep-alive connection the server closed while it was idle.
                self._discard(connection)
                connection = self._connection(check_after)
                response = connection.exchange(request, max_body=max_body, deadline=deadline)
        except ssl.SSLError as exc:
            self._discard(connection)
            raise TransportTlsError("TLS failed") from exc
        except TimeoutError as exc:
            self._discard(connection)
            raise TransportTimeout("timed out") from exc
        except http11.BodyTooLarge as exc:
            self._discard(connection)
            raise ResponseTooLarge(str(exc)) from exc
        except http11.ProtocolError as exc:
            self._discard(connection)
            raise TransportError(f"connection failed ({exc})") from exc
        except OSError as exc:
            self._discard(connection)
            raise TransportError("connection failed") from exc
        if not response.keep_alive:
            self._discard(connection)
        return HttpResponse(
            status=response.status,
            content=response.body,
            retry_after=response.headers.get("retry-after"),
        )

    def _connection(self, check_after: float) -> http11.Connection:
        """This thread's connection, checked first if it has sat idle for ``check_after``
        seconds or more (0: always); a new one if there is none or the check fails."""
        connection: http11.Connection | None = getattr(self._local, "connection", None)
        # An idle keep-alive connection the server has closed reads as "readable" (EOF, or
        # bytes nobody asked for): reconnect instead of reading them as the next answer.
        if (
            connection is not None
            and time.monotonic() - connection.idle_since >= check_after
            and wait_for_read(connection.sock, timeout=0.0)
        ):
            self._discard(connection)
            connection = None
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._lock:
                self._open.add(connection)
        return connection

    def _connect(self) -> http11.Connection:
        if self._aborted:
            raise TransportError("stopped")
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((self._host, self._port), self._connect_timeout)
            # Each request leaves in one send; without this its answer's ACK could be delayed.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
            sock.settimeout(self._read_timeout)
        except ssl.SSLError as exc:
            _close_quietly(sock)
            raise TransportTlsError("TLS failed") from exc
        except TimeoutError as exc:
            _close_quietly(sock)
            raise TransportTimeout("timed out") from exc
        except OSError as exc:
            _close_quietly(sock)
            raise TransportError("connection failed") from exc
        return http11.Connection(sock)

    def _discard(self, connection: http11.Connection) -> None:
        connection.close()
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        with self._lock:
            self._open.discard(connection)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            connections = list(self._open)
        for connection in connections:
            # shutdown, not close: it wakes a thread blocked in recv on the socket.
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:
            connection.close()


def _close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


class _TrackingProxyManager(urllib3.ProxyManager):
    """A ProxyManager that remembers the connections it opens, so that ``abort`` can break the
    ones a request is using (the pool itself only knows its idle ones)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._made: weakref.WeakSet[Any] = weakref.WeakSet()
        self._aborted = False

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> Any:
        pool = super()._new_pool(scheme, host, port, request_context)
        new_conn = pool._new_conn

        def tracked() -> Any:
            connection = new_conn()
            with self._lock:
                if self._aborted:
                    raise TransportError("stopped")
                self._made.add(connection)
            return connection

        pool._new_conn = tracked  # type: ignore[method-assign]
        return pool

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            connections = list(self._made)
        for connection in connections:
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _ProxiedConnections:
    """urllib3's ProxyManager: CONNECT tunnels for https, absolute URLs for http."""

    def __init__(
        self,
        proxy: str,
        ca_bundle: str,
        pool_size: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        if not proxy.lower().startswith(("http://", "https://")):
            raise ConfigError(
                "the proxy for the API URL must be an http:// or https:// URL "
                "(check HTTPS_PROXY / HTTP_PROXY / ALL_PROXY)"
            )
        username, password = get_auth_from_url(proxy)
        proxy_headers = (
            urllib3.make_headers(proxy_basic_auth=f"{username}:{password}") if username else None
        )
        location = "ca_cert_dir" if os.path.isdir(ca_bundle) else "ca_certs"
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._pool = _TrackingProxyManager(
            proxy,
            proxy_headers=proxy_headers,
            num_pools=4,
            maxsize=max(1, pool_size),
            cert_reqs="CERT_REQUIRED",
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            **{location: ca_bundle},
        )

    def send(
        self,
        method: str,
        url: str,
        query: str,
        headers: dict[str, str],
        body: bytes | None,
        max_body: int,
        deadline: float,
    ) -> HttpResponse:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportTimeout("timed out")
        # No single wait may outlast the deadline; read1 below checks it between reads.
        timeout = urllib3.Timeout(
            connect=min(self._connect_timeout, remaining), read=min(self._read_timeout, remaining)
        )
        response = None
        try:
            response = self._pool.request(
                method,
                _with_query(url, query),
                body=body,
                headers=headers,
                timeout=timeout,
                retries=False,
                redirect=False,
                preload_content=False,
            )
            content = _read_body(response, max_body, deadline)
        # Order matters: urllib3's NewConnectionError is a subclass of its TimeoutError.
        except SSLError as exc:
            raise TransportTlsError("TLS failed") from exc
        except NewConnectionError as exc:
            raise TransportError("connection failed") from exc
        except Urllib3Timeout as exc:
            raise TransportTimeout("timed out") from exc
        except HTTPError as exc:
            raise TransportError(f"connection failed ({type(exc).__name__})") from exc
        except OSError as exc:  # a connection broken by abort() while reading
            raise TransportError("connection failed") from exc
        finally:
            if response is not None:
                response.release_conn()
        return HttpResponse(
            status=response.status,
            content=content,
            retry_after=response.headers.get("Retry-After"),
        )

    def abort(self) -> None:
        self._pool.abort()

    def close(self) -> None:
        self._pool.clear()


def _read_body(response: urllib3.BaseHTTPResponse, max_body: int, deadline: float) -> bytearray:
    """The body, read as it arrives: over ``max_body`` bytes or past ``deadline`` it fails
    (and the connection is closed) instead of being buffered or waited for without end."""
    try:
        announced = int(response.headers.get("Content-Length") or 0)
    except ValueError:
        announced = 0
    if announced > max_body:
        response.close()
        raise ResponseTooLarge(http11.too_large(max_body))
    content = bytearray()
    while chunk := response.read1(_READ_BYTES):
        content += chunk
        if len(content) > max_body:
            response.close()
            raise ResponseTooLarge(http11.too_large(max_body))
        if time.monotonic() > deadline:
            response.close()
            raise TransportTimeout("timed out")
    return content

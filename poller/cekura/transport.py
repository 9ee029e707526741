"""HTTP for the Cekura client, on urllib3: keep-alive connections to the API, direct or through
the proxy the environment names, with bounded bodies and a total deadline per request.

No redirects are followed and nothing is retried here: the client owns retries, back-off and
the decision never to send a credential anywhere but the API's own origin (``origin`` reads a
URL with the parser that sends it). Why urllib3 and what it costs: docs/http-client.md.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, unquote, urlencode

# proxy_bypass_environment is documented but missing from typeshed's stub of the module.
from urllib.request import getproxies_environment, proxy_bypass_environment  # type: ignore[attr-defined]

import certifi
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    HTTPError,
    LocationParseError,
    NewConnectionError,
    ProtocolError,
    SSLError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import Retry, parse_url

from poller.config.settings import ConfigError

# How often the watchdog looks for requests past their deadline: a deadline is kept to this.
WATCH_INTERVAL = 0.1
# No retries, no redirects (the client owns both): one object, not one built per request.
_NO_RETRIES = Retry(total=False, redirect=False)
# What one read of a body without a Content-Length asks for.
_READ_BYTES = 256 * 1024


class TransportError(Exception):
    """One HTTP attempt failed before an answer arrived. Messages name no URL or credential."""


class TransportTimeout(TransportError):
    """Connecting or reading took longer than the configured timeout or the deadline."""


class ResponseTooLarge(TransportError):
    """The answer's body is larger than the caller allowed for its endpoint."""


class TransportTlsError(TransportError):
    """The server's certificate could not be verified (or TLS failed otherwise)."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    content: bytes
    retry_after: str | None


class HttpTransport:
    """Thread-safe: each thread that uses it keeps one keep-alive connection to the API."""

    def __init__(
        self,
        api_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
    ) -> None:
        # identity: poller decodes no compressed bodies, so it must not invite one.
        self._headers = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
        self._timeouts = (connect_timeout, read_timeout)
        self._watchdog = _Watchdog()
        ca_bundle = ca_bundle_path()
        self._options: dict[str, Any] = {
            "num_pools": 1,
            "maxsize": 1,
            "cert_reqs": "CERT_REQUIRED",
            ("ca_cert_dir" if os.path.isdir(ca_bundle) else "ca_certs"): ca_bundle,
            "retries": _NO_RETRIES,
            "timeout": urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        }
        self._api_url = api_url
        self._proxy = environment_proxy(api_url)
        # A plain-http request through a proxy names the whole URL and the API's host, which
        # the manager adds; any other names only the path, to the pool of the API's origin.
        self._absolute = self._proxy is not None and parse_url(api_url).scheme == "http"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._managers: list[urllib3.PoolManager] = []

    def _sender(self) -> Callable[..., urllib3.BaseHTTPResponse]:
        """This thread's way to send: its own manager and one keep-alive connection."""
        send: Callable[..., urllib3.BaseHTTPResponse] | None = getattr(self._local, "send", None)
        if send is None:
            manager: urllib3.PoolManager
            if self._proxy is None:
                manager = urllib3.PoolManager(**self._options)
            else:
                manager = urllib3.ProxyManager(
                    self._proxy, proxy_headers=_proxy_headers(self._proxy), **self._options
                )
            manager.pool_classes_by_scheme = {"http": _HttpPool, "https": _HttpsPool}
            with self._lock:
                self._managers.append(manager)
            send = (
                manager.urlopen
                if self._absolute
                else manager.connection_from_url(self._api_url).urlopen
            )
            self._local.send = send
        return send

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
        """One exchange with the API (the caller has checked that ``url`` has the API's
        ``origin``), sending exactly ``headers``. ResponseTooLarge for a body over
        ``max_body`` bytes; TransportTimeout when the whole answer has not arrived by
        ``deadline`` (time.monotonic()), however steadily it trickles in."""
        target = url if self._absolute else _request_target(url)
        if params:
            target += ("&" if "?" in target else "?") + _query(params)
        encoded = body.encode() if body is not None else None
        return self._exchange(method, target, headers, encoded, max_body, deadline, method == "GET")

    def _exchange(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        max_body: int,
        deadline: float,
        resend: bool,
    ) -> HttpResponse:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportTimeout("timed out")
        connect_timeout, read_timeout = self._timeouts
        timeout: urllib3.Timeout | None = None
        if remaining < max(connect_timeout, read_timeout):  # no single wait past the deadline
            timeout = urllib3.Timeout(
                connect=min(connect_timeout, remaining), read=min(read_timeout, remaining)
            )
        send = self._sender()
        self._watchdog.begin(deadline)
        response: urllib3.BaseHTTPResponse | None = None
        broken = False
        try:
            try:
                response = send(
                    method,
                    target,
                    body=body,
                    headers=headers,
                    retries=_NO_RETRIES,
                    redirect=False,
                    assert_same_host=False,
                    preload_content=False,
                    decode_content=False,
                    **({"timeout": timeout} if timeout is not None else {}),
                )
                content = _read_body(response, max_body)
            finally:
                broken = self._watchdog.end()
                if response is not None:
                    if broken:
                        response.close()
                    response.release_conn()
        except (ValueError, HTTPError, OSError) as exc:
            if broken:
                raise self._watchdog.reason(deadline) from exc
            if resend and response is None and _current.reused and _unanswered(exc):
                # A kept-alive connection the server closed while it sat idle: the server
                # never read the request, and a GET may go again, on a new connection.
                return self._exchange(method, target, headers, body, max_body, deadline, False)
            raise _failure(exc) from exc
        if broken:
            # The watchdog shut the connection: what was read may have ended there.
            raise self._watchdog.reason(deadline)
        return HttpResponse(
            status=response.status,
            content=content,
            retry_after=response.headers.get("Retry-After"),
        )

    @property
    def headers(self) -> dict[str, str]:
        """The headers every request should send besides its own (User-Agent, Accept-Encoding):
        merged once by the caller, not on every request."""
        return dict(self._headers)

    def abort(self) -> None:
        """Break every exchange in flight (it fails at once) and start no new one: how a stop
        request reaches a thread blocked reading an answer. Usable from any thread; the
        transport is done after."""
        self._watchdog.abort()

    def close(self) -> None:
        self._watchdog.close()
        with self._lock:
            managers, self._managers = self._managers, []
        for manager in managers:
            manager.clear()


def _failure(exc: Exception) -> TransportError:
    """What a failed exchange reports; never the exception's text, which may name the URL."""
    # Order matters: urllib3's NewConnectionError is a subclass of its TimeoutError.
    if isinstance(exc, SSLError):
        return TransportTlsError("TLS failed")
    if isinstance(exc, NewConnectionError):
        return TransportError("connection failed")
    if isinstance(exc, Urllib3Timeout):
        return TransportTimeout("timed out")
    if isinstance(exc, ValueError):
        # http.client refuses a header value with a line break or a character latin-1 cannot
        # carry; its message quotes the value, which may be a credential.
        return TransportError(
            "a request header contains a line break or a character HTTP cannot carry"
        )
    return TransportError(f"connection failed ({type(exc).__name__})")


class _Watchdog:
    """Breaks the connection of an exchange still going at its deadline, or of every exchange
    on ``abort``: socket timeouts bound each read, not an answer trickled in byte by byte."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The socket and deadline of each thread's exchange in flight.
        self._busy: dict[int, tuple[socket.socket | None, float]] = {}
        self._broken: set[int] = set()
        self._aborted = False
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, deadline: float) -> None:
        """The calling thread starts an exchange; its socket follows in ``watch``."""
        with self._lock:
            if self._aborted:
                raise TransportError("stopped")
            self._busy[threading.get_ident()] = (None, deadline)
            if self._thread is None and deadline != math.inf:
                self._thread = threading.Thread(
                    target=self._run, name="cekura-watchdog", daemon=True
                )
                self._thread.start()
        _current.watchdog = self
        _current.reused = False

    def watch(self, sock: socket.socket | None) -> None:
        """The connection of the calling thread's exchange, before its request is sent."""
        ident = threading.get_ident()
        with self._lock:
            if self._aborted:
                raise TransportError("stopped")
            entry = self._busy.get(ident)
            if entry is None:  # broken off before its request went out: the deadline passed
                raise TransportTimeout("timed out")
            self._busy[ident] = (sock, entry[1])

    def end(self) -> bool:
        """The calling thread's exchange is over; whether the watchdog broke it."""
        _current.watchdog = None
        ident = threading.get_ident()
        with self._lock:
            self._busy.pop(ident, None)
            if ident in self._broken:
                self._broken.discard(ident)
                return True
            return False

    def reason(self, deadline: float) -> TransportError:
        if time.monotonic() >= deadline:
            return TransportTimeout("timed out")
        return TransportError("stopped")

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            self._break(list(self._busy))

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(WATCH_INTERVAL):
            now = time.monotonic()
            with self._lock:
                self._break([ident for ident, (_, end) in self._busy.items() if end <= now])

    def _break(self, idents: list[int]) -> None:
        for ident in idents:
            sock, _ = self._busy.pop(ident)
            self._broken.add(ident)
            if sock is not None:
                # shutdown, not close: it wakes a thread blocked in recv on the socket.
                with contextlib.suppress(OSError, AttributeError):
                    sock.shutdown(socket.SHUT_RDWR)


# The watchdog of the exchange the current thread is making, for its connection to report to.
_current = threading.local()


def _watch(connection: _WatchedHttpConnection | _WatchedHttpsConnection) -> None:
    """Called by a connection as it sends a request: hands its socket to the watchdog."""
    if connection.sock is None:
        connection.connect()
        connection.used = False
    _current.reused = connection.used
    connection.used = True
    watchdog: _Watchdog | None = getattr(_current, "watchdog", None)
    if watchdog is not None:
        watchdog.watch(connection.sock)


def _unanswered(exc: Exception) -> bool:
    """Whether the server hung up before answering at all (urllib3 wraps what http.client
    raised then in a ProtocolError)."""
    return isinstance(exc, ProtocolError) and isinstance(
        exc.args[-1], (ConnectionResetError, BrokenPipeError)
    )


class _WatchedHttpConnection(HTTPConnection):
    used = False  # whether it carried an exchange before, since it was last connected

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        _watch(self)
        super().request(method, url, *args, **kwargs)


class _WatchedHttpsConnection(HTTPSConnection):
    used = False

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        _watch(self)
        super().request(method, url, *args, **kwargs)


class _HttpPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHttpConnection


class _HttpsPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHttpsConnection


def _read_body(response: urllib3.BaseHTTPResponse, max_body: int) -> bytes:
    """The body; over ``max_body`` bytes it fails (and the connection is closed) instead of
    being buffered without end."""
    length = response.length_remaining
    if length is not None:  # a Content-Length, checked by urllib3: read it in one go
        if length > max_body:
            response.close()
            raise ResponseTooLarge(too_large(max_body))
        return response.read()
    parts: list[bytes] = []
    size = 0
    # Never a byte more than one past the limit: the rest, and the body's end, stay unread,
    # so the connection cannot go back to the pool as if the answer had been whole.
    while chunk := response.read(min(_READ_BYTES, max_body + 1 - size)):
        size += len(chunk)
        if size > max_body:
            response.close()
            raise ResponseTooLarge(too_large(max_body))
        parts.append(chunk)
    return b"".join(parts)


def too_large(max_body: int) -> str:
    return f"the response body is too large (over {max_body / 1048576:g} MiB)"


# Anything but visible ASCII, and backslashes: parsers disagree on what these mean (urlsplit
# reads "https://evil.test\@api/" as the host api, urllib3 as the host evil.test).
_AMBIGUOUS_URL = re.compile(r"[^!-~]|\\")
# The authority of an absolute URL, as urllib3's own pattern delimits it.
_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


# Every request's URL is checked, and nearly all of them are the same few (billing).
@functools.lru_cache(maxsize=256)
def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL as urllib3, which sends the request, reads it.

    ValueError for one it cannot read, and for one other parsers may read differently:
    spaces, backslashes or non-ASCII anywhere, user information or %-escapes in the host part.
    """
    if _AMBIGUOUS_URL.search(url):
        raise ValueError("the URL contains a space, a backslash or a character that is not ASCII")
    authority = _AUTHORITY.match(url)
    if authority is None:
        raise ValueError("must be an http(s) URL with a host")
    if "@" in authority[1] or "%" in authority[1]:
        raise ValueError("the host part contains a user name, a password or percent-escapes")
    try:
        parts = parse_url(url)
    except LocationParseError:
        raise ValueError("not a URL urllib3 can parse") from None
    default = {"http": 80, "https": 443}.get(parts.scheme or "")
    if default is None or not parts.host:
        raise ValueError("must be an http(s) URL with a host")
    return parts.scheme or "", parts.host.strip("[]"), parts.port or default


# The client sends nearly every request to the same URL (the billing endpoint, its query
# apart): read it once, not 100,000 times a cycle.
@functools.lru_cache(maxsize=256)
def _request_target(url: str) -> str:
    return parse_url(url).request_uri


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


def ca_bundle_path() -> str:
    """The CA bundle: REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, else certifi's (what requests and
    curl users expect). An empty variable counts as unset: it never turns verification off."""
    return (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
    )


def environment_proxy(url: str) -> str | None:
    """The proxy for ``url`` from HTTP_PROXY / HTTPS_PROXY / ALL_PROXY and NO_PROXY (lower case
    first; NO_PROXY takes host names, domain suffixes, IP addresses and networks, or ``*``);
    ConfigError for a proxy that is not an http(s) URL."""
    proxies = getproxies_environment()
    parts = parse_url(url)
    host = (parts.host or "").strip("[]")
    if _bypassed(host, parts.port, proxies.get("no", "")):
        return None
    proxy = proxies.get(parts.scheme or "") or proxies.get("all")
    if proxy is None:
        return None
    if not proxy.lower().startswith(("http://", "https://")):
        raise ConfigError(
            "the proxy for the API URL must be an http:// or https:// URL "
            "(check HTTPS_PROXY / HTTP_PROXY / ALL_PROXY)"
        )
    return proxy


def _bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    if not no_proxy:
        return False
    hostport = host if port is None else f"{host}:{port}"
    if proxy_bypass_environment(hostport, {"no": no_proxy}):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        with contextlib.suppress(ValueError):
            if address in ipaddress.ip_network(entry.strip(), strict=False):
                return True
    return False


def _proxy_headers(proxy: str) -> dict[str, str] | None:
    auth = parse_url(proxy).auth
    if not auth:
        return None
    username, _, password = auth.partition(":")
    return urllib3.make_headers(proxy_basic_auth=f"{unquote(username)}:{unquote(password)}")

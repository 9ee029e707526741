"""HTTP/1.1 over one connected socket: a request out, its response in (RFC 9112).

Why not http.client: at 100,000 organizations a cycle makes one billing request per org, and
on a small machine the client's own CPU per request decides the cycle time. http.client spends
most of its ~140-200 µs per request on generic machinery (a buffered file per response, header
parsing through the ``email`` package); this module does the same exchange in a fraction of
that (figures in docs/benchmarks.md). Poller needs a small part of HTTP/1.1: GET and PATCH
with small bodies, one request at a time per connection, keep-alive. That part is here,
following RFC 9112's rules for where a response ends (Content-Length, chunked, or the end of
the connection), and nothing else: no redirects, no compression (poller asks for identity),
no proxies (poller.cekura.transport sends those through urllib3).

Anything a server sends that this module cannot frame with certainty raises ``ProtocolError``
and the caller must drop the connection: a misread length would pair the next request with
the wrong answer.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

# Limits that keep a broken or hostile server from making the poller buffer without end (the
# body's limit is the caller's: it knows what the endpoint can plausibly answer).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
_RECV_BYTES = 256 * 1024
# Hex digits only: int(text, 16) would also take "1_0", " a" or "+a".
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this client can read; the connection is unusable."""


class BodyTooLarge(ProtocolError):
    """The body is larger than the caller's limit; the connection is unusable."""


def too_large(max_body: int) -> str:
    return f"the response body is too large (over {max_body / 1048576:g} MiB)"


class ConnectionClosed(ProtocolError):
    """The server closed the connection before a complete response arrived."""


class NoResponse(ConnectionClosed):
    """The connection ended before the first byte of an answer: the server dropped the request
    unread, as it does on a keep-alive connection it has closed while idle."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case; repeated fields joined with ", "
    body: bytes
    keep_alive: bool  # False: the connection must not carry another request


def format_request(
    method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None
) -> bytes:
    """The request as bytes, ready for one send; ValueError for a value that could split it."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    text = "\r\n".join(lines) + "\r\n\r\n"
    # A CR, LF or NUL inside a value would end its line early and let the rest be read as a
    # header (or a request) of its own: only the line ends put here are allowed.
    breaks = len(lines) + 1
    if text.count("\n") != breaks or text.count("\r") != breaks or "\0" in text:
        raise ValueError("a request line or header contains a line break")
    try:
        head = text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(
            "a request line or header contains a character HTTP cannot carry"
        ) from None
    return head + body if body else head


class Connection:
    """One socket, one exchange at a time. Not thread-safe: each worker keeps its own."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.exchanges = 0  # completed on this connection
        self.idle_since = time.monotonic()  # when the last exchange ended (or it was opened)
        # Bytes received beyond the part of a response parsed so far.
        self._pending = b""
        # The socket's own timeout applies to each read; the exchange's deadline to all of them.
        self._read_timeout = sock.gettimeout()
        self._deadline = math.inf
        self._max_body = 0

    def exchange(self, request: bytes, *, max_body: int, deadline: float = math.inf) -> Response:
        """Send ``request`` and read its whole response (interim 1xx answers skipped).

        TimeoutError once ``deadline`` (time.monotonic()) passes, however steadily bytes
        trickle in; BodyTooLarge for a body over ``max_body`` bytes.
        """
        self._deadline, self._max_body = deadline, max_body
        if self.sock.gettimeout() != self._read_timeout:
            self.sock.settimeout(self._read_timeout)  # shortened near the previous deadline
        try:
            self.sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise NoResponse("the server closed the connection before the request") from exc
        first = True
        while True:
            version, status, headers = self._read_head(first)
            first = False
            # 1xx are interim (100 Continue, 103 Early Hints); the real answer follows.
            # 101 would switch protocols, which poller never asks for.
            if 100 <= status < 200 and status != 101:
                continue
            break
        body, delimited = self._read_body(status, headers)
        connection = headers.get("connection", "").lower()
        keep_alive = (
            delimited
            and status != 101  # after a protocol switch the connection no longer speaks HTTP
            and version == "HTTP/1.1"
            and "close" not in (token.strip() for token in connection.split(","))
            # Bytes after the response were never asked for: the pairing of requests and
            # answers on this connection can no longer be trusted.
            and not self._pending
        )
        self.exchanges += 1
        self.idle_since = time.monotonic()
        return Response(status=status, headers=headers, body=body, keep_alive=keep_alive)

    def close(self) -> None:
        self.sock.close()

    def _recv(self, size: int) -> bytes:
        """One read, which waits no longer than the read timeout nor past the deadline."""
        remaining = self._deadline - time.monotonic()
        if remaining < self._read_timeout:
            if remaining <= 0:
                raise TimeoutError("the response did not arrive in time")
            self.sock.settimeout(remaining)
        return self.sock.recv(size)

    # --- the head ----------------------------------------------------------------------------

    def _read_head(self, first: bool) -> tuple[str, int, dict[str, str]]:
        """The next head; ``first``: the exchange's first, so nothing of its answer came yet."""
        data = self._pending
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                head, self._pending = data[:end], data[end + 4 :]
                break
            if len(data) > MAX_HEAD_BYTES:
                raise ProtocolError("the response headers are too long")
            unanswered = first and not data
            try:
                chunk = self._recv(_RECV_BYTES)
            except ConnectionResetError as exc:
                if unanswered:
                    raise NoResponse("the server reset the connection without answering") from exc
                raise
            if not chunk:
                if unanswered:
                    raise NoResponse("the server closed the connection without answering")
                raise ConnectionClosed("the server closed the connection mid-response")
            data += chunk
        return _parse_head(head)

    # --- the body ----------------------------------------------------------------------------

    def _read_body(self, status: int, headers: dict[str, str]) -> tuple[bytes, bool]:
        """(body, whether its end was marked) following RFC 9112 section 6.3."""
        if status in (204, 304) or status < 200:
            return b"", True
        transfer_encoding = headers.get("transfer-encoding")
        if transfer_encoding is not None:
            codings = [c.strip().lower() for c in transfer_encoding.split(",")]
            if codings[-1] != "chunked":
                return self._read_until_closed(), False
            # Both headers present: chunked wins, and the connection must not be reused.
            return self._read_chunked(), "content-length" not in headers
        length = headers.get("content-length")
        if length is None:
            return self._read_until_closed(), False
        size = _content_length(length)
        if size > self._max_body:
            raise BodyTooLarge(too_large(self._max_body))
        return self._read_exactly(size), True

    def _read_exactly(self, size: int) -> bytes:
        data = self._pending
        if len(data) >= size:
            self._pending = data[size:]
            return data[:size]
        parts, have = [data], len(data)
        while have < size:
            chunk = self._recv(max(_RECV_BYTES, size - have))
            if not chunk:
                raise ConnectionClosed("the server closed the connection mid-response")
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        self._pending = data[size:]
        return data[:size]

    def _read_line(self) -> bytes:
        data = self._pending
        while (end := data.find(b"\r\n")) < 0:
            if len(data) > MAX_HEAD_BYTES:
                raise ProtocolError("a chunk header is too long")
            chunk = self._recv(_RECV_BYTES)
            if not chunk:
                raise ConnectionClosed("the server closed the connection mid-response")
            data += chunk
        self._pending = data[end + 2 :]
        return data[:end]

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = self._read_line().split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise ProtocolError("a chunk size is not a hexadecimal number")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > self._max_body:
                raise BodyTooLarge(too_large(self._max_body))
            parts.append(self._read_exactly(size))
            if self._read_exactly(2) != b"\r\n":
                raise ProtocolError("a chunk does not end where its size says")
        # Trailer fields, if any, end with an empty line; poller needs none of them.
        for _ in range(MAX_HEADERS + 1):
            if not self._read_line():
                return b"".join(parts)
        raise ProtocolError("too many trailer fields")

    def _read_until_closed(self) -> bytes:
        parts, total = [self._pending], len(self._pending)
        self._pending = b""
        while chunk := self._recv(_RECV_BYTES):
            total += len(chunk)
            if total > self._max_body:
                raise BodyTooLarge(too_large(self._max_body))
            parts.append(chunk)
        return b"".join(parts)


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not (
        len(code) == 3 and code.isdigit() and code.isascii() and rest[3:4] in ("", " ")
    ):
        raise ProtocolError("the status line is not HTTP/1.x")
    if len(lines) > MAX_HEADERS + 1:
        raise ProtocolError("too many response headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # No space before the colon (RFC 9112 5.1) and no folded continuation lines: both were
        # used to smuggle a second reading of a header past one of two parsers.
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise ProtocolError("a response header is malformed")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return version, int(code), headers


def _content_length(value: str) -> int:
    # A repeated Content-Length is tolerable only if every copy says the same (RFC 9110 8.6).
    copies = {part.strip() for part in value.split(",")}
    if len(copies) != 1:
        raise ProtocolError("the response has conflicting Content-Length headers")
    text = copies.pop()
    if not (text.isdigit() and text.isascii()):
        raise ProtocolError("the Content-Length header is not a number")
    return int(text)

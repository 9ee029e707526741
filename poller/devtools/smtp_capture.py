"""A local SMTP server (aiosmtpd, from the devtools extra) that keeps every message it
receives, for `make demo`, the benchmark and the tests."""

from __future__ import annotations

import email
import email.policy
import socket
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from functools import cached_property
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class CapturedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes

    @cached_property
    def message(self) -> EmailMessage:
        """The message as a mail client would read it, parsed on first use.

        Parsing costs about 3 ms of CPU per message, more than poller spends sending one: a
        benchmark delivering thousands of emails to this server only keeps the bytes.
        """
        # Local line endings, as a mail client keeps a message, so text reads cleanly.
        local = self.raw.replace(b"\r\n", b"\n")
        message = email.message_from_bytes(local, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (right now): for a server to bind, or to be refused on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class CaptureHandler:
    """aiosmtpd handler that accepts everything and keeps it in ``received``."""

    def __init__(self) -> None:
        self.received: list[CapturedMessage] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.capture(envelope)
        return "250 2.0.0 OK: queued"

    def capture(self, envelope: Envelope) -> None:
        self.received.append(
            CapturedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                raw=envelope.original_content or b"",
            )
        )


class _CountingController(Controller):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections = 0

    def factory(self) -> SMTP:
        # aiosmtpd builds one SMTP protocol object per client connection.
        self.connections += 1
        protocol: SMTP = super().factory()  # type: ignore[no-untyped-call]
        return protocol


class SmtpCapture:
    """An aiosmtpd server on its own thread; ``with SmtpCapture() as server: ...``.

    ``smtp_options`` go to aiosmtpd's SMTP class (tls_context, authenticator, ...);
    ``ssl_context`` makes it an implicit-TLS (SMTPS) server.
    """

    def __init__(
        self,
        handler: CaptureHandler | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ssl_context: Any = None,
        **smtp_options: Any,
    ) -> None:
        self.handler = handler or CaptureHandler()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._controller = _CountingController(
            self.handler,
            hostname=host,
            port=self.port,
            ssl_context=ssl_context,
            server_hostname="poller-capture.localhost",
            **smtp_options,
        )
        self._started = threading.Event()

    @property
    def received(self) -> list[CapturedMessage]:
        """Every accepted message with its envelope, oldest first."""
        return self.handler.received

    @property
    def messages(self) -> list[EmailMessage]:
        """Every accepted message as a mail client would read it, oldest first."""
        return [captured.message for captured in self.handler.received]

    @property
    def connections(self) -> int:
        """Client connections accepted since start()."""
        return self._controller.connections

    def start(self) -> SmtpCapture:
        self._controller.start()
        # start() opens one connection of its own to check the server is up; not a client's.
        self._controller.connections = 0
        self._started.set()
        return self

    def stop(self) -> None:
        if self._started.is_set():
            self._controller.stop()
            self._started.clear()

    def __enter__(self) -> SmtpCapture:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def describe(captured: CapturedMessage) -> str:
    """A message as a person reads it in a terminal: headers, then the plain-text part."""
    message = captured.message
    lines = [f"Envelope: {captured.mail_from} -> {', '.join(captured.rcpt_tos)}"]
    # Unfolded: a long header arrives folded over several lines (or starting on the next one).
    lines += [f"{name}: {' '.join(str(value).split())}" for name, value in message.items()]
    body = message.get_body(preferencelist=("plain",))
    text = body.get_content() if body is not None else "(no text/plain part)"
    lines += ["", text]
    return "\n".join(lines)

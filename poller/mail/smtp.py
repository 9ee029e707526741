"""Handing messages to an SMTP server (smtplib): one reused connection, and every way a send can
fail turned into ``DeliveryError(permanent=...)``, so the caller only decides "retry" or "give up".
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType

import structlog

from poller.config.settings import Secret, Settings
from poller.engine.addresses import needs_smtputf8, smtp_address
from poller.mail.message import OutgoingMessage
from poller.mail.render import one_line

log = structlog.get_logger(__name__)


class DeliveryError(Exception):
    """Sending failed. ``permanent``: retrying the same message to the same recipients
    cannot help.

    The message is the server's own answer where there is one ("550 5.1.1 no such user"),
    otherwise what went wrong with the connection. It never contains the SMTP password.
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        smtp_code: int | None = None,
        refused: dict[str, tuple[int, bytes]] | None = None,
        maybe_delivered: bool = False,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.smtp_code = smtp_code
        # The connection failed before the server's answer to the message arrived: it may have
        # the message already, so the retry may be a duplicate (with the same Message-ID).
        self.maybe_delivered = maybe_delivered
        # Each recipient's answer when the server refused every recipient; empty when the
        # failure is not about the recipients (connection, login, sender, the message itself).
        self.refused = refused or {}


SECURITY_MODES = ("none", "starttls", "ssl")


class SmtpTransport:
    """One SMTP connection reused for a batch of messages; not for use by several threads.

    Use as a context manager. The connection is opened on the first ``send``; after any error it
    is dropped and the next ``send`` opens a new one.

    Only the server refusing the message itself is permanent: a 5xx answer to MAIL FROM or DATA,
    or to RCPT TO for every recipient. Connection, TLS and login problems are temporary, because
    they are fixed on our side or the server's and the alert should go out once they are.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: str,
        username: str | None,
        password: Secret | None,
        timeout: float,
        local_hostname: str | None = None,
    ) -> None:
        if security not in SECURITY_MODES:
            raise ValueError(f"smtp security must be one of {', '.join(SECURITY_MODES)}")
        if (username is None) != (password is None):
            raise ValueError("smtp username and password must be given together")
        self._host = host
        self._port = port
        self._security = security
        self._username = username
        self._password = password
        self._timeout = timeout
        self._local_hostname = local_hostname
        self._connection: smtplib.SMTP | None = None
        # Opened by smtputf8() and not used for a message yet: a failure on it is not an
        # idle connection the server dropped, so it is not worth a second one.
        self._fresh = False

    def __repr__(self) -> str:
        return (
            f"SmtpTransport(host={self._host!r}, port={self._port}, "
            f"security={self._security!r}, username={self._username!r})"
        )

    def __enter__(self) -> SmtpTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.quit()
        except (smtplib.SMTPException, OSError):
            pass  # saying goodbye is a courtesy; the messages are already handed over
        finally:
            connection.close()

    def abort(self) -> None:
        """Break the connection from another thread: a send waiting on the server fails at once
        (its outcome unknown, so its retry may be a duplicate; see DeliveryError)."""
        connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed: nothing to break
                sock.shutdown(socket.SHUT_RDWR)

    def send(
        self, message: OutgoingMessage, recipients: Sequence[str]
    ) -> dict[str, tuple[int, bytes]]:
        """Hand the message over for ``recipients``; returns the refused ones (if some were).

        Addresses are given and returned as stored; on the wire their domains are
        IDNA-encoded. A recipient whose local part is not ASCII is refused here (553) when the
        server does not offer SMTPUTF8. Raises DeliveryError when nobody accepted the message.
        """
        if not recipients:
            raise ValueError("send needs at least one recipient")
        # Raises InvalidAddress (a ValueError) for an address no message can be built for.
        wire = {smtp_address(address): address for address in recipients}
        with self._smtp_errors(wire):
            refused = self._transfer(message, wire)
        return {wire.get(address, address): answer for address, answer in refused.items()}

    def smtputf8(self) -> bool:
        """Whether the server takes local parts that are not ASCII (connects if need be)."""
        with self._smtp_errors():
            if self._connection is None:
                self._connection = self._connect()
                self._fresh = True
            return self._connection.has_extn("smtputf8")

    @contextmanager
    def _smtp_errors(self, wire: dict[str, str] | None = None) -> Iterator[None]:
        """Every way a send can go wrong, as a DeliveryError; the connection is dropped."""
        try:
            yield
        except DeliveryError:
            self._discard()
            raise
        except smtplib.SMTPRecipientsRefused as error:
            self._discard()
            refused = {
                (wire or {}).get(address, address): answer
                for address, answer in error.recipients.items()
            }
            raise self._all_recipients_refused(refused) from error
        except smtplib.SMTPSenderRefused as error:
            self._discard()
            # Refusing the sender (an unverified address, a policy) is not about this
            # message's recipients: every message would get the same answer until it is fixed.
            raise self._error(
                f"SMTP server {self._address} refused the sender {error.sender!r}: "
                f"{reply_text(error.smtp_code, error.smtp_error)}",
                permanent=False,
                smtp_code=error.smtp_code,
            ) from error
        except smtplib.SMTPDataError as error:
            self._discard()
            # The server judged this message: a 5xx means it will never take it as it is.
            raise self._error(
                reply_text(error.smtp_code, error.smtp_error),
                permanent=is_permanent(error.smtp_code),
                smtp_code=error.smtp_code,
            ) from error
        except smtplib.SMTPResponseException as error:
            self._discard()
            raise self._error(
                f"SMTP server {self._address} answered "
                f"{reply_text(error.smtp_code, error.smtp_error)}",
                permanent=False,
                smtp_code=error.smtp_code,
            ) from error
        except smtplib.SMTPServerDisconnected as error:
            self._discard()
            if any(isinstance(link, TimeoutError) for link in _causes(error)):
                # smtplib reports a read timeout as a disconnect; say what really happened.
                raise self._timed_out() from error
            raise self._error(
                f"SMTP server {self._address} closed the connection ({error}); "
                "the message may or may not have been delivered",
                permanent=False,
                maybe_delivered=True,
            ) from error
        except smtplib.SMTPException as error:
            self._discard()
            raise self._error(
                f"SMTP error with {self._address}: {error}", permanent=False
            ) from error
        except ssl.SSLError as error:
            self._discard()
            raise self._error(
                f"TLS with SMTP server {self._address} failed: {error}", permanent=False
            ) from error
        except TimeoutError as error:
            self._discard()
            raise self._timed_out() from error
        except OSError as error:
            self._discard()
            raise self._error(
                f"cannot talk to SMTP server {self._address}: {error}", permanent=False
            ) from error

    @property
    def _address(self) -> str:
        return f"{self._host}:{self._port}"

    def _transfer(
        self, message: OutgoingMessage, wire: dict[str, str]
    ) -> dict[str, tuple[int, bytes]]:
        reused = self._connection is not None and not self._fresh
        if self._connection is None:
            self._connection = self._connect()
        self._fresh = False
        try:
            return _sendmail(self._connection, message, list(wire))
        except _ClosedBeforeMail:
            if not reused:
                raise
        except smtplib.SMTPSenderRefused as error:
            # 421 to MAIL FROM: the server is closing the channel (an idle timeout it
            # announces instead of just hanging up); it has none of this message either.
            if not reused or error.smtp_code != 421:
                raise
        # The server dropped the connection since the last message (an idle timeout, one
        # message per connection): it has none of this message, so a new connection is
        # safe. Finding that out here instead of with a NOOP first saves a round trip per email.
        self._discard()
        self._connection = self._connect()
        return _sendmail(self._connection, message, list(wire))

    def _connect(self) -> smtplib.SMTP:
        connection: smtplib.SMTP
        if self._security == "ssl":
            connection = _SMTP_SSL(
                self._host,
                self._port,
                local_hostname=self._local_hostname,
                timeout=self._timeout,
                context=ssl.create_default_context(),
            )
        else:
            connection = _SMTP(
                self._host, self._port, local_hostname=self._local_hostname, timeout=self._timeout
            )
        try:
            connection.ehlo_or_helo_if_needed()
            if self._security == "starttls":
                if not connection.has_extn("starttls"):
                    raise DeliveryError(
                        f"SMTP server {self._address} does not offer STARTTLS and smtp security "
                        "is 'starttls'; not sending anything unencrypted",
                        permanent=False,
                    )
                connection.starttls(context=ssl.create_default_context())
                connection.ehlo()
            if self._username is not None and self._password is not None:
                self._login(connection, self._username, self._password)
        except BaseException:
            connection.close()
            raise
        log.debug("smtp.connected", host=self._host, port=self._port, security=self._security)
        return connection

    def _login(self, connection: smtplib.SMTP, username: str, password: Secret) -> None:
        # Belt and braces: whatever happened above, credentials only travel in clear when the
        # operator explicitly chose security "none".
        if self._security != "none" and not isinstance(connection.sock, ssl.SSLSocket):
            raise DeliveryError(
                f"refusing to log in to SMTP server {self._address} without TLS",
                permanent=False,
            )
        if not connection.has_extn("auth"):
            raise DeliveryError(
                f"SMTP server {self._address} does not offer AUTH, but an SMTP username is set",
                permanent=False,
            )
        connection.login(username, password.reveal())

    def _all_recipients_refused(self, refused: dict[str, tuple[int, bytes]]) -> DeliveryError:
        answers = "; ".join(
            f"{address}: {reply_text(code, text)}" for address, (code, text) in refused.items()
        )
        codes = [code for code, _ in refused.values()]
        # If any refusal is temporary, a retry may still reach that recipient.
        temporary = [code for code in codes if not is_permanent(code)]
        return DeliveryError(
            self._redacted(f"all recipients refused: {answers}"),
            permanent=not temporary,
            smtp_code=(temporary or codes)[0] if codes else None,
            refused=refused,
        )

    def _timed_out(self) -> DeliveryError:
        return self._error(
            f"SMTP server {self._address} did not answer within {self._timeout:g}s; "
            "the message may or may not have been delivered",
            permanent=False,
            maybe_delivered=True,
        )

    def _error(
        self,
        message: str,
        *,
        permanent: bool,
        smtp_code: int | None = None,
        maybe_delivered: bool = False,
    ) -> DeliveryError:
        return DeliveryError(
            self._redacted(message),
            permanent=permanent,
            smtp_code=smtp_code,
            maybe_delivered=maybe_delivered,
        )

    def _redacted(self, text: str) -> str:
        # Servers are not supposed to echo credentials back, but an error message is logged.
        if self._password is not None and self._password.reveal():
            text = text.replace(self._password.reveal(), "***")
        return text

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _sendmail(
    connection: smtplib.SMTP, message: OutgoingMessage, recipients: list[str]
) -> dict[str, tuple[int, bytes]]:
    """sendmail, after refusing here the recipients a server without SMTPUTF8 cannot take.

    The message goes 7-bit clean to a server that did not offer 8BITMIME (RFC 6152).
    """
    refused: dict[str, tuple[int, bytes]] = {}
    if not connection.has_extn("smtputf8"):
        # Checked here, not left to sendmail: on a HELO-only server it would drop the options
        # and fail encoding the address instead, for every recipient at once.
        if needs_smtputf8(message.envelope_from):
            raise smtplib.SMTPNotSupportedError(
                f"the sender {message.envelope_from!r} is not ASCII and the server does not "
                "offer SMTPUTF8"
            )
        refused = {address: NO_SMTPUTF8 for address in recipients if needs_smtputf8(address)}
        recipients = [address for address in recipients if address not in refused]
        if not recipients:
            raise smtplib.SMTPRecipientsRefused(refused)
        if message.international:
            raise smtplib.SMTPNotSupportedError(
                "the message is addressed to a local part that is not ASCII and the server "
                "does not offer SMTPUTF8"
            )
    eight_bit = connection.has_extn("8bitmime")
    data = message.data(eight_bit=eight_bit)
    if message.international:
        options = ["SMTPUTF8", "BODY=8BITMIME"]
    else:
        options = ["BODY=8BITMIME"] if eight_bit and not data.isascii() else []
    accepted_refused = connection.sendmail(
        message.envelope_from, recipients, data, mail_options=options
    )
    return {**refused, **accepted_refused}


# A permanent answer of our own (RFC 6531's code) for a recipient the server cannot address.
NO_SMTPUTF8 = (
    553,
    b"5.6.7 not sent: the local part is not ASCII and the server does not offer SMTPUTF8",
)


class _ClosedBeforeMail(smtplib.SMTPServerDisconnected):
    """The connection was gone when MAIL FROM was sent: the server has none of the message."""


class _SMTP(smtplib.SMTP):
    """Tells a dead connection at MAIL FROM (nothing sent yet) from one lost later (maybe
    delivered): only the first may be retried on a new connection without a duplicate."""

    def mail(self, sender: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        try:
            return super().mail(sender, options)
        except smtplib.SMTPServerDisconnected as error:
            raise _ClosedBeforeMail(str(error)) from error


class _SMTP_SSL(_SMTP, smtplib.SMTP_SSL):  # noqa: N801
    pass


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The exception and what led to it (_ClosedBeforeMail wraps smtplib's own)."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def is_permanent(code: int) -> bool:
    return 500 <= code <= 599


def reply_text(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return f"{code} {one_line(text)}"


def smtp_transport(settings: Settings) -> SmtpTransport:
    """The transport the settings describe (not connected yet)."""
    return SmtpTransport(
        host=settings.smtp_host,
        port=settings.smtp_port,
        security=settings.smtp_security,
        username=settings.smtp_username,
        password=settings.smtp_password,
        timeout=settings.smtp_timeout,
    )

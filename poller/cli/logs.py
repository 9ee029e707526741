"""Logging setup: one stream on stderr, JSON off a terminal, readable console on one.

Every module logs with ``structlog.get_logger(__name__)`` and one event name per thing that
happens (``cycle.started``, ``org.alerted``, ``email.sent``, ``api.error``, ...). The standard
library's loggers (APScheduler, SQLAlchemy, Alembic, urllib3) reach the same handler through
structlog's ``ProcessorFormatter``: every line, ours or a library's, is rendered the same way
and passes the secret redaction.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, Processor

# -qq, -q, default, -v, -vv: poller's own level, then the libraries' (-vv: their debug too).
_LEVELS = {
    -2: (logging.ERROR, logging.ERROR),
    -1: (logging.WARNING, logging.WARNING),
    0: (logging.INFO, logging.WARNING),
    1: (logging.DEBUG, logging.WARNING),
    2: (logging.DEBUG, logging.DEBUG),
}

# The handler configure_logging installed on the root logger, replaced when it runs again.
_installed: logging.Handler | None = None


class _RedactSecrets:
    """Last line of defence: no secret value leaves the process through a log line.

    Nothing is supposed to log a credential in the first place; this catches the case where
    one slips into an exception message from a library (a URL, a server's echo).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # Very short strings would redact ordinary words; real credentials are long.
        self._secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def __call__(self, _logger: Any, _name: str, event: EventDict) -> EventDict:
        if not self._secrets:
            return event
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.redact(value)
            elif isinstance(value, BaseException):
                event[key] = self.redact(repr(value))
        return event

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def configure_logging(
    *,
    log_format: str | None,
    verbosity: int = 0,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the root logger; safe to call again (tests, CLI re-entry)."""
    global _installed
    stream = stream or sys.stderr
    if log_format is None:
        log_format = "console" if stream.isatty() else "json"
    level, library_level = _LEVELS[max(-2, min(2, verbosity))]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    ours = logging.getLogger("poller")
    ours.setLevel(level)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _RedactSecrets(secrets),
    ]
    structlog.configure(
        processors=[*shared, ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        context_class=dict,
        # Every event of ours goes through one stdlib logger, whatever module logs it (the
        # module name is not in our events, and a __main__ module must not get another level).
        logger_factory=lambda *_args: ours,
        # Loggers are module globals created before configuration; caching would pin them
        # to whatever configuration was active at their first use.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        ProcessorFormatter(
            # A library's record: its logger's name, then what our own events get.
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(library_level)
    _installed = handler

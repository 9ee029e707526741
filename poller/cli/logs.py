"""Logging setup: structlog events to stderr, JSON off a terminal, readable console on one.

Every module logs with ``structlog.get_logger(__name__)`` and one event name per thing that
happens (``cycle.started``, ``org.alerted``, ``email.sent``, ``api.error``, ...).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog

_LEVELS = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class _RedactSecrets:
    """Last line of defence: no secret value leaves the process through a log line.

    Nothing is supposed to log a credential in the first place; this catches the case where
    one slips into an exception message from a library (a URL, a server's echo).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # Very short strings would redact ordinary words; real credentials are long.
        self._secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
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
    """Configure structlog once per process; safe to call again (tests, CLI re-entry)."""
    stream = stream or sys.stderr
    if log_format is None:
        log_format = "console" if stream.isatty() else "json"
    level = _LEVELS[max(-2, min(1, verbosity))]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _RedactSecrets(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        context_class=dict,
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        # Loggers are module globals created before configuration; caching would pin them
        # to whatever configuration was active at their first use.
        cache_logger_on_first_use=False,
    )

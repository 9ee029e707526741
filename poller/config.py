"""Settings from command-line flags, environment variables, a TOML file and defaults.

Precedence: flags > environment (POLLER_*) > TOML file (--config / POLLER_CONFIG) > defaults.
Every problem is reported as a ConfigError whose message names the setting; secrets are
wrapped in Secret so they never show up in a repr, a log line or an error message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal


class ConfigError(Exception):
    """Bad configuration; the message is one line naming the setting (exit status 2)."""


class Secret:
    """A credential that never reveals itself in repr/str/format."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    api_url: str = "https://api.cekura.ai"
    api_keys: tuple[Secret, ...] = ()
    api_token: Secret | None = None
    # Permit sending credentials over plain http to a non-loopback host (never by default).
    allow_insecure_http: bool = False
    api_connect_timeout: float = 5.0
    api_read_timeout: float = 30.0
    api_retries: int = 4
    concurrency: int = 8
    database_url: str = "sqlite:///poller.db"
    smtp_host: str = "localhost"
    smtp_port: int = 587
    smtp_security: str = "starttls"  # none | starttls | ssl
    smtp_username: str | None = None
    smtp_password: Secret | None = None
    smtp_timeout: float = 30.0
    mail_from: str | None = None
    billing_url: str = "https://dashboard.cekura.ai/settings/org/billing"
    interval: float = 300.0
    jitter: float = 10.0
    rearm_margin: Decimal = Decimal("0")
    delivery_lease: float = 300.0
    log_format: str | None = None  # json | console; None = console on a terminal, json otherwise
    config_path: str | None = field(default=None, compare=False)

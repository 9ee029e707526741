"""Settings from command-line flags, environment variables, a TOML file and defaults.

Precedence: flags > environment (POLLER_*) > TOML file (--config / POLLER_CONFIG) > defaults.
Every problem is reported as a ConfigError whose message names the setting; secrets are
wrapped in Secret so they never show up in a repr, a log line or an error message.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from poller.engine.addresses import InvalidAddress, checked_billing_url, checked_sender
from poller.engine.sharding import Shard, parse_shard


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
    # Seconds one API request attempt may take in all, however steadily its answer trickles in.
    api_request_timeout: float = 60.0
    api_retries: int = 4
    concurrency: int = 8
    # Client-side cap on API requests per second across all workers; 0 = no cap.
    max_requests_per_second: float = 100.0
    # This replica's share of the organizations ("K/N"); None = all of them.
    shard: Shard | None = None
    database_url: str = "sqlite:///poller.db"
    smtp_host: str = "localhost"
    smtp_port: int = 587
    smtp_security: str = "starttls"  # none | starttls | ssl
    smtp_username: str | None = None
    smtp_password: Secret | None = None
    smtp_timeout: float = 30.0
    # SMTP connections delivering in parallel, each reused for a batch of messages.
    smtp_connections: int = 2
    mail_from: str | None = None
    billing_url: str = "https://dashboard.cekura.ai/settings/org/billing"
    interval: float = 300.0
    jitter: float = 10.0
    # fixed: every organization every interval. adaptive: each when its risk says so, from a
    # work queue in the database that any number of replicas share (docs/operations.md).
    schedule: str = "fixed"
    min_read_interval: float = 30.0
    max_read_interval: float = 3600.0
    burn_safety: float = 3.0
    # Seconds a replica holds the reads it claimed; after that another replica takes them.
    read_lease: float = 120.0
    # Seconds a cycle's fetch may take: a listing still going after this fails (nothing written).
    cycle_timeout: float = 3600.0
    rearm_margin: Decimal = Decimal("0")
    delivery_lease: float = 300.0
    # Forecasts and the optional notices beside the main alert (poller.engine.forecast, .notices).
    history_retention_days: int = 30
    advice_days: Decimal = Decimal("3")
    runway_days: Decimal | None = None  # None: no runway alert
    remind_every: float | None = None  # seconds; None: no reminders
    recovery_notice: bool = False
    log_format: str | None = None  # json | console; None = console on a terminal, json otherwise
    metrics_port: int | None = None  # None: no metrics/health HTTP endpoint
    # Local only: /metrics and /healthz have no authentication. The image sets 0.0.0.0.
    metrics_host: str = "127.0.0.1"
    config_path: str | None = field(default=None, compare=False)
    # Problems worth telling the operator that do not stop the poller (e.g. file permissions).
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def require_credentials(self) -> None:
        """Commands that talk to the Cekura API call this; simulate and db upgrade need none."""
        if not self.api_keys and self.api_token is None:
            raise ConfigError(
                "no API credential: set POLLER_API_KEYS (or POLLER_API_KEY) or POLLER_API_TOKEN"
            )

    def require_mail_from(self) -> None:
        if not self.mail_from:
            raise ConfigError("POLLER_MAIL_FROM is required to send email")

    def secret_values(self) -> list[str]:
        """Every credential in clear, for the log redaction: keys, token, SMTP password and a
        password inside the database URL (validated by load_settings already)."""
        values = [key.reveal() for key in self.api_keys]
        values += [s.reveal() for s in (self.api_token, self.smtp_password) if s]
        database_password = make_url(self.database_url).password
        if database_password:
            values.append(str(database_password))
        return values

    def __repr__(self) -> str:
        # The generated repr would print a PostgreSQL password embedded in database_url.
        shown = (
            f"{f.name}={_database_url_for_display(self.database_url)!r}"
            if f.name == "database_url"
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"Settings({', '.join(shown)})"


class _BadValue(Exception):
    """A parser's or validator's complaint; load_settings prefixes it with the setting's name."""


# --- parsers: raw value (str from env/flags, TOML types, or already typed) -> typed value ---


def _show(raw: object) -> str:
    """A non-secret value quoted for an error message: one line, bounded length."""
    text = repr(raw) if isinstance(raw, str) else str(raw)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(raw: object) -> str:
    if not isinstance(raw, str):
        raise _BadValue(f"{_show(raw)} is not a string")
    if "\r" in raw or "\n" in raw:
        raise _BadValue("must be a single line")
    return raw.strip()


def _required_text(raw: object) -> str:
    text = _text(raw)
    if not text:
        raise _BadValue("must not be empty")
    return text


def _optional_text(raw: object) -> str | None:
    return _text(raw) or None


def _choice(*options: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        text = _text(raw).lower()
        if text not in options:
            raise _BadValue(f"{_show(raw)} is not one of {', '.join(options)}")
        return text

    return parse


def _optional_choice(*options: str) -> Callable[[object], str | None]:
    parse_choice = _choice(*options)
    return lambda raw: parse_choice(raw) if _text(raw) else None


_TRUE_WORDS = {"true", "1", "yes"}
_FALSE_WORDS = {"false", "0", "no"}


def _boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return raw.strip().lower() in _TRUE_WORDS
    raise _BadValue(f"{_show(raw)} is not a boolean (use true/false, yes/no or 1/0)")


_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
# More digits than any setting's range allows, and far fewer than int() accepts (4300).
_MAX_DIGITS = 100


def _whole_number(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and _WHOLE_NUMBER.fullmatch(raw.strip()):
        if len(raw.strip()) > _MAX_DIGITS:  # int() refuses these with a ValueError of its own
            raise _BadValue(f"{_show(raw)} is far too large")
        return int(raw.strip())
    # TOML floats arrive as Decimal (parse_float=Decimal); 8.0 is still a whole number.
    if isinstance(raw, Decimal | float) and math.isfinite(raw) and raw == int(raw):
        return int(raw)
    raise _BadValue(f"{_show(raw)} is not a whole number")


def _number(raw: object) -> float:
    """Durations in seconds: binary floats are fine here, unlike money."""
    if isinstance(raw, int | float | Decimal) and not isinstance(raw, bool):
        try:
            value = float(raw)
        except OverflowError:  # an int beyond any float (TOML integers have no limit)
            value = math.inf
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            raise _BadValue(f"{_show(raw)} is not a number") from None
    else:
        raise _BadValue(f"{_show(raw)} is not a number")
    if not math.isfinite(value):
        raise _BadValue(f"{_show(raw)} is not a finite number")
    return value


def _decimal(raw: object) -> Decimal:
    """Money: parsed from the text the user wrote, never through a binary float."""
    if isinstance(raw, Decimal):
        value = raw
    elif isinstance(raw, int) and not isinstance(raw, bool):
        value = Decimal(raw)
    elif isinstance(raw, str):
        try:
            value = Decimal(raw.strip())
        except InvalidOperation:
            raise _BadValue(f"{_show(raw)} is not a decimal number") from None
    else:
        raise _BadValue(f"{_show(raw)} is not a decimal number (write it as a string, e.g. '50')")
    if not value.is_finite():
        raise _BadValue(f"{_show(raw)} is not a finite decimal number")
    return value


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_OFF_WORDS = {"", "off", "none", "0"}


def _optional_duration(raw: object) -> float | None:
    """Seconds, or a number with a unit (45s, 30m, 12h, 1d); empty, 0 or off = not set."""
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _OFF_WORDS:
            return None
        match = _DURATION.fullmatch(text)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    try:
        seconds = _number(raw)
    except _BadValue:
        raise _BadValue(
            f"{_show(raw)} is not a duration (seconds, or e.g. 30m, 12h, 1d; off to disable)"
        ) from None
    return seconds or None


def _optional_decimal(raw: object) -> Decimal | None:
    if isinstance(raw, str) and raw.strip().lower() in _OFF_WORDS:
        return None
    return _decimal(raw) or None


def _shard(raw: object) -> Shard | None:
    if isinstance(raw, Shard):
        return raw
    text = _text(raw)
    if not text:
        return None
    try:
        return parse_shard(text)
    except ValueError as problem:
        raise _BadValue(str(problem)) from None


def _one_secret(raw: object) -> Secret | None:
    """Never echoes the value: whatever the user typed here may be a real credential."""
    if isinstance(raw, Secret):
        raw = raw.reveal()
    if not isinstance(raw, str):
        raise _BadValue("must be a string")
    if "\r" in raw or "\n" in raw:
        raise _BadValue("must be a single line")
    return Secret(raw.strip()) if raw.strip() else None


def _secret_list(raw: object) -> tuple[Secret, ...]:
    """A list, or a comma-separated string; blanks dropped, duplicates removed, order kept."""
    if isinstance(raw, str):
        items: list[object] = list(raw.split(","))
    elif isinstance(raw, list | tuple):
        items = list(raw)
    else:
        items = [raw]
    secrets = (_one_secret(item) for item in items)
    return tuple(dict.fromkeys(secret for secret in secrets if secret is not None))


# --- validators: typed value -> complaint or None ---


Check = Callable[[Any], str | None]


def _between(low: float | Decimal, high: float | Decimal, unit: str = "") -> Check:
    """Every number has a range: beyond it a value crashes or hangs something later (a socket
    timeout past time_t, a timedelta past year 9999, 10^8 threads) or makes no sense."""

    def check(value: float | Decimal) -> str | None:
        if low <= value <= high:
            return None
        return f"must be between {low} and {high}{unit} (got {_show(value)})"

    return check


def _zero_or(check: Check) -> Check:
    """0 (meaning "off"), or what ``check`` allows."""

    def zero_or(value: float) -> str | None:
        problem = None if value == 0 else check(value)
        return None if problem is None else f"must be 0 or {problem.removeprefix('must be ')}"

    return zero_or


def _unset_or(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"{value} is not a port number (1..65535)"


def _optional_whole_number(raw: object) -> int | None:
    return None if isinstance(raw, str) and not raw.strip() else _whole_number(raw)


def _optional_port(value: int | None) -> str | None:
    return None if value is None else _port(value)


def _http_url(value: str) -> str | None:
    # Echo only scheme and host: userinfo, path and query may carry a credential.
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "not a valid URL (malformed host or port)"
    if parts.scheme not in ("http", "https"):
        scheme = f" (scheme {parts.scheme!r})" if parts.scheme.isalnum() else ""
        return f"must be an http:// or https:// URL{scheme}"
    if not parts.hostname:
        return "must be an http(s) URL with a host, e.g. https://example.com"
    return None


def _database_url(value: str) -> str | None:
    # SQLAlchemy's own messages may quote the URL, password included, so they are not passed on.
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        return "not a database URL (e.g. sqlite:///poller.db or postgresql+psycopg2://...)"
    try:
        dialect = url.get_dialect()
    except ArgumentError:
        return f"unknown database kind {url.drivername!r} (use sqlite:// or postgresql+psycopg2://)"
    try:
        # The driver's own reading of the URL's query (e.g. sqlite's ?timeout=): done here, a
        # bad value would otherwise surface as a traceback when the database is first opened.
        dialect().create_connect_args(url)
    except (ArgumentError, ValueError, TypeError):
        names = ", ".join(sorted(url.query)) or "the port"
        return f"a value in the URL ({names}) is not valid for {url.get_backend_name()}"
    if url.get_backend_name() == "sqlite" and "timeout" in url.query:
        timeout = float(str(url.query["timeout"]))
        if not 0 <= timeout <= 3600:
            return f"?timeout= must be between 0 and 3600 seconds (got {_show(timeout)})"
    return None


def _sender(value: str | None) -> str | None:
    # The message builder's own check: what passes here is what it can put in From.
    if value is None:
        return None
    try:
        checked_sender(value)
    except InvalidAddress as problem:
        return str(problem)
    return None


def _billing_url(value: str) -> str | None:
    try:
        checked_billing_url(value)
    except ValueError as problem:
        return str(problem)
    return None


def _database_url_for_display(value: str) -> str:
    try:
        return make_url(value).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "***"


# --- the table of settings ---


@dataclass(frozen=True)
class _Spec:
    name: str
    parse: Callable[[object], Any]
    check: Callable[[Any], str | None] = lambda value: None
    secret: bool = False


_DAY = 86400
_WEEK = 7 * _DAY
# Credits: far beyond any balance, and exact within Decimal's default 28 digits.
_MAX_AMOUNT = Decimal(10) ** 15

_SPECS: dict[str, _Spec] = {
    spec.name: spec
    for spec in (
        _Spec("api_url", _required_text, _http_url),
        _Spec("api_keys", _secret_list, secret=True),
        _Spec("api_token", _one_secret, secret=True),
        _Spec("allow_insecure_http", _boolean),
        _Spec("api_connect_timeout", _number, _between(0.1, 300, " seconds")),
        _Spec("api_read_timeout", _number, _between(0.1, 3600, " seconds")),
        _Spec("api_request_timeout", _number, _between(0.1, 3600, " seconds")),
        _Spec("api_retries", _whole_number, _between(0, 20)),
        _Spec("concurrency", _whole_number, _between(1, 256)),
        _Spec("max_requests_per_second", _number, _zero_or(_between(0.01, 100_000))),
        _Spec("shard", _shard),
        _Spec("database_url", _required_text, _database_url),
        _Spec("smtp_host", _required_text),
        _Spec("smtp_port", _whole_number, _port),
        _Spec("smtp_security", _choice("none", "starttls", "ssl")),
        _Spec("smtp_username", _optional_text),
        _Spec("smtp_password", _one_secret, secret=True),
        _Spec("smtp_timeout", _number, _between(0.1, 3600, " seconds")),
        _Spec("smtp_connections", _whole_number, _between(1, 64)),
        _Spec("mail_from", _optional_text, _sender),
        _Spec("billing_url", _required_text, _billing_url),
        _Spec("interval", _number, _between(0.1, _WEEK, " seconds")),
        _Spec("jitter", _number, _between(0, _DAY, " seconds")),
        _Spec("schedule", _choice("fixed", "adaptive")),
        _Spec("min_read_interval", _number, _between(1, _DAY, " seconds")),
        _Spec("max_read_interval", _number, _between(1, _WEEK, " seconds")),
        _Spec("burn_safety", _number, _between(1, 1000)),
        _Spec("read_lease", _number, _between(5, _DAY, " seconds")),
        _Spec("cycle_timeout", _number, _between(1, _DAY, " seconds")),
        _Spec("rearm_margin", _decimal, _between(0, _MAX_AMOUNT)),
        _Spec("delivery_lease", _number, _between(1, _DAY, " seconds")),
        _Spec("history_retention_days", _whole_number, _between(7, 3650)),
        _Spec("advice_days", _decimal, _between(Decimal("0.1"), 365)),
        _Spec("runway_days", _optional_decimal, _unset_or(_between(Decimal("0.1"), 365))),
        _Spec("remind_every", _optional_duration, _unset_or(_between(60, 365 * _DAY, " seconds"))),
        _Spec("recovery_notice", _boolean),
        _Spec("log_format", _optional_choice("json", "console")),
        _Spec("metrics_port", _optional_whole_number, _optional_port),
        _Spec("metrics_host", _required_text),
    )
}
# A single key, accepted next to api_keys in every source and merged into it.
_SINGLE_KEY = "api_key"
_SECRET_KEYS = frozenset({_SINGLE_KEY} | {spec.name for spec in _SPECS.values() if spec.secret})
_KNOWN_NAMES = (*_SPECS, _SINGLE_KEY)
# Secrets may instead be read from a file (Docker secrets, systemd credentials): api_token_file
# in TOML, POLLER_API_TOKEN_FILE in the environment. The database URL may hold a password.
_FILE_SUFFIX = "_file"
_FROM_FILE = {
    name + _FILE_SUFFIX: name
    for name in ("api_keys", _SINGLE_KEY, "api_token", "smtp_password", "database_url")
}
_ACCEPTED_NAMES = (*_KNOWN_NAMES, *_FROM_FILE)

_ENV_PREFIX = "POLLER_"
# POLLER_* variables that are read elsewhere and are not settings.
_ENV_NOT_SETTINGS = frozenset({"POLLER_CONFIG", "POLLER_ENV_FILE", "POLLER_TEST_DATABASE_URL"})

# name -> (raw value, how the user wrote the setting, for messages)
_Layer = dict[str, tuple[object, str]]


def load_settings(
    *,
    flags: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """Build validated Settings; `flags` maps field names to values (None = flag not given)."""
    env = os.environ if env is None else env
    path_source = "--config"
    if config_path is None and env.get("POLLER_CONFIG", "").strip():
        config_path, path_source = env["POLLER_CONFIG"].strip(), "POLLER_CONFIG"
    file_layer: _Layer = {}
    warnings: tuple[str, ...] = ()
    if config_path is not None:
        file_layer, warnings = _file_layer(config_path, path_source)
    env_layer, env_warnings = _env_layer(env)
    warnings += env_warnings
    layers = [
        _merge_single_key(layer)
        for layer in (_read_files(file_layer), _read_files(env_layer), _flag_layer(flags))
    ]

    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for spec in _SPECS.values():
        # Later layers win: flags > env > file.
        given = [layer[spec.name] for layer in layers if spec.name in layer]
        if not given:
            continue
        raw, label = given[-1]
        values[spec.name] = _parse(spec, raw, label)
        labels[spec.name] = label

    settings = Settings(**values, config_path=config_path, warnings=warnings)
    _refuse_credentials_over_plain_http(settings, labels.get("api_url", "api_url"))
    _require_both_smtp_credentials(settings, labels)
    _require_ordered_read_intervals(settings, labels)
    return settings


def _require_ordered_read_intervals(settings: Settings, labels: Mapping[str, str]) -> None:
    if settings.min_read_interval <= settings.max_read_interval:
        return
    raise ConfigError(
        f"{labels.get('min_read_interval', 'min_read_interval')}: "
        f"{settings.min_read_interval:g} seconds is more than max_read_interval "
        f"({settings.max_read_interval:g}); the soonest read cannot come after the latest"
    )


def _require_both_smtp_credentials(settings: Settings, labels: Mapping[str, str]) -> None:
    # Half a login cannot be used: say so now rather than at the first email.
    if (settings.smtp_username is None) == (settings.smtp_password is None):
        return
    given, missing = ("smtp_username", "smtp_password")
    if settings.smtp_username is None:
        given, missing = missing, given
    raise ConfigError(
        f"{labels.get(given, given)}: is set but {missing} is not; set both (POLLER_"
        f"{missing.upper()}), or neither to send without logging in"
    )


def _parse(spec: _Spec, raw: object, label: str) -> Any:
    try:
        value = spec.parse(raw)
    except _BadValue as problem:
        raise ConfigError(f"{label}: {problem}") from None
    problem_text = spec.check(value)
    if problem_text is not None:
        raise ConfigError(f"{label}: {problem_text}")
    return value


def _refuse_credentials_over_plain_http(settings: Settings, api_url_label: str) -> None:
    parts = urlsplit(settings.api_url)
    if parts.scheme == "https" or settings.allow_insecure_http or is_loopback(parts.hostname):
        return
    raise ConfigError(
        f"{api_url_label}: refusing to send the API credential over plain http to "
        f"{parts.hostname}; use https, or set allow_insecure_http = true "
        "(POLLER_ALLOW_INSECURE_HTTP=true) if you really mean it"
    )


def is_loopback(host: str | None) -> bool:
    """``localhost`` or a loopback IP: where plain http cannot leave the machine."""
    if host is None:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unknown(name: str, candidates: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _file_layer(path: str, path_source: str) -> tuple[_Layer, tuple[str, ...]]:
    where = f"config file {path}" + (f" (from {path_source})" if path_source != "--config" else "")
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file, parse_float=Decimal)
            mode = os.fstat(file.fileno()).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{where}: not found") from None
    except OSError as error:
        raise ConfigError(f"{where}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"{where}: invalid TOML: {reason}") from None
    except ValueError:  # tomllib passes on int()'s refusal of an integer of 4,300+ digits
        raise ConfigError(f"{where}: invalid TOML: a number is far too large") from None

    for key, value in data.items():
        if key not in _ACCEPTED_NAMES:
            is_table = isinstance(value, dict)
            hint = " (settings are flat keys; tables are not used)" if is_table else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}{_unknown(key, _ACCEPTED_NAMES) or hint}"
            )
    warnings: tuple[str, ...] = ()
    holds_secret = any(data.get(key) not in (None, "", []) for key in _SECRET_KEYS)
    if holds_secret and mode & 0o077:
        warnings = (
            f"config file {path} contains secrets and is readable by other users; chmod 600 it",
        )
    return {key: (value, f"{path}: {key}") for key, value in data.items()}, warnings


def _env_layer(env: Mapping[str, str]) -> tuple[_Layer, tuple[str, ...]]:
    env_names = tuple(_ENV_PREFIX + name.upper() for name in _ACCEPTED_NAMES)
    layer: _Layer = {}
    warnings: list[str] = []
    for variable, value in sorted(env.items()):
        if not variable.startswith(_ENV_PREFIX) or variable in _ENV_NOT_SETTINGS:
            continue
        name = variable.removeprefix(_ENV_PREFIX).lower()
        if name not in _ACCEPTED_NAMES or variable != _ENV_PREFIX + name.upper():
            # A warning, not an error: Kubernetes injects POLLER_SERVICE_HOST, POLLER_PORT, ...
            # for a Service named poller. The hint still catches a typo; the value is not shown.
            hint = _unknown(variable, env_names)
            warnings.append(f"{variable} is not a poller setting, ignored{hint}")
            continue
        if value.strip():  # empty counts as unset
            layer[name] = (value, variable)
    return layer, tuple(warnings)


def _read_files(layer: _Layer) -> _Layer:
    """Replaces each `<secret>_file` entry by the secret read from that file."""
    read = {name: entry for name, entry in layer.items() if name not in _FROM_FILE}
    for file_name, name in _FROM_FILE.items():
        if file_name not in layer:
            continue
        path, label = layer[file_name]
        if name in layer:
            raise ConfigError(f"{layer[name][1]} and {label} are both set; set only one of them")
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"{label}: must be the path of a file")
        path = path.strip()
        try:
            with open(path, encoding="utf-8", newline="") as file:  # keeps a \r\n whole
                text = file.read()
        except OSError as error:
            raise ConfigError(f"{label}: cannot read {path} ({error.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{label}: {path} is not UTF-8 text") from None
        # Only the newline an editor or `echo` adds: anything else is part of the secret.
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
        read[name] = (text, f"{label} ({path})")
    return read


def _flag_layer(flags: Mapping[str, object] | None) -> _Layer:
    layer: _Layer = {}
    for name, value in (flags or {}).items():
        flag = "--" + name.replace("_", "-")
        if name not in _KNOWN_NAMES:
            raise ConfigError(f"{flag} is not a poller setting")
        # click reports an unused `multiple=True` option as an empty tuple.
        if value is None or value == () or value == []:
            continue
        layer[name] = (value, flag)
    return layer


def _merge_single_key(layer: _Layer) -> _Layer:
    """api_key joins api_keys from the same source; a source with no key at all sets nothing."""
    if _SINGLE_KEY not in layer and "api_keys" not in layer:
        return layer
    merged = {name: entry for name, entry in layer.items() if name not in ("api_keys", _SINGLE_KEY)}
    keys: tuple[Secret, ...] = ()
    label = ""
    for name in ("api_keys", _SINGLE_KEY):
        if name in layer:
            raw, label_here = layer[name]
            keys += _parse(_SPECS["api_keys"], raw, label_here)
            label = label or label_here
    if keys:  # duplicates go when load_settings parses the merged tuple as api_keys
        merged["api_keys"] = (keys, label)
    return merged

"""Every number poller accepts is one it can use: out-of-range values are refused up front.

A setting that passed validation used to crash later (a socket timeout past time_t, a
timedelta past year 9999, a rate limiter asked to sleep 1e300 s) or hang (10^8 threads). Now
every numeric setting has a range, and anything outside it is one line naming the setting and
the range, exit 2. The property test feeds arbitrary values, from the environment (strings)
and from a TOML file (integers, floats, strings), and uses every Settings it gets in a real
cycle against the simulator over HTTP, a real SMTP server and SQLite.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from apscheduler.triggers.interval import IntervalTrigger
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.cekura.client import CekuraClient
from poller.config.settings import ConfigError, Settings, load_settings
from poller.devtools.simulator import SimulatedApi, SimulatorServer
from poller.engine.cycle import run_cycle
from poller.engine.delivery import Deliverer
from poller.engine.health import judge
from poller.engine.outlook import outlooks
from poller.store import Store, open_database
from tests.engine_world import ACME, TOKEN, poller_env, run_poller, seed_organizations

NUMERIC = (
    "api_connect_timeout",
    "api_read_timeout",
    "api_retries",
    "concurrency",
    "max_requests_per_second",
    "smtp_port",
    "smtp_timeout",
    "smtp_connections",
    "interval",
    "jitter",
    "rearm_margin",
    "delivery_lease",
    "history_retention_days",
    "advice_days",
    "runway_days",
    "remind_every",
    "metrics_port",
)

# Values that used to pass validation and fail later, or that sit on a range's edge.
AWKWARD = [
    "1e300",
    "1e-300",
    "1e999999999",
    "-1e999999999",
    "99999999999",
    "100000000",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "-0",
    "0",
    "0.0",
    "1",
    "2",
    "7",
    "0.1",
    "0.05",
    "59",
    "60",
    "300",
    "3600",
    "86400",
    "604800",
    "604801",
    "3650",
    "3651",
    "1e15",
    "1000000000000001",
    "9" * 5000,
    "12h",
    "1d",
    "30m",
    "366d",
    "99999999999d",
    "off",
    "",
]
ENV_VALUES = st.one_of(
    st.sampled_from(AWKWARD),
    st.integers(-(10**30), 10**30).map(str),
    st.floats().map(repr),
    st.decimals().map(str),
    st.text(max_size=12),
)


def _toml_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return {math.inf: "inf", -math.inf: "-inf"}.get(value, repr(value))


TOML_VALUES = st.one_of(
    st.sampled_from(AWKWARD).map(json.dumps),  # as strings
    st.sampled_from(AWKWARD).filter(lambda text: text.lstrip("-").isdigit()),  # as integers
    st.integers(-(10**30), 10**30).map(str),
    st.floats().map(_toml_float),
    st.text(max_size=12).map(json.dumps),
)


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    api = SimulatedApi(token=TOKEN)
    seed_organizations(api)
    with SimulatorServer(api) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_database(f"sqlite:///{tmp_path / 'poller.db'}")
    yield opened
    opened.close()


def use(settings: Settings, simulator: SimulatorServer, store: Store) -> None:
    """What the daemon, `poller once`, `status` and `health` do with these settings."""
    # Acme crosses its threshold one way or the other each time: an alert or a re-arm.
    low = simulator.api.balance(ACME) < 1000
    simulator.api.set_balance(ACME, 5000 if low else 500)
    sleeps: list[float] = []
    with CekuraClient(settings, sleep=sleeps.append) as client:
        report = run_cycle(
            settings=settings,
            client=client,
            store=store,
            deliverer=Deliverer(store=store, settings=settings),
        )
    assert report.fatal is None and report.errors == []
    assert all(0 <= seconds <= threading.TIMEOUT_MAX for seconds in sleeps)
    now = datetime.now(UTC)
    outlooks(store, settings, [(ACME, Decimal(500), Decimal(1000), now)])
    trigger = IntervalTrigger(
        seconds=settings.interval, jitter=settings.jitter or None, timezone=UTC
    )
    assert trigger.get_next_fire_time(None, now) is not None
    judge(now, now=now, max_age=2 * settings.interval)
    Deliverer(store=store, settings=settings)
    now + timedelta(seconds=settings.delivery_lease + 4 * settings.smtp_timeout)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.sampled_from(NUMERIC), from_file=st.booleans(), data=st.data())
def test_any_numeric_value_is_refused_in_one_line_or_usable(
    name: str, from_file: bool, data, simulator, store, smtp_server, tmp_path: Path
) -> None:
    raw = data.draw(TOML_VALUES if from_file else ENV_VALUES)
    env = poller_env(simulator.url, str(store.engine.url), smtp_server.port)
    env.pop("POLLER_SMTP_TIMEOUT")  # the defaults, unless this example sets it
    if from_file:
        path = tmp_path / "poller.toml"
        path.write_text(f"{name} = {raw}\n")
        path.chmod(0o600)
        env["POLLER_CONFIG"] = str(path)
    else:
        env[f"POLLER_{name.upper()}"] = raw
    try:
        loaded = load_settings(env=env)
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    use(loaded, simulator, store)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("API_CONNECT_TIMEOUT", "1e300", "must be between 0.1 and 300 seconds (got 1e+300)"),
        ("API_READ_TIMEOUT", "1e300", "must be between 0.1 and 3600 seconds"),
        ("SMTP_TIMEOUT", "1e300", "must be between 0.1 and 3600 seconds"),
        ("DELIVERY_LEASE", "1e300", "must be between 1 and 86400 seconds"),
        ("INTERVAL", "1e300", "must be between 0.1 and 604800 seconds"),
        ("JITTER", "1e300", "must be between 0 and 86400 seconds"),
        ("MAX_REQUESTS_PER_SECOND", "1e-300", "must be 0 or between 0.01 and 100000 (got 1e-300)"),
        ("HISTORY_RETENTION_DAYS", "99999999999", "must be between 7 and 3650"),
        ("REMIND_EVERY", "1e300", "must be between 60 and 31536000 seconds"),
        ("REARM_MARGIN", "1e999999999", "must be between 0 and 1000000000000000"),
        ("CONCURRENCY", "100000000", "must be between 1 and 256 (got 100000000)"),
        ("SMTP_CONNECTIONS", "100000000", "must be between 1 and 64 (got 100000000)"),
        ("API_RETRIES", "9" * 5000, "is far too large"),
        ("INTERVAL", "nan", "is not a finite number"),
        ("ADVICE_DAYS", "inf", "is not a finite decimal number"),
        ("DATABASE_URL", "sqlite:///x.db?timeout=abc", "a value in the URL (timeout) is not"),
        ("DATABASE_URL", "sqlite:///x.db?timeout=1e300", "?timeout= must be between 0 and 3600"),
        ("SMTP_USERNAME", "poller", "is set but smtp_password is not"),
    ],
)
def test_a_value_out_of_range_is_one_line_and_exit_2(
    setting: str, value: str, message: str, simulator, tmp_path: Path
) -> None:
    env = poller_env(simulator.url, f"sqlite:///{tmp_path / 'poller.db'}", 25)
    done = run_poller({**env, f"POLLER_{setting}": value}, "once")
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"poller: error: POLLER_{setting}: ") and message in line, line


def test_an_integer_too_long_for_python_in_a_toml_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "poller.toml"
    path.write_text(f"concurrency = {'9' * 5000}\n")
    with pytest.raises(ConfigError, match="a number is far too large"):
        load_settings(env={}, config_path=str(path))

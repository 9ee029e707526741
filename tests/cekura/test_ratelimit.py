"""The shared request-rate budget: pure tests on a fake clock, then real workers over HTTP."""

from __future__ import annotations

import threading
import time

import pytest
from structlog.testing import capture_logs

from poller.cekura.client import CekuraClient
from poller.cekura.ratelimit import MIN_RATE, RequestRateLimiter
from poller.config.settings import ConfigError, Secret, Settings, load_settings
from poller.devtools.simulator import Fault, SimulatedApi, SimulatorServer

TOKEN = "rate-limit-test-token"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def slots(limiter: RequestRateLimiter, count: int) -> list[float]:
    """When each of ``count`` requests made at once may go (seconds from now)."""
    return [round(limiter.delay(), 6) for _ in range(count)]


# --- the cap ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [0, None])
def test_without_a_cap_nothing_ever_waits(cap: float | None) -> None:
    clock = FakeClock()
    limiter = RequestRateLimiter(cap, clock=clock)
    assert slots(limiter, 1000) == [0.0] * 1000
    assert limiter.rate is None


def test_a_cap_of_ten_spaces_requests_a_tenth_of_a_second_apart() -> None:
    clock = FakeClock()
    limiter = RequestRateLimiter(10, clock=clock)
    assert slots(limiter, 5) == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_a_cap_allows_a_burst_of_a_tenth_of_a_second_then_spaces_the_rest() -> None:
    clock = FakeClock()
    limiter = RequestRateLimiter(100, clock=clock)
    waits = slots(limiter, 12)
    assert waits[:10] == [0.0] * 10
    assert waits[10:] == [0.01, 0.02]


def test_time_spent_idle_is_not_saved_up_beyond_the_burst() -> None:
    clock = FakeClock()
    limiter = RequestRateLimiter(10, clock=clock)
    slots(limiter, 3)
    clock.now += 60
    assert slots(limiter, 3) == [0.0, 0.1, 0.2]


# --- back-pressure on 429 ----------------------------------------------------------------------


def test_a_429_pauses_every_request_until_the_pause_is_over() -> None:
    clock = FakeClock()
    limiter = RequestRateLimiter(100, clock=clock)
    limiter.throttled(2.0)
    clock.now += 0.5
    assert limiter.delay() == pytest.approx(1.5)


def test_after_a_429_the_rate_halves_then_grows_back_by_half_each_calm_second() -> None:
    clock = FakeClock()
    limiter = RequestRateLimiter(100, clock=clock)
    limiter.throttled(1.0)
    assert limiter.rate == 50
    clock.now += 1.0  # the pause is over
    limiter.delay()
    assert limiter.rate == 50
    rates = []
    for _ in range(3):
        clock.now += 1.0
        limiter.delay()
        rates.append(limiter.rate)
    assert rates == [75, 100, 100]  # 112.5 is capped at the configured 100


def test_429s_answering_requests_already_in_flight_do_not_halve_the_rate_again() -> None:
    clock = FakeClock()
    limiter = RequestRateLimiter(80, clock=clock)
    limiter.throttled(1.0)
    for _ in range(7):  # the other workers' requests, sent before the pause began
        clock.now += 0.01
        limiter.throttled(1.0)
    assert limiter.rate == 40
    # ...but they do extend the pause to the latest Retry-After.
    assert limiter.delay() == pytest.approx(1.0)


def test_without_a_cap_a_429_slows_to_half_the_observed_rate_and_recovers_to_unlimited() -> None:
    clock = FakeClock()
    limiter = RequestRateLimiter(0, clock=clock)
    for _ in range(400):  # 400 requests over two seconds: 200 per second
        clock.now += 0.005
        limiter.delay()
    limiter.throttled(0.5)
    assert limiter.rate == pytest.approx(100, rel=0.05)
    clock.now += 0.5
    for _ in range(3):
        clock.now += 1.0
        limiter.delay()
    assert limiter.rate is None


def test_however_many_429s_the_rate_never_drops_below_the_floor() -> None:
    clock = FakeClock()
    limiter = RequestRateLimiter(4, clock=clock)
    for _ in range(10):
        limiter.throttled(0.1)
        clock.now += 0.2
    assert limiter.rate == MIN_RATE


# --- real workers over HTTP --------------------------------------------------------------------


def settings_for(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "api_url": url,
        "api_token": Secret(TOKEN),
        "api_retries": 3,
        "concurrency": 8,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_twenty_requests_at_ten_per_second_take_about_two_seconds() -> None:
    api = SimulatedApi.generate(orgs=19, seed=3, token=TOKEN)
    with SimulatorServer(api) as sim:
        started = time.monotonic()
        with CekuraClient(settings_for(sim.url, max_requests_per_second=10)) as client:
            result = client.fetch_snapshots()
        elapsed = time.monotonic() - started
    assert len(result.snapshots) == 19
    assert sum(api.request_counts().values()) == 20  # one list page + 19 billing requests
    # 20 slots a tenth of a second apart span 1.9 s; generous: any overrun is the test's cost.
    assert elapsed >= 1.5


class ArrivalLog:
    """Records when each billing request reaches the simulator, and what it answered."""

    def __init__(self, api: SimulatedApi) -> None:
        self.arrivals: list[tuple[float, bool]] = []
        self._lock = threading.Lock()
        take_faults = api.take_faults

        def recording(endpoint: str, org_id: int | None):  # type: ignore[no-untyped-def]
            delay, fault = take_faults(endpoint, org_id)
            if endpoint == "billing":
                with self._lock:
                    self.arrivals.append((time.monotonic(), fault is not None))
            return delay, fault

        api.take_faults = recording  # type: ignore[method-assign]


def test_one_429_pauses_every_worker_and_the_cycle_still_reads_every_org() -> None:
    # The 429 comes early, so most organizations are still to be read when it arrives: a
    # fast client may land a few more requests before every worker has seen the pause.
    api = SimulatedApi.generate(orgs=120, seed=4, token=TOKEN)
    middle = api.org_ids()[30]
    api.add_fault(Fault("rate_limit", org_id=middle, endpoint="billing", retry_after=1, times=1))
    arrivals = ArrivalLog(api)
    with SimulatorServer(api) as sim, capture_logs() as logs:
        with CekuraClient(settings_for(sim.url, max_requests_per_second=0)) as client:
            result = client.fetch_snapshots()

    assert result.errors == [] and len(result.snapshots) == 120
    [throttled_at] = [at for at, limited in arrivals.arrivals if limited]
    # Requests already on the wire may land just after the 429; then nobody sends until the
    # Retry-After second is over, although 8 workers had ~80 orgs left to read.
    quiet = [at for at, _ in arrivals.arrivals if throttled_at + 0.25 < at < throttled_at + 0.95]
    assert quiet == []
    after = [at for at, _ in arrivals.arrivals if at >= throttled_at + 0.95]
    assert len(after) >= 60
    assert [e["event"] for e in logs if e["event"] == "api.throttled"] == ["api.throttled"]


def test_repeated_429s_slow_the_workers_down_and_the_cycle_completes() -> None:
    api = SimulatedApi.generate(orgs=40, seed=5, token=TOKEN)
    api.add_fault(Fault("rate_limit", endpoint="billing", retry_after=0, times=3))
    with SimulatorServer(api) as sim:
        limiter = RequestRateLimiter(200)
        with CekuraClient(settings_for(sim.url, api_retries=8), rate_limiter=limiter) as client:
            result = client.fetch_snapshots()
            slowed_to = limiter.rate
    assert result.errors == [] and len(result.snapshots) == 40
    assert slowed_to is not None and slowed_to < 200


def test_the_rate_cap_is_a_setting_where_zero_means_no_cap() -> None:
    assert load_settings(env={}).max_requests_per_second == 100.0
    assert load_settings(env={"POLLER_MAX_REQUESTS_PER_SECOND": "0"}).max_requests_per_second == 0
    with pytest.raises(ConfigError, match="^POLLER_MAX_REQUESTS_PER_SECOND: must be 0 or "):
        load_settings(env={"POLLER_MAX_REQUESTS_PER_SECOND": "-5"})

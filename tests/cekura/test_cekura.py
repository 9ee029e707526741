"""The Cekura client against real HTTP servers on 127.0.0.1.

Most tests run against the API simulator. A few need answers no honest API gives (a
pagination link to another host, a redirect, an error echoing the key); those use a tiny
scripted server defined here, still real HTTP.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from structlog.testing import capture_logs

from poller.cekura.client import ApiError, ApiUnavailable, AuthError, CekuraClient
from poller.cekura.ratelimit import RequestRateLimiter
from poller.config.settings import ConfigError, Secret, Settings
from poller.devtools.simulator import Fault, SimulatedApi, SimulatorServer
from poller.engine.model import OrgError

TOKEN = "tok-very-secret-123"


def make_client(
    url: str,
    *,
    token: str | None = None,
    keys: tuple[str, ...] = (),
    retries: int = 2,
    read_timeout: float = 2.0,
    sleeps: list[float] | None = None,
    concurrency: int = 4,
    **client_args: object,
) -> CekuraClient:
    settings = Settings(
        api_url=url,
        api_token=Secret(token) if token is not None else None,
        api_keys=tuple(Secret(key) for key in keys),
        api_retries=retries,
        api_connect_timeout=1.0,
        api_read_timeout=read_timeout,
        concurrency=concurrency,
        max_requests_per_second=0,
    )
    recorded = sleeps if sleeps is not None else []
    # Sleeps are recorded, not slept: the rate limiter's clock moves by what was "slept".
    slept = [0.0]

    def sleep(seconds: float) -> None:
        recorded.append(seconds)
        slept[0] += seconds

    client_args.setdefault("rate_limiter", RequestRateLimiter(0, clock=lambda: slept[0]))
    return CekuraClient(settings, sleep=sleep, **client_args)  # type: ignore[arg-type]


# --- a scripted server for hostile answers ----------------------------------------------

Reply = tuple[int, dict[str, str], object]


@contextmanager
def scripted_server(answer: Callable[[str, dict[str, str]], Reply]) -> Iterator[tuple[str, list]]:
    """Serves answer(path, headers) -> (status, headers, json body); records each request."""
    seen: list[tuple[str, dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            headers = dict(self.headers.items())
            seen.append((self.path, headers))
            status, extra, body = answer(self.path, headers)
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def org_json(org_id: int) -> dict[str, object]:
    return {"id": org_id, "name": f"Org {org_id}", "members": []}


def test_a_pagination_link_to_another_host_is_refused_and_never_followed() -> None:
    def answer(path: str, headers: dict[str, str]) -> Reply:
        page = {
            "count": 2,
            "previous": None,
            "results": [org_json(1)],
            "next": "http://127.0.0.2:9/user/v2/organizations/?page=2",
        }
        return 200, {}, page

    with scripted_server(answer) as (url, seen), make_client(url, token=TOKEN) as client:
        with pytest.raises(ApiUnavailable) as caught:
            client.fetch_snapshots()
    assert "refusing to follow a pagination link to http://127.0.0.2:9" in str(caught.value)
    assert [path for path, _ in seen] == ["/user/v2/organizations/?page_size=200"]


def test_the_listing_is_read_to_its_end_without_waiting_for_the_billing_reads() -> None:
    # Pages shift when orgs come and go while they are read: the listing must not be held up
    # by the billing reads it feeds. Here no billing answer comes before the last page has
    # been served (or 5 s have passed); 70 orgs are more than the client keeps in flight.
    pages = 35
    last_page_served = threading.Event()
    waited_in_vain: list[str] = []

    def answer(path: str, headers: dict[str, str]) -> Reply:
        if path.startswith("/user/v2/organizations/"):
            number = int(path.split("page=")[1]) if "page=" in path else 1
            if number == pages:
                last_page_served.set()
            following = None if number == pages else f"/user/v2/organizations/?page={number + 1}"
            return (
                200,
                {},
                {
                    "count": 2 * pages,
                    "previous": None,
                    "next": following,
                    "results": [org_json(2 * number - 1), org_json(2 * number)],
                },
            )
        if not last_page_served.wait(timeout=5):
            waited_in_vain.append(path)
        org_id = int(path.rsplit("=", 1)[1])
        return 200, {}, {"organization": org_id, "credits_remaining": "5.00"}

    with scripted_server(answer) as (url, _), make_client(url, token=TOKEN, page_size=2) as client:
        result = client.fetch_snapshots()
    assert waited_in_vain == []
    assert [s.id for s in result.snapshots] == list(range(1, 2 * pages + 1))


def test_a_redirect_is_not_followed_so_the_key_cannot_travel_elsewhere() -> None:
    def answer(path: str, headers: dict[str, str]) -> Reply:
        return 302, {"Location": "http://127.0.0.2:9/steal"}, {}

    with scripted_server(answer) as (url, seen), make_client(url, keys=("k-1",)) as client:
        with pytest.raises(ApiUnavailable) as caught:
            client.fetch_snapshots()
    assert "was refused (302)" in str(caught.value)
    assert len(seen) == 1


def test_an_error_message_echoing_the_credential_is_redacted() -> None:
    def answer(path: str, headers: dict[str, str]) -> Reply:
        return 401, {}, {"detail": f"Invalid token {TOKEN}."}

    with scripted_server(answer) as (url, _), make_client(url, token=TOKEN) as client:
        with pytest.raises(AuthError) as caught:
            client.fetch_snapshots()
    assert str(caught.value) == "the Cekura API rejected the API token (401): Invalid token ***."


def test_retry_after_as_an_http_date_is_honoured() -> None:
    now = datetime(2026, 8, 22, 9, 0, 0, tzinfo=UTC)
    calls = {"n": 0}

    def answer(path: str, headers: dict[str, str]) -> Reply:
        calls["n"] += 1
        if calls["n"] == 1:
            return 429, {"Retry-After": "Sat, 22 Aug 2026 09:00:07 GMT"}, {"detail": "slow down"}
        return 200, {}, org_json(4)

    sleeps: list[float] = []
    with scripted_server(answer) as (url, _):
        with make_client(url, token=TOKEN, sleeps=sleeps, clock=lambda: now) as client:
            assert client.get_organization(4).id == 4
    assert sleeps == [7.0]


def test_plain_http_to_a_remote_host_is_refused_before_any_connection() -> None:
    # 192.0.2.1 is TEST-NET-1: nothing answers there, and the client must not even try.
    with pytest.raises(ConfigError) as caught:
        make_client("http://192.0.2.1", token=TOKEN)
    assert "refusing to send the API credential over plain http to 192.0.2.1" in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_plain_http_to_a_remote_host_is_allowed_only_when_explicitly_permitted() -> None:
    settings = Settings(
        api_url="http://192.0.2.1", api_token=Secret(TOKEN), allow_insecure_http=True
    )
    CekuraClient(settings).close()  # constructing makes no connection


def test_a_client_without_any_credential_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError):
        make_client("https://api.cekura.ai")


# --- against the simulator ----------------------------------------------------------------

ORG_COUNT = 50


@pytest.fixture
def api() -> SimulatedApi:
    return SimulatedApi.generate(ORG_COUNT, seed=11, token=TOKEN)


@pytest.fixture
def api_url(api: SimulatedApi) -> Iterator[str]:
    # Our own server per test: faults and balances are changed by the tests.
    with SimulatorServer(api) as server:
        yield server.url


def some_org(api: SimulatedApi, position: int = 0) -> int:
    return api.org_ids()[position]


def assert_matches_simulator(api: SimulatedApi, snapshots: list) -> None:
    assert [s.id for s in snapshots] == api.org_ids()
    for snapshot in snapshots:
        assert isinstance(snapshot.balance, Decimal)
        assert snapshot.balance == api.balance(snapshot.id)
        served = api.organization(snapshot.id)
        assert snapshot.name == served["name"]
        assert snapshot.threshold == Decimal(served.get("low_credits_threshold") or "1000")


def test_it_reads_every_organization_with_the_bearer_token(api: SimulatedApi, api_url: str) -> None:
    api.set_balance(some_org(api), "-12.34")
    with make_client(api_url, token=TOKEN) as client:
        result = client.fetch_snapshots()
    assert result.errors == []
    assert_matches_simulator(api, result.snapshots)
    assert result.snapshots[0].balance == Decimal("-12.34")
    assert result.requests == 1 + ORG_COUNT


def test_it_follows_v2_pagination_across_pages(api: SimulatedApi, api_url: str) -> None:
    with make_client(api_url, token=TOKEN, page_size=20) as client:
        result = client.fetch_snapshots()
    assert_matches_simulator(api, result.snapshots)
    assert api.request_counts()["list_v2"] == 3


def test_it_falls_back_to_the_v1_list_when_v2_is_missing(api: SimulatedApi, api_url: str) -> None:
    api.v2_enabled = False
    with make_client(api_url, token=TOKEN) as client:
        result = client.fetch_snapshots()
    assert_matches_simulator(api, result.snapshots)
    assert api.request_counts()["list"] == 1


def test_it_reads_every_organization_with_org_scoped_keys(api: SimulatedApi, api_url: str) -> None:
    with make_client(api_url, keys=tuple(api.keys().values())) as client:
        result = client.fetch_snapshots()
    assert result.errors == []
    assert_matches_simulator(api, result.snapshots)
    assert result.requests == 2 * ORG_COUNT
    assert api.request_counts().get("list_v2", 0) == 0


def test_with_token_and_keys_each_organization_is_read_once(
    api: SimulatedApi, api_url: str
) -> None:
    keys = tuple(api.keys().values())[:5]
    with make_client(api_url, token=TOKEN, keys=keys) as client:
        result = client.fetch_snapshots()
    assert_matches_simulator(api, result.snapshots)
    # The keys' billing calls find orgs the token already read: no second org fetch.
    assert api.request_counts().get("retrieve", 0) == 0


def test_a_key_rescues_an_organization_the_token_could_not_read(
    api: SimulatedApi, api_url: str
) -> None:
    org_id = some_org(api, 3)
    api.add_fault(Fault("status", org_id=org_id, endpoint="billing", status=403, times=1))
    with make_client(api_url, token=TOKEN, keys=(api.keys()[org_id],)) as client:
        result = client.fetch_snapshots()
    assert result.errors == []
    assert_matches_simulator(api, result.snapshots)


def test_a_slow_answer_beyond_the_read_timeout_is_retried(api: SimulatedApi, api_url: str) -> None:
    org_id = some_org(api, 5)
    api.add_fault(Fault("latency", org_id=org_id, endpoint="billing", seconds=0.6, times=1))
    sleeps: list[float] = []
    with make_client(api_url, token=TOKEN, read_timeout=0.25, sleeps=sleeps) as client:
        result = client.fetch_snapshots()
    assert result.errors == []
    assert_matches_simulator(api, result.snapshots)
    assert len(sleeps) == 1


def test_an_org_that_stays_too_slow_becomes_an_error_of_its_own(
    api: SimulatedApi, api_url: str
) -> None:
    org_id = some_org(api, 5)
    api.add_fault(Fault("latency", org_id=org_id, endpoint="billing", seconds=0.6))
    with make_client(api_url, token=TOKEN, read_timeout=0.25, retries=1) as client:
        result = client.fetch_snapshots()
    assert result.errors == [
        OrgError(
            org_id,
            f"organization {org_id}: billing info: "
            "GET /test_framework/billing/info/ failed after 2 attempts: timed out",
        )
    ]
    assert len(result.snapshots) == ORG_COUNT - 1


def test_a_burst_of_503_is_retried_until_it_succeeds(api: SimulatedApi, api_url: str) -> None:
    api.add_fault(Fault("status", endpoint="billing", status=503, times=3))
    sleeps: list[float] = []
    with make_client(api_url, token=TOKEN, retries=3, sleeps=sleeps) as client:
        result = client.fetch_snapshots()
    assert result.errors == []
    assert_matches_simulator(api, result.snapshots)
    assert len(sleeps) == 3
    assert result.requests == 1 + ORG_COUNT + 3


def test_backoff_grows_exponentially_with_full_jitter(api: SimulatedApi, api_url: str) -> None:
    api.add_fault(Fault("status", endpoint="list_v2", status=502, times=3))
    sleeps: list[float] = []
    with make_client(
        api_url, token=TOKEN, retries=3, sleeps=sleeps, jitter=lambda: 0.5, backoff_base=1.0
    ) as client:
        client.fetch_snapshots()
    assert sleeps == [0.5, 1.0, 2.0]


def test_a_429_waits_as_long_as_retry_after_says(api: SimulatedApi, api_url: str) -> None:
    org_id = some_org(api, 7)
    api.add_fault(Fault("rate_limit", org_id=org_id, endpoint="billing", retry_after=7, times=1))
    api.add_fault(Fault("rate_limit", endpoint="list_v2", retry_after=120, times=1))
    sleeps: list[float] = []
    with make_client(api_url, token=TOKEN, sleeps=sleeps) as client:
        result = client.fetch_snapshots()
    assert result.errors == []
    # A huge Retry-After is capped so one answer cannot stall the poller for minutes.
    assert sleeps[0] == 60.0
    assert max(sleeps) == 60.0
    # The org's retry waited out its own Retry-After (others paused with it and then slowed).
    assert any(seconds >= 7.0 for seconds in sleeps[1:])


def test_a_malformed_answer_becomes_an_error_for_that_org_only(
    api: SimulatedApi, api_url: str
) -> None:
    org_id = some_org(api, 9)
    api.add_fault(Fault("malformed", org_id=org_id, endpoint="billing"))
    with make_client(api_url, token=TOKEN) as client:
        result = client.fetch_snapshots()
    assert [e.org_id for e in result.errors] == [org_id]
    assert "GET /test_framework/billing/info/" in result.errors[0].message
    assert "not valid JSON" in result.errors[0].message
    assert len(result.snapshots) == ORG_COUNT - 1


def test_a_dropped_connection_is_retried(api: SimulatedApi, api_url: str) -> None:
    # One worker, so the dropped billing read is its first, on a new connection (as the
    # listing's is): both are retried by the client, after a back-off each.
    org_id = some_org(api, 0)
    api.add_fault(Fault("drop", org_id=org_id, endpoint="billing", times=1))
    api.add_fault(Fault("drop", endpoint="list_v2", times=1))
    sleeps: list[float] = []
    with make_client(api_url, token=TOKEN, sleeps=sleeps, concurrency=1) as client:
        result = client.fetch_snapshots()
    assert result.errors == []
    assert_matches_simulator(api, result.snapshots)
    assert len(sleeps) == 2


def test_a_read_dropped_on_a_kept_alive_connection_is_sent_again_at_once(
    api: SimulatedApi, api_url: str
) -> None:
    # The worker's third read: its connection carried two answers already, and a server that
    # closes it without answering may have closed it while idle, never reading the GET.
    org_id = some_org(api, 2)
    api.add_fault(Fault("drop", org_id=org_id, endpoint="billing", times=1))
    sleeps: list[float] = []
    with make_client(api_url, token=TOKEN, sleeps=sleeps, concurrency=1) as client:
        result = client.fetch_snapshots()
    assert result.errors == []
    assert_matches_simulator(api, result.snapshots)
    assert sleeps == []
    assert api.request_counts()["billing"] == len(api.org_ids()) + 1


def test_one_failing_org_does_not_stop_the_others(api: SimulatedApi, api_url: str) -> None:
    broken, missing = some_org(api, 1), some_org(api, 2)
    api.add_fault(Fault("status", org_id=broken, endpoint="billing", status=500))
    api.add_fault(Fault("status", org_id=missing, endpoint="billing", status=404))
    with make_client(api_url, token=TOKEN, retries=1) as client:
        result = client.fetch_snapshots()
    assert result.errors == [
        OrgError(
            broken,
            f"organization {broken}: billing info: "
            "GET /test_framework/billing/info/ failed after 2 attempts: HTTP 500",
        ),
        OrgError(
            missing,
            f"organization {missing}: billing info: "
            "GET /test_framework/billing/info/: not found (404)",
        ),
    ]
    assert {s.id for s in result.snapshots} == set(api.org_ids()) - {broken, missing}


def test_fields_the_api_leaves_out_get_their_defaults(api: SimulatedApi, api_url: str) -> None:
    org_id = some_org(api, 4)
    api.update_org(org_id, low_credits_threshold=None, is_send_emails_enabled=None)
    with make_client(api_url, token=TOKEN) as client:
        result = client.fetch_snapshots()
    snapshot = next(s for s in result.snapshots if s.id == org_id)
    assert snapshot.threshold == Decimal("1000")
    assert snapshot.org.send_emails_enabled is True


def test_an_unparseable_organization_becomes_an_error_naming_the_field() -> None:
    def answer(path: str, headers: dict[str, str]) -> Reply:
        if path.startswith("/user/v2/organizations/"):
            bad = dict(org_json(2), low_credits_threshold="abc")
            return (
                200,
                {},
                {
                    "count": 3,
                    "next": None,
                    "previous": None,
                    "results": [org_json(1), bad, org_json(3)],
                },
            )
        org_id = int(path.rsplit("=", 1)[1])
        return 200, {}, {"organization": org_id, "credits_remaining": "5.00"}

    with scripted_server(answer) as (url, _), make_client(url, token=TOKEN) as client:
        result = client.fetch_snapshots()
    assert result.errors == [
        OrgError(
            2, "organization 2 in the list: low_credits_threshold: 'abc' is not a decimal number"
        )
    ]
    assert [s.id for s in result.snapshots] == [1, 3]


def test_listing_that_keeps_failing_raises_api_unavailable(api: SimulatedApi, api_url: str) -> None:
    api.add_fault(Fault("status", endpoint="list_v2", status=503))
    sleeps: list[float] = []
    with make_client(api_url, token=TOKEN, sleeps=sleeps) as client:
        with pytest.raises(ApiUnavailable) as caught:
            client.fetch_snapshots()
    assert str(caught.value) == "GET /user/v2/organizations/ failed after 3 attempts: HTTP 503"
    assert len(sleeps) == 2
    assert api.request_counts().get("billing", 0) == 0


def test_a_rejected_token_is_an_auth_error_that_does_not_show_the_token(api_url: str) -> None:
    wrong = "wrong-token-6789"
    sleeps: list[float] = []
    with capture_logs() as logs, make_client(api_url, token=wrong, sleeps=sleeps) as client:
        with pytest.raises(AuthError) as caught:
            client.fetch_snapshots()
    assert str(caught.value) == "the Cekura API rejected the API token (401): Invalid token."
    assert sleeps == []  # never retried
    assert wrong not in repr(logs)
    assert [entry["event"] for entry in logs] == ["api.request_failed"]


def test_a_wrong_key_among_several_is_named_by_its_position_only(
    api: SimulatedApi, api_url: str
) -> None:
    wrong = "cek_live_wrong_key_424242"
    good = tuple(api.keys().values())[:3]
    with capture_logs() as logs, make_client(api_url, keys=(good[0], wrong, *good[1:])) as client:
        result = client.fetch_snapshots()
    assert result.errors == [
        OrgError(None, "API key #2 of POLLER_API_KEYS was rejected (401): Invalid API key.")
    ]
    assert [s.id for s in result.snapshots] == sorted(api.keys())[:3]
    assert wrong not in repr(logs) and wrong[:8] not in repr(result)


def test_when_every_key_is_rejected_it_raises_an_auth_error(api_url: str) -> None:
    with make_client(api_url, keys=("bad-1", "bad-2")) as client:
        with pytest.raises(AuthError) as caught:
            client.fetch_snapshots()
    message = str(caught.value)
    assert "API key #1 of POLLER_API_KEYS was rejected" in message
    assert "API key #2 of POLLER_API_KEYS was rejected" in message
    assert "bad-1" not in message and "bad-2" not in message


def test_when_every_key_fails_otherwise_the_api_is_unavailable(
    api: SimulatedApi, api_url: str
) -> None:
    api.add_fault(Fault("status", endpoint="billing", status=502))
    with make_client(api_url, keys=tuple(api.keys().values())[:2], retries=0) as client:
        with pytest.raises(ApiUnavailable) as caught:
            client.fetch_snapshots()
    assert str(caught.value).startswith("no API key could be used: API key #1: GET ")


def test_only_org_reads_just_that_organization(api: SimulatedApi, api_url: str) -> None:
    org_id = some_org(api, 8)
    with make_client(api_url, token=TOKEN) as client:
        result = client.fetch_snapshots(only_org=org_id)
    assert [s.id for s in result.snapshots] == [org_id]
    assert result.snapshots[0].balance == api.balance(org_id)
    assert result.requests == 2


def test_only_org_with_keys_uses_the_key_of_that_organization(
    api: SimulatedApi, api_url: str
) -> None:
    org_id = some_org(api, 8)
    keys = tuple(api.keys().values())[5:10]
    with make_client(api_url, keys=keys) as client:
        result = client.fetch_snapshots(only_org=org_id)
    assert [s.id for s in result.snapshots] == [org_id]
    assert result.errors == []
    assert api.request_counts()["retrieve"] == 1


def test_only_org_that_does_not_exist_is_an_org_error(api: SimulatedApi, api_url: str) -> None:
    with make_client(api_url, token=TOKEN) as client:
        result = client.fetch_snapshots(only_org=999_999)
    assert result.snapshots == []
    assert result.errors == [
        OrgError(999_999, "organization 999999: GET /user/organizations/999999/: not found (404)")
    ]


def test_patching_the_threshold_returns_and_stores_the_new_value(
    api: SimulatedApi, api_url: str
) -> None:
    org_id = some_org(api, 6)
    with make_client(api_url, token=TOKEN) as client:
        org = client.patch_organization(
            org_id, {"low_credits_threshold": Decimal("250.50"), "notify_low_credits": True}
        )
        assert client.get_organization(org_id) == org
    assert org.low_credits_threshold == Decimal("250.50")
    assert org.notify_low_credits is True
    assert api.organization(org_id)["low_credits_threshold"] == "250.50"


def test_patching_with_keys_uses_the_key_of_that_organization(
    api: SimulatedApi, api_url: str
) -> None:
    org_id = some_org(api, 6)
    keys = tuple(api.keys().values())[4:8]
    with make_client(api_url, keys=keys) as client:
        org = client.patch_organization(org_id, {"low_credits_threshold": "75"})
    assert org.low_credits_threshold == Decimal("75.00")


def test_a_rejected_patch_gives_the_api_field_message(api: SimulatedApi, api_url: str) -> None:
    org_id = some_org(api, 6)
    with make_client(api_url, token=TOKEN) as client:
        with pytest.raises(ApiError) as caught:
            client.patch_organization(org_id, {"low_credits_threshold": Decimal("12.345")})
    assert str(caught.value) == (
        f"PATCH /user/organizations/{org_id}/ was refused (400): "
        "low_credits_threshold: Ensure that there are no more than 2 decimal places."
    )
    assert caught.value.status == 400

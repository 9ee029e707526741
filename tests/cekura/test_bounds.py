"""What bounds one API fetch: the listing by its announced count and by cycle_timeout, each
request by api_request_timeout and by what its endpoint can plausibly answer, and pagination
links by the origin both URL parsers agree on. Real HTTP servers on 127.0.0.1 throughout."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3.util import parse_url

import poller.cekura.client as cekura
from poller.cekura.client import ApiUnavailable, CekuraClient
from poller.config.settings import Secret, Settings
from poller.devtools.simulator import Fault, SimulatedApi, SimulatorServer
from tests.cekura.test_cekura import Reply, org_json, scripted_server
from tests.cekura.test_transport import keep_alive, raw_server

TOKEN = "tok-bounds-secret-42"
LISTING = "/user/v2/organizations/"


def client_for(url: str, **overrides: object) -> CekuraClient:
    values: dict[str, object] = {
        "api_url": url,
        "api_token": Secret(TOKEN),
        "api_retries": 1,
        "api_connect_timeout": 1.0,
        "api_read_timeout": 2.0,
        "max_requests_per_second": 0,
        "concurrency": 2,
    }
    values.update(overrides)
    return CekuraClient(
        Settings(**values),
        sleep=lambda _seconds: None,  # type: ignore[arg-type]
        page_size=2,
    )


def simulator_with(org_count: int) -> SimulatedApi:
    api = SimulatedApi(token=TOKEN)
    for org_id in range(1, org_count + 1):
        api.add_org(f"Org {org_id}", org_id=org_id, credits_remaining="5000.00")
    return api


# --- the listing: its announced count, and cycle_timeout ---------------------------------


def test_pagination_whose_next_link_never_ends_stops_soon_after_the_announced_count() -> None:
    served = []

    def answer(path: str, headers: dict[str, str]) -> Reply:
        if not path.startswith(LISTING):
            return (
                200,
                {},
                {"organization": int(path.rsplit("=", 1)[1]), "credits_remaining": "5.00"},
            )
        number = int(path.split("page=")[1]) if "page=" in path else 1
        served.append(number)
        if number > 50:  # a stand-in for "forever", so the old behaviour ends too
            return 500, {}, {"detail": "enough"}
        return (
            200,
            {},
            {
                "count": 4,
                "previous": None,
                "next": f"{LISTING}?page={number + 1}",
                "results": [org_json(2 * number - 1), org_json(2 * number)],
            },
        )

    with scripted_server(answer) as (url, _), client_for(url) as client:
        with pytest.raises(ApiUnavailable, match="goes on past the 4 organizations"):
            client.fetch_snapshots()
    # 4 organizations at 2 a page are 2 pages; a couple more are slack for shifting pages.
    assert served == [1, 2, 3, 4]


def test_a_listing_still_going_at_cycle_timeout_fails() -> None:
    api = simulator_with(9)  # 5 pages of 2
    api.add_fault(Fault("latency", endpoint="list_v2", seconds=0.6))
    with SimulatorServer(api) as sim, client_for(sim.url, cycle_timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(ApiUnavailable, match=r"longer than cycle_timeout \(1 s\)"):
            client.fetch_snapshots()
    assert time.monotonic() - started < 5
    assert api.request_counts()["list_v2"] <= 2


def test_the_one_piece_v1_listing_is_bounded_by_cycle_timeout_too() -> None:
    api = simulator_with(3)
    api.v2_enabled = False
    api.add_fault(Fault("latency", endpoint="list", seconds=4))  # within the read timeout
    with SimulatorServer(api) as sim:
        with client_for(sim.url, cycle_timeout=1.0, api_read_timeout=10.0) as client:
            started = time.monotonic()
            with pytest.raises(ApiUnavailable, match="cycle_timeout"):
                client.fetch_snapshots()
    assert time.monotonic() - started < 3


# --- one request: api_request_timeout, and its endpoint's size limit ----------------------


def test_a_billing_answer_trickled_byte_by_byte_times_out_and_is_that_orgs_error() -> None:
    page = b'{"count": 1, "next": null, "results": [{"id": 1, "name": "Org 1", "members": []}]}'
    trickle = [b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"] + [b" "] * 5000

    def answer(number: int) -> tuple[list[bytes], bool]:
        return keep_alive(page) if number == 1 else (trickle, True)

    with raw_server(answer) as (url, requests):
        with client_for(url, api_request_timeout=1.0) as client:
            started = time.monotonic()
            result = client.fetch_snapshots()
    assert time.monotonic() - started < 10
    assert result.snapshots == []
    [error] = result.errors
    assert error.org_id == 1 and "failed after 2 attempts: timed out" in error.message
    assert len(requests) == 3  # the page, and the billing read twice (one retry)


def test_a_billing_answer_over_its_limit_is_that_orgs_error_and_is_not_asked_again() -> None:
    api = simulator_with(2)
    api.corrupt_billing(2, "credits_used", "9" * (cekura.BILLING_MAX_BYTES + 1))
    with SimulatorServer(api) as sim, client_for(sim.url) as client:
        result = client.fetch_snapshots()
    assert [s.id for s in result.snapshots] == [1]
    [error] = result.errors
    assert error.org_id == 2 and "the response body is too large (over 1 MiB)" in error.message
    assert api.request_counts()["billing"] == 2


def test_a_listing_page_over_its_limit_fails_the_listing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cekura, "PAGE_MAX_BYTES", 200)  # less than two organizations weigh
    api = simulator_with(3)
    with SimulatorServer(api) as sim, client_for(sim.url) as client:
        with pytest.raises(ApiUnavailable, match="too large"):
            client.fetch_snapshots()
    assert api.request_counts().get("billing", 0) == 0


# --- pagination links: the origin, as both parsers read it --------------------------------


def test_a_next_link_urllib3_reads_as_another_host_never_reaches_it_through_a_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Through a proxy, urllib3 decides where a request goes: it reads this link's host as
    # evil.test, where urlsplit reads api.cekura.invalid.
    api_url = "http://api.cekura.invalid:8080"
    evil = "http://evil.test\\@api.cekura.invalid:8080/user/v2/organizations/?page=2"

    def answer(path: str, headers: dict[str, str]) -> Reply:
        return (
            200,
            {},
            {"count": 4, "previous": None, "next": evil, "results": [org_json(1), org_json(2)]},
        )

    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    with scripted_server(answer) as (proxy_url, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        with client_for(api_url, allow_insecure_http=True) as client:
            with pytest.raises(ApiUnavailable, match="refusing to follow a pagination link"):
                client.fetch_snapshots()
    assert [parse_url(path).host for path, _ in seen] == ["api.cekura.invalid"]
    assert all(headers.get("Host") == "api.cekura.invalid:8080" for _, headers in seen)


URL_PIECES = st.sampled_from(
    [
        "http://",
        "https://",
        "//",
        "/",
        "\\",
        "@",
        ":",
        "?",
        "#",
        "%",
        "%2F",
        "%40",
        "[",
        "]",
        "::1",
        "127.0.0.1",
        "127.0.0.1:8080",
        ":8080",
        ":80",
        ":443",
        "localhost",
        "LOCALHOST",
        "evil.test",
        "user:pw@",
        " ",
        "\t",
        "\n",
        "\x00",
        "\u3002",
        "ｌｏｃａｌｈｏｓｔ",
        "page=2",
        "..",
        ".",
        "HTTP:",
        "0x7f.1",
        "2130706433",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(URL_PIECES, max_size=8).map("".join)))
def test_a_followed_next_link_leads_to_the_api_origin_as_both_parsers_read_it(
    link: str,
) -> None:
    api_url = "http://127.0.0.1:8080"
    client = client_for(api_url)
    try:
        url = client._next_link(api_url + LISTING, link)
    except ApiUnavailable:
        return  # refused: the listing fails
    finally:
        client.close()
    ours = urlsplit(url)
    theirs = parse_url(url)
    assert (ours.scheme, ours.hostname, ours.port or 80) == ("http", "127.0.0.1", 8080)
    assert (theirs.scheme, theirs.host, theirs.port or 80) == ("http", "127.0.0.1", 8080)

"""The adaptive schedule's two calls: the organization list alone (``list_organizations``)
and the balances of the organizations due (``read_balances``), against the API simulator
(a scripted server, still real HTTP, where only a hostile answer will do)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from poller.cekura.client import ApiUnavailable, AuthError
from poller.devtools.simulator import Fault, SimulatedApi, SimulatorServer
from poller.engine.model import OrgError
from tests.cekura.test_cekura import (
    TOKEN,
    Reply,
    assert_matches_simulator,
    make_client,
    org_json,
    scripted_server,
)

ORG_COUNT = 50


@pytest.fixture
def api() -> SimulatedApi:
    return SimulatedApi.generate(ORG_COUNT, seed=23, token=TOKEN)


@pytest.fixture
def api_url(api: SimulatedApi) -> Iterator[str]:
    with SimulatorServer(api) as server:
        yield server.url


# --- list_organizations -------------------------------------------------------------------


def test_the_token_listing_costs_its_pages_and_reads_no_balance(
    api: SimulatedApi, api_url: str
) -> None:
    observed: list[tuple[str, str]] = []
    with make_client(
        api_url, token=TOKEN, page_size=20, on_request=lambda *seen: observed.append(seen)
    ) as client:
        listing = client.list_organizations()
    assert [org.id for org in listing.organizations] == api.org_ids()
    for org in listing.organizations:
        assert org.name == api.organization(org.id)["name"]
    assert listing.snapshots == [] and listing.errors == [] and listing.complete
    assert listing.requests == 3 == len(observed)
    assert api.request_counts() == {"list_v2": 3}


def test_the_listing_falls_back_to_v1(api: SimulatedApi, api_url: str) -> None:
    api.v2_enabled = False
    with make_client(api_url, token=TOKEN) as client:
        listing = client.list_organizations()
    assert [org.id for org in listing.organizations] == api.org_ids()
    assert api.request_counts() == {"list": 1}  # v2's 404 comes before the simulator counts


def test_org_scoped_keys_list_their_orgs_whole(api: SimulatedApi, api_url: str) -> None:
    with make_client(api_url, keys=tuple(api.keys().values())) as client:
        listing = client.list_organizations()
    assert_matches_simulator(api, listing.snapshots)
    assert listing.organizations == [s.org for s in listing.snapshots]
    assert listing.errors == [] and listing.complete
    assert listing.requests == 2 * ORG_COUNT


def test_with_token_and_keys_a_key_reads_only_what_the_token_did_not_list(
    api: SimulatedApi, api_url: str
) -> None:
    keys = tuple(api.keys().values())[:5]
    with make_client(api_url, token=TOKEN, keys=keys) as client:
        first = client.list_organizations()
        second = client.list_organizations()
    assert [org.id for org in first.organizations] == api.org_ids()
    assert first.snapshots == [] and first.complete
    # Each key's billing read says which org it belongs to, once per process: listed already.
    assert first.requests == 1 + len(keys)
    assert second.requests == 1
    assert api.request_counts().get("retrieve", 0) == 0


def test_every_key_rejected_raises_an_auth_error(api_url: str) -> None:
    with make_client(api_url, keys=("bad-1", "bad-2")) as client:
        with pytest.raises(AuthError, match="API key #2 of POLLER_API_KEYS was rejected"):
            client.list_organizations()


def test_a_listing_that_keeps_failing_raises(api: SimulatedApi, api_url: str) -> None:
    api.add_fault(Fault("status", endpoint="list_v2", status=503))
    with make_client(api_url, token=TOKEN) as client:
        with pytest.raises(ApiUnavailable, match="failed after 3 attempts: HTTP 503"):
            client.list_organizations()
    api.clear_faults()
    with make_client(api_url, token="wrong-token") as client:
        with pytest.raises(AuthError, match="rejected the API token"):
            client.list_organizations()


def test_an_entry_without_an_id_makes_the_listing_incomplete() -> None:
    # Page two repeats org 2 (pages shifted meanwhile) and carries two broken entries: one
    # names its id, the other does not, so any org could be the one missing.
    pages = {
        1: [org_json(1), org_json(2)],
        2: [org_json(2), dict(org_json(4), low_credits_threshold="abc"), {"name": "no id"}],
    }

    def answer(path: str, headers: dict[str, str]) -> Reply:
        number = int(path.split("page=")[1]) if "page=" in path else 1
        following = "/user/v2/organizations/?page=2" if number == 1 else None
        return 200, {}, {"count": 5, "next": following, "previous": None, "results": pages[number]}

    with scripted_server(answer) as (url, seen), make_client(url, token=TOKEN) as client:
        listing = client.list_organizations()
    assert [org.id for org in listing.organizations] == [1, 2]
    assert listing.errors == [
        OrgError(
            4, "organization 4 in the list: low_credits_threshold: 'abc' is not a decimal number"
        ),
        OrgError(None, listing.errors[1].message),
    ]
    assert listing.errors[1].message.startswith("organization #4 in the list: ")
    assert not listing.complete
    assert len(seen) == 2


def test_a_broken_entry_with_its_id_leaves_the_listing_complete() -> None:
    def answer(path: str, headers: dict[str, str]) -> Reply:
        results = [org_json(1), dict(org_json(2), notify_low_credits="maybe")]
        return 200, {}, {"count": 2, "next": None, "previous": None, "results": results}

    with scripted_server(answer) as (url, _), make_client(url, token=TOKEN) as client:
        listing = client.list_organizations()
    assert [org.id for org in listing.organizations] == [1]
    assert [error.org_id for error in listing.errors] == [2]
    assert listing.complete


def test_cancel_breaks_off_a_listing_in_flight(api: SimulatedApi, api_url: str) -> None:
    api.add_fault(Fault("latency", endpoint="list_v2", seconds=5.0))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with make_client(api_url, token=TOKEN, read_timeout=10.0) as client:
        with pytest.raises(ApiUnavailable):
            client.list_organizations(cancel=stop)
    assert time.monotonic() - started < 2.0


# --- read_balances ------------------------------------------------------------------------


def test_with_the_token_each_balance_costs_one_request(api: SimulatedApi, api_url: str) -> None:
    progress: list[tuple[int, int, int, bool]] = []
    with make_client(api_url, token=TOKEN) as client:
        listing = client.list_organizations()
    wanted = listing.organizations[::2]
    api.set_balance(wanted[0].id, "-3.50")
    with make_client(api_url, token=TOKEN, on_progress=lambda *p: progress.append(p)) as client:
        result = client.read_balances(wanted)
    assert result.errors == []
    assert [s.org for s in result.snapshots] == wanted  # the orgs as given, not read again
    assert [s.balance for s in result.snapshots] == [api.balance(org.id) for org in wanted]
    assert result.requests == len(wanted)
    assert api.request_counts() == {"list_v2": 1, "billing": len(wanted)}
    assert progress[-1] == (len(wanted), len(wanted), 0, False)


def test_with_keys_each_balance_is_read_with_the_key_of_its_org(
    api: SimulatedApi, api_url: str
) -> None:
    with make_client(api_url, keys=tuple(api.keys().values())) as client:
        listing = client.list_organizations()
        result = client.read_balances(listing.organizations)
    assert result.errors == []
    assert_matches_simulator(api, result.snapshots)
    # The listing taught the client which org each key belongs to.
    assert result.requests == ORG_COUNT


def test_with_keys_alone_a_fresh_client_finds_the_key_of_each_org(
    api: SimulatedApi, api_url: str
) -> None:
    with make_client(api_url, token=TOKEN) as client:
        organizations = client.list_organizations().organizations[-10:]
    keys = api.keys()
    with make_client(api_url, keys=tuple(keys[org_id] for org_id in api.org_ids())) as client:
        result = client.read_balances(organizations)
        again = client.read_balances(organizations)
    assert result.errors == []
    assert [s.id for s in result.snapshots] == [org.id for org in organizations]
    assert [s.balance for s in result.snapshots] == [api.balance(o.id) for o in organizations]
    # Each key is asked once which org it belongs to (not once per worker looking for its
    # own org), then each org is read: once per process.
    assert result.requests == ORG_COUNT + len(organizations)
    assert again.requests == len(organizations)


def test_an_org_without_a_key_is_an_error_of_its_own(api: SimulatedApi, api_url: str) -> None:
    keys = api.keys()
    with make_client(api_url, token=TOKEN) as client:
        organizations = client.list_organizations().organizations[:3]
    with make_client(api_url, keys=(keys[organizations[0].id],)) as client:
        result = client.read_balances(organizations)
    assert [s.id for s in result.snapshots] == [organizations[0].id]
    assert [e.org_id for e in result.errors] == [org.id for org in organizations[1:]]
    assert "no API key of POLLER_API_KEYS belongs to it" in result.errors[0].message


def test_a_403_and_a_404_fail_those_orgs_only(api: SimulatedApi, api_url: str) -> None:
    with make_client(api_url, token=TOKEN) as client:
        organizations = client.list_organizations().organizations
        denied, missing = organizations[3].id, organizations[7].id
        api.add_fault(Fault("status", org_id=denied, endpoint="billing", status=403))
        api.add_fault(Fault("status", org_id=missing, endpoint="billing", status=404))
        result = client.read_balances(organizations)
    assert result.errors == [
        OrgError(
            denied,
            f"organization {denied}: billing info: the Cekura API rejected the API token (403): "
            "Simulated 403 Forbidden.",
        ),
        OrgError(
            missing,
            f"organization {missing}: billing info: "
            "GET /test_framework/billing/info/: not found (404)",
        ),
    ]
    assert {s.id for s in result.snapshots} == set(api.org_ids()) - {denied, missing}
    assert result.requests == ORG_COUNT  # neither is retried


def test_a_key_reads_the_org_the_token_is_refused(api: SimulatedApi, api_url: str) -> None:
    org_id = api.org_ids()[4]
    with make_client(api_url, token=TOKEN, keys=(api.keys()[org_id],)) as client:
        organizations = client.list_organizations().organizations
        api.add_fault(Fault("status", org_id=org_id, endpoint="billing", status=403, times=1))
        result = client.read_balances(organizations)
    assert result.errors == []
    assert_matches_simulator(api, result.snapshots)


def test_cancel_ends_every_read_as_an_error(api: SimulatedApi, api_url: str) -> None:
    with make_client(api_url, token=TOKEN) as client:
        organizations = client.list_organizations().organizations
    api.add_fault(Fault("latency", endpoint="billing", seconds=5.0))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with make_client(api_url, token=TOKEN, read_timeout=10.0) as client:
        result = client.read_balances(organizations, cancel=stop)
    assert time.monotonic() - started < 2.0
    assert result.snapshots == []
    assert [e.org_id for e in result.errors] == [org.id for org in organizations]
    assert all(
        e.message.startswith(f"organization {e.org_id}: billing info: ") for e in result.errors
    )

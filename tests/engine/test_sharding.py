"""Sharding: the pure partition, the client's share of the API, and N replicas on one database."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from poller.cekura.client import CekuraClient
from poller.cli.main import cli
from poller.config.settings import ConfigError, Secret, Settings, load_settings
from poller.devtools.simulator import SimulatedApi, SimulatorServer
from poller.engine.sharding import Shard, parse_shard
from poller.store import open_database
from poller.store.schema import cycle_run
from tests.engine_world import TOKEN, World, poller_env, run_poller

# --- the partition -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shard"),
    [("1/1", Shard(1, 1)), ("2/3", Shard(2, 3)), (" 3 / 3 ", Shard(3, 3)), ("7/16", Shard(7, 16))],
)
def test_a_shard_is_written_k_slash_n(text: str, shard: Shard) -> None:
    assert parse_shard(text) == shard
    assert str(shard) == text.replace(" ", "")


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("0/3", "shard number must be 1..3"),
        ("4/3", "shard number must be 1..3"),
        ("1/0", "number of shards must be 1..1024"),
        ("2", "is not K/N"),
        ("a/b", "is not K/N"),
        ("-1/3", "is not K/N"),
    ],
)
def test_a_bad_shard_is_refused_with_a_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_shard(text)


def test_the_shard_setting_names_itself_when_it_is_wrong() -> None:
    with pytest.raises(ConfigError, match="^POLLER_SHARD: the shard number must be 1..2"):
        load_settings(env={"POLLER_SHARD": "3/2"})
    assert load_settings(env={"POLLER_SHARD": "2/5"}).shard == Shard(2, 5)


@given(org_id=st.integers(min_value=1, max_value=2**53), count=st.integers(1, 64))
def test_every_org_belongs_to_exactly_one_shard(org_id: int, count: int) -> None:
    owners = [k for k in range(1, count + 1) if Shard(k, count).owns(org_id)]
    assert len(owners) == 1


def test_the_partition_is_the_same_in_every_process_and_version() -> None:
    # CRC-32 of the decimal id, pinned: a change here would move orgs between running replicas.
    assert [org_id for org_id in range(1, 13) if Shard(1, 3).owns(org_id)] == [7, 9, 10, 11, 12]


def test_sequential_ids_spread_evenly() -> None:
    counts = Counter(
        next(k for k in range(1, 4) if Shard(k, 3).owns(org_id)) for org_id in range(1, 30_001)
    )
    assert all(9_000 <= count <= 11_000 for count in counts.values()), counts


# --- the client reads only its share ---------------------------------------------------------


@pytest.fixture
def sim() -> SimulatorServer:
    api = SimulatedApi.generate(orgs=30, seed=9, token=TOKEN)
    with SimulatorServer(api) as server:
        yield server


def test_with_the_token_a_shard_asks_for_the_billing_of_its_own_orgs_only(sim) -> None:
    shard = Shard(2, 3)
    settings = Settings(api_url=sim.url, api_token=Secret(TOKEN), shard=shard)
    with CekuraClient(settings) as client:
        result = client.fetch_snapshots()
    mine = [org_id for org_id in sim.api.org_ids() if shard.owns(org_id)]
    assert [s.id for s in result.snapshots] == mine
    assert sim.api.request_counts()["billing"] == len(mine)


def test_with_api_keys_a_shard_reads_only_its_own_orgs(sim) -> None:
    shard = Shard(1, 3)
    keys = tuple(Secret(key) for key in sim.api.keys().values())
    settings = Settings(api_url=sim.url, api_keys=keys, shard=shard)
    with CekuraClient(settings) as client:
        first = client.fetch_snapshots()
        # An org-scoped key's org never changes: the next cycle skips other shards' keys.
        before = sim.api.request_counts()["billing"]
        client.fetch_snapshots()
        second_cycle_billing = sim.api.request_counts()["billing"] - before
    mine = [org_id for org_id in sim.api.org_ids() if shard.owns(org_id)]
    assert [s.id for s in first.snapshots] == mine and first.errors == []
    assert sim.api.request_counts()["retrieve"] == 2 * len(mine)
    assert second_cycle_billing == len(mine)


def test_check_of_one_org_works_whatever_the_shard(sim) -> None:
    org_id = next(i for i in sim.api.org_ids() if not Shard(1, 2).owns(i))
    settings = Settings(api_url=sim.url, api_token=Secret(TOKEN), shard=Shard(1, 2))
    with CekuraClient(settings) as client:
        result = client.fetch_snapshots(only_org=org_id)
    assert [s.id for s in result.snapshots] == [org_id]


# --- three replicas (and a fourth with another N) against one database -------------------------


def test_three_overlapping_shards_handle_every_org_once_and_email_each_breach_once(
    database_url: str, smtp_server
) -> None:
    api = SimulatedApi.generate(orgs=45, seed=12, token=TOKEN)
    for org_id in api.org_ids():  # every org alertable, none below yet
        api.update_org(
            org_id,
            notify_low_credits=True,
            is_send_emails_enabled=True,
            low_credits_threshold="1000.00",
            members=[{"name": "Ops", "email": f"ops@org-{org_id}.example"}],
        )
        api.set_balance(org_id, "5000.00")
    with SimulatorServer(api) as sim:
        env = poller_env(sim.url, database_url, smtp_server.port)
        baseline = World(sim=sim, store=open_database(database_url), env=env)
        assert baseline.cycle(baseline=True, deliver=False).ok
        baseline.store.close()
        dropped = api.org_ids()[::3]
        for org_id in dropped:
            api.set_balance(org_id, Decimal("1.00"))

        # 1/3, 2/3, 3/3 at once, plus a replica still on the old "1/1" layout (a rollout).
        shards = ["1/3", "2/3", "3/3", "1/1"]
        with ThreadPoolExecutor(len(shards)) as pool:
            runs = list(pool.map(lambda s: run_poller(env, "once", "--shard", s), shards))
        billing_requests = api.request_counts()["billing"]

    summaries = {}
    for shard, run in zip(shards, runs, strict=True):
        # Exit 1 is allowed: a replica may finish while another's emails are still pending.
        assert run.returncode in (0, 1), (shard, run.stderr)
        [summaries[shard]] = [
            json.loads(line) for line in run.stderr.splitlines() if '"cycle.finished"' in line
        ]
        assert summaries[shard]["orgs_failed"] == 0 and summaries[shard]["emails_failed"] == 0
    emailed = Counter(
        int(m.rcpt_tos[0].split("@org-")[1].split(".")[0]) for m in smtp_server.received
    )
    assert emailed == Counter({org_id: 1 for org_id in dropped})
    # Baseline read 45, the three shards 45 together, the old-layout replica 45 more.
    assert billing_requests == 45 * 3

    assert sum(summaries[shard]["orgs_read"] for shard in shards[:3]) == 45
    assert summaries["1/1"]["orgs_read"] == 45
    store = open_database(database_url)
    try:
        with store.engine.connect() as connection:
            recorded = sorted(
                s for s in connection.execute(select(cycle_run.c.shard)).scalars() if s
            )
    finally:
        store.close()
    assert recorded == ["1/1", "1/3", "2/3", "3/3"]


def test_a_bad_shard_flag_is_a_usage_error_in_one_line() -> None:
    result = CliRunner().invoke(cli, ["once", "--shard", "4/3"], env={"POLLER_API_TOKEN": "t"})
    assert result.exit_code == 2
    assert "Invalid value for '--shard': the shard number must be 1..3 (got 4)" in result.output
    assert "Traceback" not in result.output

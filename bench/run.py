"""`python -m bench`: full `poller once` cycles against a simulated fleet, measured from outside.

Two scenarios, each against a simulator process of its own, a local SMTP capture and a fresh
database (docs/benchmarks.md says what each column means):

- the table, per size N and database: ``poller once --baseline`` (first sight), ``cycles - 1``
  cycles after moving ``--drop-percent`` of the orgs below any threshold (changes), and one
  cycle with no balance change (unchanged); the rate cap is off;
- the wide area, at ``--wide-area-orgs``: every billing read answered after 50 ms, one cycle
  with poller's default settings and one at concurrency 64 without a cap, each beside the
  least time its settings allow.

Then the issue's targets, each with its measured value and whether it is met.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.report import Row, WideAreaRow, phases, write_report
from poller.config.settings import Settings
from poller.devtools.smtp_capture import SmtpCapture

TOKEN = "bench-token-0123456789"
MAIL_FROM = "bench@poller.example.com"
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
DEFAULTS = Settings()
WIDE_AREA_LATENCY = 0.05  # seconds the simulator holds back every billing answer
WIDE_AREA_CONCURRENCY = 64


@dataclass
class Simulator:
    url: str
    org_ids: list[int]
    pid: int
    facts: list[dict] = field(default_factory=list)  # bench.simulator_process.org_facts

    def cpu_seconds(self) -> float:
        """User + system CPU the simulator process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def simulator_process(
    orgs: int, workdir: Path, *, seed: int = 1, facts: bool = False
) -> Iterator[Simulator]:
    """The simulator in its own process; ``facts``: also read each organization's facts."""
    ids_file = workdir / "ids.txt"
    facts_file = workdir / "orgs.json"
    command = [
        sys.executable,
        "-m",
        "bench.simulator_process",
        "--orgs",
        str(orgs),
        "--seed",
        str(seed),
        "--token",
        TOKEN,
        "--ids-file",
        str(ids_file),
    ]
    if facts:
        command += ["--orgs-file", str(facts_file)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        if line[:1] != ["ready"]:
            raise RuntimeError("the simulator process did not start")
        org_ids = [int(text) for text in ids_file.read_text(encoding="ascii").split()]
        known = json.loads(facts_file.read_text(encoding="utf-8")) if facts else []
        yield Simulator(url=line[1], org_ids=org_ids, pid=process.pid, facts=known)
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def database(kind: str, workdir: Path, postgres_url: str | None) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    if not postgres_url:
        raise SystemExit("bench: --db postgresql needs --postgres-url or POLLER_TEST_DATABASE_URL")
    import psycopg2
    from sqlalchemy.engine import make_url

    admin = make_url(postgres_url)
    name = f"poller_bench_{uuid.uuid4().hex[:12]}"
    connect = {
        "host": admin.host,
        "port": admin.port or 5432,
        "user": admin.username,
        "password": admin.password,
        "dbname": admin.database,
    }

    def execute(statement: str) -> None:
        connection = psycopg2.connect(**connect)
        connection.autocommit = True
        try:
            connection.cursor().execute(statement)
        finally:
            connection.close()

    execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class CycleRun:
    wall: float
    peak_rss_mb: float
    summary: dict
    requests: int
    cpu_seconds: float  # the poller process's own, user + system
    simulator_cpu_seconds: float


def run_cycle(env: dict[str, str], workdir: Path, sim: Simulator, *args: str) -> CycleRun:
    api_url = sim.url
    before = _request_count(api_url)
    simulator_before = sim.cpu_seconds()
    log_path = workdir / "poller.log"
    peak_path = workdir / "peak_rss_kib"
    peak_path.unlink(missing_ok=True)  # a child that dies before its atexit hook leaves none
    with open(log_path, "w") as log_file:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.peak_rss", str(peak_path), "poller", "once", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        # wait4: this child's own CPU time (its peak memory comes from bench.peak_rss).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    summaries = [
        json.loads(line) for line in log_path.read_text().splitlines() if '"cycle.finished"' in line
    ]
    if not summaries:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"poller once {' '.join(args)} exited {process.returncode}:\n{tail}")
    if not peak_path.exists():
        raise RuntimeError(f"poller once {' '.join(args)} exited without reporting its peak RSS")
    peak_rss_mb = int(peak_path.read_text(encoding="ascii")) / 1024
    return CycleRun(
        wall=wall,
        peak_rss_mb=peak_rss_mb,
        summary=summaries[-1],
        requests=_request_count(api_url) - before,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        simulator_cpu_seconds=sim.cpu_seconds() - simulator_before,
    )


def _request_count(api_url: str) -> int:
    return sum(requests.get(api_url + "/_sim/requests", timeout=30).json().values())


def drop_balances(api_url: str, org_ids: list[int]) -> None:
    """Move these orgs to 1.00 credits: below every threshold the simulator generates."""
    with requests.Session() as session, ThreadPoolExecutor(8) as pool:

        def drop(org_id: int) -> None:
            response = session.post(
                f"{api_url}/_sim/orgs/{org_id}", json={"credits_remaining": "1.00"}, timeout=30
            )
            response.raise_for_status()

        list(pool.map(drop, org_ids))


def add_billing_latency(api_url: str, seconds: float) -> None:
    """From now on the simulator answers every billing read ``seconds`` late."""
    response = requests.post(
        api_url + "/_sim/faults",
        json={"kind": "latency", "endpoint": "billing", "seconds": seconds},
        timeout=30,
    )
    response.raise_for_status()


def poller_env(
    api_url: str,
    database_url: str,
    smtp_port: int,
    *,
    concurrency: int | None,
    max_requests_per_second: float | None,
) -> dict[str, str]:
    """The environment of ``poller once``: None leaves that setting at poller's default."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
    env = {
        **clean,
        "POLLER_API_URL": api_url,
        "POLLER_API_TOKEN": TOKEN,
        "POLLER_DATABASE_URL": database_url,
        "POLLER_SMTP_HOST": "127.0.0.1",
        "POLLER_SMTP_PORT": str(smtp_port),
        "POLLER_SMTP_SECURITY": "none",
        "POLLER_MAIL_FROM": MAIL_FROM,
        "POLLER_LOG_FORMAT": "json",
    }
    if concurrency is not None:
        env["POLLER_CONCURRENCY"] = str(concurrency)
    if max_requests_per_second is not None:
        env["POLLER_MAX_REQUESTS_PER_SECOND"] = f"{max_requests_per_second:g}"
    return env


def bench_one(orgs: int, db: str, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    rng = random.Random(orgs)
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        with (
            simulator_process(orgs, workdir) as sim,
            SmtpCapture() as smtp,
            database(db, workdir, args.postgres_url) as database_url,
        ):
            # The table measures poller's own cost: the client-side cap would dominate it.
            env = poller_env(
                sim.url,
                database_url,
                smtp.port,
                concurrency=args.concurrency,
                max_requests_per_second=0,
            )

            def record(kind: str, run: CycleRun) -> None:
                rows.append(
                    Row.from_cycle(
                        orgs,
                        db,
                        kind,
                        wall=run.wall,
                        peak_rss_mb=run.peak_rss_mb,
                        summary=run.summary,
                        requests=run.requests,
                        cpu_seconds=run.cpu_seconds,
                        simulator_cpu_seconds=run.simulator_cpu_seconds,
                    )
                )
                print(rows[-1].one_line(), file=sys.stderr, flush=True)

            record("first sight", run_cycle(env, workdir, sim, "--baseline"))
            untouched = list(sim.org_ids)
            rng.shuffle(untouched)
            per_cycle = max(1, round(orgs * args.drop_percent / 100))
            for _ in range(args.cycles - 1):
                dropped, untouched = untouched[:per_cycle], untouched[per_cycle:]
                drop_balances(sim.url, dropped)
                record("changes", run_cycle(env, workdir, sim))
            record("unchanged", run_cycle(env, workdir, sim))
    return rows


def bench_wide_area(orgs: int, db: str, args: argparse.Namespace) -> list[WideAreaRow]:
    """Two unchanged cycles against slow billing reads: poller's defaults, then 64 uncapped."""
    # (name, concurrency, cap): None leaves the setting unset, at poller's default.
    scenarios: list[tuple[str, int | None, float | None]] = [
        ("defaults", None, None),
        ("concurrency 64, no cap", WIDE_AREA_CONCURRENCY, 0.0),
    ]
    rows: list[WideAreaRow] = []
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        with (
            simulator_process(orgs, workdir) as sim,
            SmtpCapture() as smtp,
            database(db, workdir, args.postgres_url) as database_url,
        ):

            def env(concurrency: int | None, cap: float | None) -> dict[str, str]:
                return poller_env(
                    sim.url,
                    database_url,
                    smtp.port,
                    concurrency=concurrency,
                    max_requests_per_second=cap,
                )

            # First sight at full speed, so that the measured cycles are ordinary ones.
            run_cycle(env(args.concurrency, 0), workdir, sim, "--baseline")
            add_billing_latency(sim.url, WIDE_AREA_LATENCY)
            for name, concurrency, cap in scenarios:
                run = run_cycle(env(concurrency, cap), workdir, sim)
                rows.append(
                    WideAreaRow(
                        scenario=name,
                        orgs=orgs,
                        db=db,
                        concurrency=DEFAULTS.concurrency if concurrency is None else concurrency,
                        max_requests_per_second=(
                            DEFAULTS.max_requests_per_second if cap is None else cap
                        ),
                        latency=WIDE_AREA_LATENCY,
                        wall=run.wall,
                        phases=phases(run.summary),
                        requests=run.requests,
                        cpu_seconds=run.cpu_seconds,
                        peak_rss_mb=run.peak_rss_mb,
                    )
                )
                print(rows[-1].one_line(), file=sys.stderr, flush=True)
    return rows


def add_output_options(parser: argparse.ArgumentParser, output: Path) -> None:
    """--postgres-url and --output, as every benchmark takes them."""
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("POLLER_TEST_DATABASE_URL"),
        help="server to create a scratch database on",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=output,
        help="Markdown file whose generated section is replaced (default docs/benchmarks.md)",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--orgs",
        type=int,
        action="append",
        help="fleet size of the table; repeat for several (default 1000, 10000, 100000)",
    )
    parser.add_argument(
        "--db",
        choices=["sqlite", "postgresql"],
        action="append",
        help="database; repeat for both (default both; the wide area runs on the first)",
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=2,
        help="measured cycles after first sight; the last has no changes (>= 1)",
    )
    parser.add_argument(
        "--drop-percent",
        type=float,
        default=3.0,
        help="orgs moved below their threshold before each changing cycle",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULTS.concurrency,
        help=f"poller's workers in the table (default {DEFAULTS.concurrency}, poller's default)",
    )
    parser.add_argument(
        "--wide-area-orgs",
        type=int,
        default=5_000,
        help="fleet size of the wide-area run (default 5000; 0 skips it)",
    )
    add_output_options(parser, DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    if args.wide_area_orgs < 0 or any(orgs < 1 for orgs in args.orgs or []):
        parser.error("fleet sizes must be positive (--wide-area-orgs 0 skips the wide area)")
    sizes = args.orgs or [1_000, 10_000, 100_000]
    dbs = args.db or ["sqlite", "postgresql"]
    wide = bench_wide_area(args.wide_area_orgs, dbs[0], args) if args.wide_area_orgs else []
    rows = [row for orgs in sizes for db in dbs for row in bench_one(orgs, db, args)]
    print(write_report(rows, wide, args.output, argv if argv is not None else sys.argv[1:]))

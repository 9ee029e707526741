"""Operator commands: `health` (for cron and probes), `requeue`, `db upgrade`, `simulate`."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import click

from poller.cli.common import EXIT_USAGE, fail, open_store
from poller.cli.terminal import echo
from poller.config.settings import Settings
from poller.engine.health import judge, judge_reads
from poller.store import upgrade_database


@click.command()
@click.option(
    "--failed",
    is_flag=True,
    required=True,
    help="Requeue failed notifications and the failed recipients of sent ones.",
)
@click.option("--org", "org_id", type=int, help="Only this organization's notifications.")
@click.pass_obj
def requeue(settings: Settings, failed: bool, org_id: int | None) -> None:
    """Put failed emails back to pending, due at once, and say how many.

    A notification is failed when the SMTP server refused every recipient for good; a sent
    one may still have failed recipients. Once the address (in Cekura) or the server is
    fixed, this sends each of them again at the next delivery (`poller once`, or the
    daemon's next cycle), with the same Message-ID; recipients who have it get nothing more.

    \b
    Example:
      poller requeue --failed --org 37 && poller once
    """
    store = open_store(settings)
    rows, recipients = store.requeue_failed(datetime.now(UTC), org_id)
    click.echo(
        f"requeued {rows} notification{'s' if rows != 1 else ''} "
        f"({recipients} recipient{'s' if recipients != 1 else ''})"
    )


@click.group()
def db() -> None:
    """Manage the alert-state database schema.

    \b
    Example (after installing a new version):
      poller db upgrade
    """


@db.command()
@click.pass_obj
def upgrade(settings: Settings) -> None:
    """Bring the database schema up to date (safe to run repeatedly).

    \b
    Example:
      POLLER_DATABASE_URL=postgresql://poller@db/poller poller db upgrade
    """
    before, after = upgrade_database(settings.database_url)
    if before == after:
        echo(f"database schema already at revision {after}")
    else:
        echo(f"database schema upgraded from {before or 'empty'} to {after}")


@click.command()
@click.option("--orgs", default=50, show_default=True, help="Generated organizations.")
@click.option("--port", default=8765, show_default=True, help="Port on 127.0.0.1.")
@click.option(
    "--token",
    default=None,
    help="Bearer token accepted as an admin of every organization "
    "[default: the seed file's token, else sim-token].",
)
@click.option(
    "--keys-file", metavar="FILE", help="Write one org-scoped API key per line: '<org id> <key>'."
)
@click.option("--seed", default=0, show_default=True, help="Makes the generated data reproducible.")
@click.option(
    "--seed-file", metavar="JSON", help="Serve these organizations instead of generated ones."
)
@click.option(
    "--usage-scale",
    type=click.FloatRange(min=0, min_open=True),
    metavar="X",
    help="Burn credits in real time, X times faster than real usage (the usage model, with "
    "--seed; docs/simulator.md) [default: balances change only when set].",
)
def simulate(
    orgs: int,
    port: int,
    token: str | None,
    keys_file: str | None,
    seed: int,
    seed_file: str | None,
    usage_scale: float | None,
) -> None:
    """Serve a stand-in of the Cekura API on 127.0.0.1 (no account needed).

    \b
    Example:
      poller simulate --orgs 50 --port 8765 --token sim-token &
      POLLER_API_URL=http://127.0.0.1:8765 POLLER_API_TOKEN=sim-token poller check --org 1 --dry-run
    """
    try:
        from poller.devtools.simulator import SimulatorError, run_simulator
    except ModuleNotFoundError as exc:  # aiohttp: not in a plain install
        if (exc.name or "").startswith("poller"):
            raise
        fail("the simulator needs the devtools extra: pip install 'poller[devtools]'", EXIT_USAGE)
    try:
        run_simulator(
            orgs=orgs,
            port=port,
            token=token,
            seed=seed,
            keys_file=keys_file,
            seed_file=seed_file,
            usage_scale=usage_scale,
        )
    except SimulatorError as exc:
        fail(str(exc), EXIT_USAGE)


@click.command()
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Healthy while the last successful cycle is younger than this "
    "[default: twice POLLER_INTERVAL].",
)
@click.pass_obj
def health(settings: Settings, max_age: float | None) -> None:
    """Say whether a successful cycle finished recently, from the database's cycle history.

    Exit status 0 healthy, 1 unhealthy (with the reason). A successful cycle read the
    organization list and at least one balance. Emails held back by a problem that is not
    about their recipients (SMTP server down, login or sender refused) make it unhealthy
    too. A last successful cycle longer than POLLER_INTERVAL is an overrun: healthy with
    "overrun" in the reason, unhealthy beyond twice the interval (with cron, set
    POLLER_INTERVAL to the schedule's period). On the adaptive schedule the cycle is the
    listing, and reads overdue by more than max_read_interval are unhealthy too. Works for
    cron setups, where no daemon serves /healthz; with several pollers on one database it
    covers all of them.

    \b
    Example (cron mails the reason when it is unhealthy):
      */5 * * * * poller health --max-age 900 >/dev/null
    """
    limit = max_age if max_age is not None else 2 * settings.interval
    store = open_store(settings)
    adaptive = settings.schedule == "adaptive"
    try:
        last = store.last_successful_run()
        held = store.held_back()
        queue = store.queue_stats(datetime.now(UTC)) if adaptive else None
    finally:
        store.close()
    verdict = judge(
        last[0] if last else None,
        now=datetime.now(UTC),
        max_age=limit,
        held=held,
        cycle_seconds=last[1] if last else None,
        interval=settings.interval,
    )
    if adaptive:
        verdict = judge_reads(verdict, queue, settings.max_read_interval)
    # Unhealthy goes to stderr, so cron (which mails any output) stays quiet with >/dev/null.
    echo(verdict.status_line, err=not verdict.healthy)
    sys.exit(0 if verdict.healthy else 1)

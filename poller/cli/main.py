"""The `poller` command line: the composition root that builds the pieces from settings and
maps outcomes to exit statuses (0 ok, 1 something was not read or not delivered, 2 usage or
configuration)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import click
from sqlalchemy.engine import make_url

from poller import __version__
from poller.cekura.client import ApiError, CekuraClient
from poller.cli.logs import configure_logging
from poller.cli.ops_commands import health, preview, send_test
from poller.cli.progress import terminal_progress
from poller.cli.terminal import echo, echo_json, safe_for_terminal
from poller.config.envfile import read_env_file
from poller.config.settings import ConfigError, Settings, load_settings
from poller.engine.cycle import CycleReport, run_cycle, warn_on_overrun
from poller.engine.decide import OrgPlan
from poller.engine.delivery import Deliverer
from poller.engine.forecast import BEYOND_HORIZON, MIN_POINTS, MIN_SPAN, Window
from poller.engine.notices import content_for
from poller.engine.outcomes import delivery_summary
from poller.engine.outlook import Outlook, outlooks
from poller.engine.sharding import Shard, parse_shard
from poller.mail.message import (
    format_amount,
    format_credits,
    format_detected_at,
    format_rate,
    format_runway,
    render_email,
)
from poller.store import (
    DatabaseError,
    SchemaOutdated,
    StatusRow,
    Store,
    open_database,
    upgrade_database,
)

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2

# The API's own rule for low_credits_threshold (DRF DecimalField, max_digits=10, places=2).
THRESHOLD_PATTERN = re.compile(r"^\d{1,8}(\.\d{1,2})?$")


class PollerGroup(click.Group):
    """Turns the errors a user can cause or fix into one line and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, SchemaOutdated) as exc:
            _fail(str(exc), EXIT_USAGE)
        except (ApiError, DatabaseError) as exc:
            _fail(str(exc), EXIT_INCOMPLETE)


def _fail(message: str, status: int) -> None:
    echo(f"poller: error: {message}", err=True)
    sys.exit(status)


@click.group(cls=PollerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="poller")
@click.option(
    "--config", "config_path", metavar="PATH", help="TOML settings file (or POLLER_CONFIG)."
)
@click.option(
    "--env-file",
    metavar="PATH",
    envvar="POLLER_ENV_FILE",
    help="NAME=VALUE lines in systemd's EnvironmentFile= format; the environment wins "
    "(or POLLER_ENV_FILE).",
)
@click.option("--api-url", help="Cekura API base URL (POLLER_API_URL).")
@click.option(
    "--database-url", help="SQLAlchemy URL of the alert-state database (POLLER_DATABASE_URL)."
)
@click.option("--log-format", type=click.Choice(["json", "console"]), help="POLLER_LOG_FORMAT.")
@click.option("-v", "--verbose", count=True, help="More log output (debug).")
@click.option("-q", "--quiet", count=True, help="Less log output (-q warnings, -qq errors).")
@click.pass_context
def cli(
    ctx: click.Context, config_path, env_file, api_url, database_url, log_format, verbose, quiet
) -> None:
    """Email an organization's admins once when its Cekura credits drop below its threshold.

    \b
    Example:
      POLLER_API_TOKEN=... POLLER_MAIL_FROM=alerts@example.com poller once
    """
    if env_file:
        # Into the process environment, as systemd would put them (so HTTPS_PROXY etc. work
        # too), but only where a variable is not already set: the environment wins.
        for name, value in read_env_file(env_file).items():
            os.environ.setdefault(name, value)
    flags = {"api_url": api_url, "database_url": database_url, "log_format": log_format}
    settings = load_settings(flags=flags, config_path=config_path)
    secrets = [key.reveal() for key in settings.api_keys]
    secrets += [s.reveal() for s in (settings.api_token, settings.smtp_password) if s]
    # A password inside the database URL is a secret too (config validated the URL already).
    database_password = make_url(settings.database_url).password
    if database_password:
        secrets.append(str(database_password))
    configure_logging(log_format=settings.log_format, verbosity=verbose - quiet, secrets=secrets)
    for warning in settings.warnings:
        echo(f"poller: warning: {warning}", err=True)
    ctx.obj = settings


def _open_store(settings: Settings) -> Store:
    return open_database(settings.database_url)


def _run(
    settings: Settings, *, deliver: bool, show_progress: bool = False, **cycle_args: Any
) -> CycleReport:
    store = _open_store(settings)
    deliverer = Deliverer(store=store, settings=settings) if deliver else None
    progress = terminal_progress() if show_progress else None
    with CekuraClient(settings, on_progress=progress) as client:
        return run_cycle(
            settings=settings, client=client, store=store, deliverer=deliverer, **cycle_args
        )


def _shard_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Shard | None:
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


shard_option = click.option(
    "--shard",
    metavar="K/N",
    callback=_shard_option,
    help="Handle only this replica's share of the organizations (POLLER_SHARD), e.g. 2/3.",
)


def _sharded(settings: Settings, shard: Shard | None) -> Settings:
    return settings if shard is None else dataclasses.replace(settings, shard=shard)


@cli.command()
@click.option(
    "--baseline",
    is_flag=True,
    help="Record every organization's current state without sending anything.",
)
@shard_option
@click.pass_obj
def once(settings: Settings, baseline: bool, shard: Shard | None) -> None:
    """Run one full cycle: fetch every organization, diff, persist, deliver.

    Exit status 0 when every organization was read and every due email delivered, 1 when
    something is left for the next run, 2 for usage or configuration errors.

    \b
    Example (first deployment, then every 5 minutes from cron):
      poller once --baseline
      poller once
    """
    from poller.engine.daemon import in_worker_thread, stop_on_signals

    settings = _sharded(settings, shard)
    settings.require_credentials()
    if not baseline:
        settings.require_mail_from()
    # As the daemon does: stop at the next safe point, nothing half-written; the next run
    # carries on. A second signal exits at once.
    cancel = threading.Event()
    stop_on_signals(cancel, cancel, forced_status=EXIT_INCOMPLETE)
    report = in_worker_thread(
        lambda: _run(
            settings, deliver=not baseline, show_progress=True, baseline=baseline, cancel=cancel
        )
    )
    warn_on_overrun(report, settings.interval, scheduled=False)
    if cancel.is_set():
        _fail(
            "stopped by a signal before the cycle finished (nothing was left half-written)",
            EXIT_INCOMPLETE,
        )
    if report.fatal:
        # Cron mails stderr: say in one line why nothing happened, not only in the JSON log.
        _fail(f"{report.fatal} (nothing was changed)", EXIT_INCOMPLETE)
    sys.exit(EXIT_OK if report.ok else EXIT_INCOMPLETE)


@cli.command()
@click.option(
    "--baseline",
    is_flag=True,
    help="First cycle records the current state without sending anything.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="Serve Prometheus /metrics and /healthz on PORT (POLLER_METRICS_PORT).",
)
@shard_option
@click.pass_obj
def run(settings: Settings, baseline: bool, metrics_port: int | None, shard: Shard | None) -> None:
    """Run as a daemon: a cycle at start and every POLLER_INTERVAL seconds.

    SIGTERM or Ctrl-C stops after the current step; a second one stops at once.

    \b
    Example (the second of three replicas, with metrics):
      POLLER_INTERVAL=300 poller run --shard 2/3 --metrics-port 9102
    """
    from poller.cli.metrics import MetricsServer, PollerMetrics
    from poller.engine.daemon import run_daemon

    settings = _sharded(settings, shard)
    settings.require_credentials()
    settings.require_mail_from()
    store = _open_store(settings)
    deliverer = Deliverer(store=store, settings=settings)
    first = {"baseline": baseline}
    port = metrics_port or settings.metrics_port
    metrics = PollerMetrics(interval=settings.interval) if port else None
    serving = (
        MetricsServer(metrics, settings.metrics_host, port)
        if metrics is not None and port
        else contextlib.nullcontext()
    )
    hooks = {"on_request": metrics.count_request} if metrics is not None else {}

    with serving, CekuraClient(settings, on_progress=terminal_progress(), **hooks) as client:

        def cycle(cancel) -> CycleReport:
            use_baseline, first["baseline"] = first["baseline"], False
            report = run_cycle(
                settings=settings,
                client=client,
                store=store,
                deliverer=None if use_baseline else deliverer,
                baseline=use_baseline,
                cancel=cancel,
            )
            overran = warn_on_overrun(report, settings.interval, scheduled=True)
            if metrics is not None:
                metrics.record_cycle(report, store, overran=overran)
            return report

        run_daemon(cycle, interval=settings.interval, jitter=settings.jitter)


@cli.command()
@click.option("--org", "org_id", type=int, required=True, help="Organization id.")
@click.option(
    "--dry-run", is_flag=True, help="Print the decision and the email; write and send nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def check(settings: Settings, org_id: int, dry_run: bool, as_json: bool) -> None:
    """Run the cycle for one organization and say what it did.

    \b
    Example:
      poller check --org 37 --dry-run
    """
    settings.require_credentials()
    if not dry_run:
        settings.require_mail_from()
    report = _run(settings, deliver=not dry_run, only_org=org_id, dry_run=dry_run)
    if report.fatal or not report.plans:
        reason = report.fatal or "; ".join(e.message for e in report.errors) or "not found"
        _fail(f"organization {org_id} could not be read: {reason}", EXIT_INCOMPLETE)
    plan = report.plans[0]
    email = _email_preview(plan, settings) if dry_run else None
    snap = plan.snapshot
    outlook = outlooks(
        _open_store(settings),
        settings,
        [(snap.id, snap.balance, snap.threshold, report.started_at)],
    )[snap.id]
    if as_json:
        echo_json(_plan_json(plan, report, dry_run, email) | _outlook_json(outlook))
    else:
        _print_plan(plan, report, dry_run, email, outlook)
    sys.exit(EXIT_OK if report.ok else EXIT_INCOMPLETE)


def _email_preview(plan: OrgPlan, settings: Settings) -> dict[str, Any] | None:
    notification = plan.notification
    if notification is None:
        return None
    content = content_for(
        plan.snapshot,
        kind="low_credits",
        number=notification.breach_number,
        billing_url=settings.billing_url,
        now=notification.detected_at,
    )
    rendered = render_email(
        dataclasses.replace(
            content, burn_per_day=notification.burn_per_day, runs_out_at=notification.runs_out_at
        )
    )
    return {
        "to": list(notification.recipients),
        "subject": rendered.subject,
        "text": rendered.text,
        "status": notification.status,
    }


def _plan_json(
    plan: OrgPlan, report: CycleReport, dry_run: bool, email: dict[str, Any] | None
) -> dict[str, Any]:
    snap = plan.snapshot
    return {
        "org_id": snap.id,
        "name": snap.name,
        "balance": str(snap.balance),
        "threshold": str(snap.threshold),
        "enabled": snap.enabled,
        "state_before": plan.before.state.value if plan.before else None,
        "state": plan.decision.state.value,
        "breach_count": plan.decision.breach_count,
        "action": report.action(plan),
        "dry_run": dry_run,
        "email": email,
    }


def _print_plan(
    plan: OrgPlan,
    report: CycleReport,
    dry_run: bool,
    email: dict[str, Any] | None,
    outlook: Outlook,
) -> None:
    snap = plan.snapshot
    before = plan.before.state.value if plan.before else "new"
    rows = [
        ("organization", f"{snap.name} (id {snap.id})"),
        ("balance", format_credits(snap.balance)),
        ("threshold", format_credits(snap.threshold)),
        ("alerts enabled", "yes" if snap.enabled else "no"),
        ("state", f"{before} -> {plan.decision.state.value}"),
        ("breaches so far", str(plan.decision.breach_count)),
        ("action", ("would be: " if dry_run else "") + report.action(plan)),
        ("burn rate", _rate_text(outlook)),
        ("runs out", _runs_out_text(outlook)),
    ]
    for label, value in rows:
        echo(f"{label:>16}: {value}")
    if email is not None:
        echo(f"\nTo: {', '.join(email['to']) or '(nobody)'}\nSubject: {email['subject']}\n")
        echo(email["text"])


@cli.command()
@click.option("--org", "org_id", type=int, required=True, help="Organization id.")
@click.option(
    "--enable/--disable", "enable", default=None, help="Turn low-credit emails on or off."
)
@click.option(
    "--threshold",
    metavar="AMOUNT",
    help="Alert when credits drop below AMOUNT; 'suggest' uses the advice of "
    "`poller status` (ADVICE_DAYS days of typical usage).",
)
@click.pass_obj
def configure(settings: Settings, org_id: int, enable: bool | None, threshold: str | None) -> None:
    """Change an organization's low-credit alert settings through the Cekura API.

    \b
    Examples:
      poller configure --org 37 --enable --threshold 2500
      poller configure --org 37 --threshold suggest
    """
    changes: dict[str, Any] = {}
    if threshold is not None and threshold.strip().lower() == "suggest":
        changes["low_credits_threshold"] = str(_suggested_threshold(settings, org_id))
    elif threshold is not None:
        changes["low_credits_threshold"] = str(parse_threshold(threshold))
    if enable is not None:
        changes["notify_low_credits"] = enable
    if not changes:
        raise click.UsageError("nothing to change: give --enable, --disable or --threshold")
    settings.require_credentials()
    with CekuraClient(settings) as client:
        org = client.patch_organization(org_id, changes)
    echo(
        f"{org.name} (id {org.id}): low-credit emails "
        f"{'on' if org.notify_low_credits else 'off'}, "
        f"threshold {format_credits(org.low_credits_threshold)}"
    )


def _suggested_threshold(settings: Settings, org_id: int) -> Decimal:
    outlook = _outlook_for(settings, org_id)
    suggestion = outlook.suggested_threshold
    if suggestion is None:
        _fail(
            f"no threshold to suggest for organization {org_id}: "
            f"{_no_estimate_reason(outlook.forecast.week)}",
            EXIT_INCOMPLETE,
        )
    assert suggestion is not None
    return suggestion


def _outlook_for(settings: Settings, org_id: int) -> Outlook:
    """The stored outlook of one org (from the database, as of its last check)."""
    store = _open_store(settings)
    row = next((r for r in store.status_rows() if r.org_id == org_id), None)
    if row is None:
        _fail(
            f"organization {org_id} is not in the database yet: run `poller once` or "
            f"`poller check --org {org_id}` first",
            EXIT_INCOMPLETE,
        )
    assert row is not None
    return outlooks(store, settings, [_outlook_key(row)])[org_id]


def _outlook_key(row: StatusRow) -> tuple[int, Decimal, Decimal, datetime]:
    return (row.org_id, row.balance, row.threshold, row.last_checked_at or row.changed_at)


def parse_threshold(text: str) -> Decimal:
    """Validate an amount as the API would, before any request is made."""
    cleaned = text.strip().replace(",", "").replace("_", "")
    try:
        amount = Decimal(cleaned)
    except InvalidOperation:
        raise click.BadParameter(f"{text!r} is not a number", param_hint="--threshold") from None
    if not THRESHOLD_PATTERN.match(cleaned):
        raise click.BadParameter(
            f"{text!r}: use a non-negative amount with at most 8 digits before the decimal "
            "point and 2 after it (e.g. 2500 or 499.50)",
            param_hint="--threshold",
        )
    return amount


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(settings: Settings, as_json: bool) -> None:
    """Show every organization poller knows: balance, threshold, state, last alert.

    \b
    Example:
      poller status --json | jq '.[] | select(.state == "alerted")'
    """
    store = _open_store(settings)
    rows = store.status_rows()
    outlook = outlooks(store, settings, [_outlook_key(row) for row in rows])
    if as_json:
        echo_json([_jsonable(row) | _outlook_json(outlook[row.org_id]) for row in rows])
        return
    if not rows:
        echo("no organizations recorded yet: run `poller once` first")
        return
    header = (
        "ID",
        "NAME",
        "BALANCE",
        "THRESHOLD",
        "ON",
        "STATE",
        "LAST CHECKED",
        "LAST ALERT",
        "DELIVERY",
        "BURN/DAY",
        "RUNS OUT",
        "ADVICE",
    )
    table = [header] + [_status_cells(row, outlook[row.org_id]) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _status_cells(row: StatusRow, outlook: Outlook) -> tuple[str, ...]:
    def when(value: Any) -> str:
        return value.strftime("%Y-%m-%d %H:%M") if value else "-"

    return (
        str(row.org_id),
        # Escaped before it is measured, so the columns line up with what the terminal shows.
        _shorten(safe_for_terminal(row.name), 30),
        format_amount(row.balance),
        format_amount(row.threshold),
        "yes" if row.enabled else "no",
        row.state.value,
        when(row.last_checked_at),
        when(row.last_alert_at),
        _delivery_text(row),
        "-" if outlook.forecast.rate is None else f"{outlook.forecast.rate:,.2f}",
        _runs_out_text(outlook) if outlook.forecast.rate is not None else "-",
        _advice_text(outlook),
    )


def _rate_text(outlook: Outlook) -> str:
    day, week = outlook.forecast.day, outlook.forecast.week
    if day.rate is None and week.rate is None:
        return f"no estimate ({_no_estimate_reason(week)})"
    parts = [
        f"{format_rate(rate)}/day over the last {label}"
        for label, rate in (("24 h", day.rate), ("7 days", week.rate))
        if rate is not None
    ]
    return "; ".join(parts)


def _runs_out_text(outlook: Outlook) -> str:
    prediction = outlook.forecast
    if prediction.balance <= 0:
        return "already out"
    if prediction.beyond_horizon:
        return BEYOND_HORIZON
    if prediction.runs_out_at is None or prediction.runway_days is None:
        return "no estimate"
    when = prediction.runs_out_at
    return f"{when:%Y-%m-%d} ({format_runway(prediction.runway_days)})"


def _advice_text(outlook: Outlook) -> str:
    if not outlook.threshold_too_low or outlook.suggested_threshold is None:
        return "-"
    return f"raise threshold to {outlook.suggested_threshold:,.2f}"


def _no_estimate_reason(window: Window) -> str:
    hours = window.covered.total_seconds() / 3600
    return (
        f"needs at least {MIN_SPAN.total_seconds() / 3600:g} h of history, {MIN_POINTS} "
        f"points and some usage; has {hours:.1f} h, {window.points} points, "
        f"{format_credits(window.used)} used"
    )


def _outlook_json(outlook: Outlook) -> dict[str, Any]:
    prediction = outlook.forecast

    def text(value: Decimal | None) -> str | None:
        return None if value is None else str(value.quantize(Decimal("0.01")))

    return {
        "burn_per_day_24h": text(prediction.day.rate),
        "burn_per_day_7d": text(prediction.week.rate),
        # Beyond the horizon a runway has no number (it may be too long to quantize) or date.
        "runway_days": None if prediction.beyond_horizon else text(prediction.runway_days),
        "runs_out_at": prediction.runs_out_at.isoformat() if prediction.runs_out_at else None,
        "runway_beyond_horizon": prediction.beyond_horizon,
        "threshold_too_low": outlook.threshold_too_low,
        "suggested_threshold": text(outlook.suggested_threshold),
    }


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _delivery_text(row: StatusRow) -> str:
    if row.notification_status is None:
        return "-"
    return delivery_summary(
        row.notification_status, row.notification_recipients, row.notification_deliveries or {}
    )


def _jsonable(row: StatusRow) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(row).items():
        if isinstance(value, Decimal):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    out["delivery"] = _delivery_text(row)
    return out


@cli.command()
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
    store = _open_store(settings)
    rows, recipients = store.requeue_failed(datetime.now(UTC), org_id)
    click.echo(
        f"requeued {rows} notification{'s' if rows != 1 else ''} "
        f"({recipients} recipient{'s' if recipients != 1 else ''})"
    )


@cli.command("forecast")
@click.option("--org", "org_id", type=int, required=True, help="Organization id.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def forecast_command(settings: Settings, org_id: int, as_json: bool) -> None:
    """Explain an organization's burn rate and runway from its recorded balance history.

    Reads only the database, as of the organization's last check.

    \b
    Example:
      poller forecast --org 37
    """
    outlook = _outlook_for(settings, org_id)
    if as_json:
        echo_json({"org_id": org_id} | _outlook_json(outlook))
        return
    prediction = outlook.forecast
    echo(
        f"organization {org_id}: {format_credits(prediction.balance)} as of "
        f"{format_detected_at(prediction.as_of)}"
    )
    for label, window in (("last 24 h", prediction.day), ("last 7 days", prediction.week)):
        echo(f"{label}: {_window_text(window)}")
    rate = prediction.rate
    if prediction.balance <= 0:
        echo("runway: none, the balance is at or below zero")
    elif rate is None:
        echo("runway: no estimate (neither window is meaningful)")
    else:
        source = "last 24 h" if prediction.day.rate is not None else "last 7 days"
        runway = (
            BEYOND_HORIZON
            if prediction.runs_out_at is None
            else f"{prediction.runway_days:.1f} days, runs out around "
            f"{format_detected_at(prediction.runs_out_at)}"
        )
        echo(
            f"runway: {format_credits(prediction.balance)} / "
            f"{format_rate(rate)}/day ({source}) = {runway}"
        )
    covered = outlook.covered_days
    if covered is not None and outlook.suggested_threshold is not None:
        verdict = (
            f"less than the {outlook.advice_days} days advised: suggest "
            f"{format_credits(outlook.suggested_threshold)} "
            f"(poller configure --org {org_id} --threshold suggest)"
            if outlook.threshold_too_low
            else "enough"
        )
        echo(
            f"threshold: {format_credits(outlook.threshold)} covers {covered:.1f} days "
            f"of typical usage, {verdict}"
        )


def _window_text(window: Window) -> str:
    hours = window.covered.total_seconds() / 3600
    summary = (
        f"{window.points} points over {hours:.1f} h, {format_credits(window.used)} used, "
        f"{window.topups} top-up(s) of {format_credits(window.topped_up)} excluded"
    )
    if window.rate is None:
        return f"{summary}; no rate ({_no_estimate_reason(window)})"
    return f"{summary}; {format_rate(window.rate)}/day"


@cli.group()
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


@cli.command()
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
def simulate(
    orgs: int, port: int, token: str | None, keys_file: str | None, seed: int, seed_file: str | None
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
        _fail("the simulator needs the devtools extra: pip install 'poller[devtools]'", EXIT_USAGE)
    try:
        run_simulator(
            orgs=orgs, port=port, token=token, seed=seed, keys_file=keys_file, seed_file=seed_file
        )
    except SimulatorError as exc:
        _fail(str(exc), EXIT_USAGE)


for _command in (preview, send_test, health):
    cli.add_command(_command)

main: Callable[[], Any] = cli

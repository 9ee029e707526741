"""Commands an operator uses around the poller: `preview`, `send-test` and `health`.

They are registered on the main group in poller.cli.main; settings arrive as the click context
object, and problems end the command with one line and an exit status (1 failed, 2 usage).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import NoReturn

import click

from poller.cekura.client import CekuraClient
from poller.cli.terminal import echo
from poller.config.settings import Settings
from poller.engine.delivery import smtp_transport
from poller.engine.health import judge
from poller.engine.model import Member, Organization, OrgSnapshot
from poller.engine.notices import content_for
from poller.mail.message import (
    AlertContent,
    DeliveryError,
    RenderedEmail,
    build_message,
    format_credits,
    message_id_for,
    render_email,
)
from poller.store import open_database

# Sample data for previews and test emails: plausible, and obviously not a real customer.
SAMPLE_ORG = Organization(
    id=4242,
    name="Example Voice Labs",
    notify_low_credits=True,
    low_credits_threshold=Decimal("1000.00"),
    send_emails_enabled=True,
    auto_refill=False,
    members=(
        Member(
            membership_id=1,
            user_id=1,
            name="Dana Admin",
            email="dana@example.com",
            role="admin",
            email_notify_enabled=True,
        ),
    ),
)
SAMPLE_BALANCE = Decimal("412.50")
TEST_SUBJECT_PREFIX = "[poller test] "


def _fail(message: str, status: int = 1) -> NoReturn:
    echo(f"poller: error: {message}", err=True)
    sys.exit(status)


def sample_content(billing_url: str, now: datetime) -> AlertContent:
    snapshot = OrgSnapshot(org=SAMPLE_ORG, balance=SAMPLE_BALANCE)
    return content_for(snapshot, kind="low_credits", number=1, billing_url=billing_url, now=now)


@click.command()
@click.option("--org", "org_id", type=int, help="Organization id (live data from the API).")
@click.option("--sample", is_flag=True, help="Use sample data; needs no API credential.")
@click.option(
    "--html",
    "html_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also write the HTML version to FILE (open it in a browser).",
)
@click.pass_obj
def preview(settings: Settings, org_id: int | None, sample: bool, html_file: str | None) -> None:
    """Show the low-credits email an organization would get, without sending anything.

    Prints the recipients, the subject and the plain-text version.

    \b
    Examples:
      poller preview --org 37
      poller preview --sample --html /tmp/email.html && xdg-open /tmp/email.html
    """
    if (org_id is None) == (not sample):
        raise click.UsageError("give exactly one of --org ID or --sample")
    now = datetime.now(UTC)
    if sample:
        snapshot = OrgSnapshot(org=SAMPLE_ORG, balance=SAMPLE_BALANCE)
    else:
        assert org_id is not None
        snapshot = _live_snapshot(settings, org_id)
    rendered = render_email(
        content_for(
            snapshot, kind="low_credits", number=1, billing_url=settings.billing_url, now=now
        )
    )
    recipients = [r.email for r in snapshot.org.alert_recipients()]
    echo(f"To: {', '.join(recipients) or '(nobody: no admin with an email address)'}")
    echo(f"Subject: {rendered.subject}")
    for note in _would_it_be_sent(snapshot):
        echo(f"Note: {note}")
    echo()
    echo(rendered.text, nl=False)
    if html_file is not None:
        _write_html(rendered, Path(html_file))


def _live_snapshot(settings: Settings, org_id: int) -> OrgSnapshot:
    settings.require_credentials()
    with CekuraClient(settings) as client:
        fetched = client.fetch_snapshots(only_org=org_id)
    if not fetched.snapshots:
        reason = "; ".join(error.message for error in fetched.errors) or "not found"
        _fail(f"organization {org_id} could not be read: {reason}")
    return fetched.snapshots[0]


def _would_it_be_sent(snapshot: OrgSnapshot) -> list[str]:
    notes = []
    if snapshot.balance >= snapshot.threshold:
        notes.append(
            f"the balance ({format_credits(snapshot.balance)}) is not below the threshold "
            f"({format_credits(snapshot.threshold)}); this is what the email would look like"
        )
    if not snapshot.enabled:
        notes.append("low-credit alerts are off for this organization (notify_low_credits)")
    if not snapshot.org.send_emails_enabled:
        notes.append("the organization has emails disabled: the alert would be suppressed")
    return notes


def _write_html(rendered: RenderedEmail, path: Path) -> None:
    try:
        path.write_text(rendered.html, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}", 2)
    echo(f"wrote the HTML version to {path}", err=True)


@click.command("send-test")
@click.option(
    "--to", "address", required=True, metavar="ADDRESS", help="Where to send the test email."
)
@click.pass_obj
def send_test(settings: Settings, address: str) -> None:
    """Send the real low-credits email, with sample data, through the configured SMTP server.

    Exit status 0 when the server accepted it; 1 with the server's exact answer when it did
    not. The subject starts with "[poller test]".

    \b
    Example:
      POLLER_SMTP_HOST=smtp.example.com POLLER_MAIL_FROM=alerts@example.com \\
        poller send-test --to me@example.com
    """
    settings.require_mail_from()
    assert settings.mail_from is not None
    now = datetime.now(UTC)
    rendered = render_email(sample_content(settings.billing_url, now))
    rendered = RenderedEmail(
        subject=TEST_SUBJECT_PREFIX + rendered.subject, text=rendered.text, html=rendered.html
    )
    try:
        message = build_message(
            rendered,
            mail_from=settings.mail_from,
            recipients=[address],
            message_id=message_id_for(
                SAMPLE_ORG.id, 0, settings.mail_from, detected_at=now, kind="send-test"
            ),
            date=now,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--to") from None
    server = f"{settings.smtp_host}:{settings.smtp_port}"
    try:
        with smtp_transport(settings) as transport:
            transport.send(message, [address])
    except DeliveryError as exc:
        _fail(f"the test email to {address} was not sent through {server}: {exc}")
    echo(f"sent: {server} accepted the test email to {address}")


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
    POLLER_INTERVAL to the schedule's period). Works for cron setups, where no daemon serves
    /healthz; with several pollers on one database it covers all of them.

    \b
    Example (cron mails the reason when it is unhealthy):
      */5 * * * * poller health --max-age 900 >/dev/null
    """
    limit = max_age if max_age is not None else 2 * settings.interval
    store = open_database(settings.database_url)
    try:
        last = store.last_successful_run()
        held = store.held_back()
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
    # Unhealthy goes to stderr, so cron (which mails any output) stays quiet with >/dev/null.
    echo(verdict.status_line, err=not verdict.healthy)
    sys.exit(0 if verdict.healthy else 1)

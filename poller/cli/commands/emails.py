"""Commands that show or send the alert email: `preview` and `send-test` (sample data)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import click

from poller.cekura.client import CekuraClient
from poller.cli.common import EXIT_INCOMPLETE, EXIT_USAGE, fail
from poller.cli.terminal import echo
from poller.config.settings import Settings
from poller.engine.model import Member, NotificationKind, Organization, OrgSnapshot
from poller.engine.notices import content_for
from poller.mail import (
    AlertContent,
    DeliveryError,
    RenderedEmail,
    build_message,
    format_credits,
    message_id_for,
    render_email,
    smtp_transport,
)

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


def sample_content(billing_url: str, now: datetime) -> AlertContent:
    snapshot = OrgSnapshot(org=SAMPLE_ORG, balance=SAMPLE_BALANCE)
    return content_for(
        snapshot, kind=NotificationKind.LOW_CREDITS, number=1, billing_url=billing_url, now=now
    )


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
            snapshot,
            kind=NotificationKind.LOW_CREDITS,
            number=1,
            billing_url=settings.billing_url,
            now=now,
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
        fail(f"organization {org_id} could not be read: {reason}", EXIT_INCOMPLETE)
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
        fail(f"cannot write {path}: {exc.strerror or exc}", EXIT_USAGE)
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
        fail(f"the test email to {address} was not sent through {server}: {exc}", EXIT_INCOMPLETE)
    echo(f"sent: {server} accepted the test email to {address}")

"""Each recipient's outcome of an outbox row, and the row status they add up to."""

from __future__ import annotations

from collections.abc import Sequence

from poller.engine.model import Deliveries, NotificationStatus

# Per-recipient outcomes (the ``deliveries`` of an outbox row).
SENT, FAILED, RETRYING = "sent", "failed", "retrying"


def still_to_send(recipients: Sequence[str], deliveries: Deliveries) -> list[str]:
    """The recipients without a final outcome: never tried, or temporarily refused."""
    return [
        address
        for address in recipients
        if deliveries.get(address, {}).get("outcome") not in (SENT, FAILED)
    ]


def row_status(recipients: Sequence[str], deliveries: Deliveries) -> str:
    """The outbox status per-recipient outcomes add up to.

    ``pending`` while any recipient has no final outcome (never tried, or temporarily
    refused); then ``sent`` if the server accepted it for at least one recipient, ``failed``
    if it refused every one permanently.
    """
    if still_to_send(recipients, deliveries):
        return NotificationStatus.PENDING
    outcomes = [deliveries[address]["outcome"] for address in recipients]
    return SENT if SENT in outcomes else FAILED


def delivery_summary(status: str, recipients: Sequence[str], deliveries: Deliveries) -> str:
    """``"sent 2/3, 1 failed"``, ``"pending 1/3 sent, 2 retrying"``: the row and its recipients.

    A row from before per-recipient outcomes (or one not for sending) is its status alone.
    """
    if not deliveries or status not in (
        NotificationStatus.PENDING,
        NotificationStatus.SENT,
        NotificationStatus.FAILED,
    ):
        return status
    counts = {outcome: 0 for outcome in (SENT, FAILED, RETRYING)}
    for address in recipients:
        outcome = deliveries.get(address, {}).get("outcome")
        if outcome in counts:
            counts[outcome] += 1
    total = len(recipients)
    untried = total - sum(counts.values())
    head = (
        f"{counts[SENT]}/{total} sent"
        if status == NotificationStatus.PENDING
        else f"{counts[SENT]}/{total}"
    )
    parts = [f"{status} {head}"]
    parts += [f"{counts[outcome]} {outcome}" for outcome in (FAILED, RETRYING) if counts[outcome]]
    if untried:
        parts.append(f"{untried} not tried yet")
    return ", ".join(parts)

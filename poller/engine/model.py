"""Typed records of what the Cekura API tells us about an organization.

Money is always ``decimal.Decimal`` parsed from the API's decimal strings, never float.
Parsing from API JSON lives in ``poller.cekura.parsing``; these are plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal

import structlog

from poller.engine.addresses import InvalidAddress, checked_address

log = structlog.get_logger(__name__)

DEFAULT_THRESHOLD = Decimal("1000")


@dataclass(frozen=True, slots=True)
class Member:
    membership_id: int
    user_id: int
    name: str
    email: str
    role: str
    # None when the API left the field out: only an explicit False opts a member out.
    email_notify_enabled: bool | None


@dataclass(frozen=True, slots=True)
class Recipient:
    name: str
    email: str


@dataclass(frozen=True, slots=True)
class Organization:
    id: int
    name: str
    notify_low_credits: bool
    low_credits_threshold: Decimal
    # Org-level email switch; undocumented default, we treat a missing field as True.
    send_emails_enabled: bool
    auto_refill: bool
    members: tuple[Member, ...]

    def for_alerts(self) -> Organization:
        """This organization with only the members ``alert_recipients`` can choose from.

        A cycle holds every organization of the fleet at once and only ever reads admins who
        have not opted out, so the client drops the other members as soon as an org is parsed
        (less memory at 100,000 orgs); the recipients are exactly the same.
        """
        members = tuple(member for member in self.members if _may_receive_alerts(member))
        return self if len(members) == len(self.members) else replace(self, members=members)

    def alert_recipients(self) -> tuple[Recipient, ...]:
        """Admins with a deliverable email who have not opted out of email, in API order.

        Deliverable is what the message builder and the transport check too
        (``poller.engine.addresses``): one admin's bad address must not stop the others' email.
        """
        seen: set[str] = set()
        recipients = []
        for member in self.members:
            email = member.email.strip()
            if not _may_receive_alerts(member) or not email:
                continue
            try:
                checked_address(email)
            except InvalidAddress as problem:
                log.warning(
                    "recipient.invalid_address",
                    org_id=self.id,
                    user_id=member.user_id,
                    error=str(problem),
                )
                continue
            if email.lower() in seen:
                continue
            seen.add(email.lower())
            recipients.append(Recipient(name=member.name, email=email))
        return tuple(recipients)


@dataclass(frozen=True, slots=True)
class Billing:
    organization_id: int
    credits_remaining: Decimal
    credits_used: Decimal | None


@dataclass(frozen=True, slots=True)
class OrgSnapshot:
    """Everything one cycle needs about one organization, read successfully."""

    org: Organization
    balance: Decimal

    @property
    def id(self) -> int:
        return self.org.id

    @property
    def name(self) -> str:
        return self.org.name

    @property
    def enabled(self) -> bool:
        return self.org.notify_low_credits

    @property
    def threshold(self) -> Decimal:
        return self.org.low_credits_threshold


@dataclass(frozen=True, slots=True)
class OrgError:
    """An organization whose data could not be read this cycle; its state stays untouched."""

    org_id: int | None
    message: str


def _may_receive_alerts(member: Member) -> bool:
    return member.role == "admin" and member.email_notify_enabled is not False

"""The engine's types: what the API says of an organization, what is stored, what is decided.

Plain values, shared by every layer: adapters (client, store, mail) build and read them, and
none of them does I/O. Money is always ``decimal.Decimal``, never float.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum

import structlog

from poller.engine.addresses import InvalidAddress, checked_address

log = structlog.get_logger(__name__)

DEFAULT_THRESHOLD = Decimal("1000")
# Bidirectional embeddings, overrides, isolates and marks: a spoofing trick in names from the
# API, escaped by the CLI and dropped from emails.
BIDI_CONTROLS = frozenset([*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C])


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


def utc_now() -> datetime:
    return datetime.now(UTC)


MAX_ERROR_LENGTH = 500


class WordedError(Exception):
    """An error whose message is already one line for people, with no secret in it."""


def one_line(text: str, limit: int = MAX_ERROR_LENGTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe_failure(error: BaseException) -> str:
    """One line naming an unexpected exception: its type and message."""
    if isinstance(error, WordedError):
        return str(error)
    return one_line(f"{type(error).__name__}: {error}".rstrip(": "))


# --- the alert rule's state and decision --------------------------------------------------


class AlertState(StrEnum):
    ARMED = "armed"
    ALERTED = "alerted"


@dataclass(frozen=True, slots=True)
class StoredState:
    state: AlertState
    breach_count: int


INITIAL = StoredState(AlertState.ARMED, 0)


@dataclass(frozen=True, slots=True)
class Decision:
    state: AlertState
    breach_count: int
    # True -> send one notification, for breach number ``breach_count``.
    breached: bool
    rearmed: bool

    @property
    def stored(self) -> StoredState:
        """What to persist for the organization after this decision."""
        return StoredState(self.state, self.breach_count)

    def changed_from(self, stored: StoredState | None) -> bool:
        """Whether the stored state must be written (always for an organization not yet stored)."""
        # Field by field: building self.stored costs a cycle a microsecond per organization.
        return (
            stored is None or stored.state != self.state or stored.breach_count != self.breach_count
        )


# --- what is stored of an organization ----------------------------------------------------
# The per-org records a cycle builds by the 100,000 are read-only by convention rather than
# frozen: a frozen dataclass takes several times as long to build (docs/benchmarks.md).


@dataclass(slots=True)
class ObservedOrg:
    org_id: int
    name: str
    enabled: bool
    threshold: Decimal
    balance: Decimal


@dataclass(slots=True)
class StoredRow:
    """One org as loaded from the store."""

    org_id: int
    stored: StoredState
    name: str
    enabled: bool
    threshold: Decimal
    balance: Decimal
    last_error: str | None

    def differs_from(self, observed: OrgSnapshot | ObservedOrg, new: StoredState) -> bool:
        """Whether the org must be written: a value or the state changed, or an error to clear."""
        return (
            observed.balance != self.balance
            or new != self.stored
            or self.last_error is not None
            or observed.threshold != self.threshold
            or observed.enabled != self.enabled
            or observed.name != self.name
        )


@dataclass(frozen=True, slots=True)
class NoticeState:
    """The optional notices' own state (runway alert, reminders) for one organization."""

    runway: AlertState
    runway_breaches: int
    reminders: int
    reminded_at: datetime | None


NOTICE_INITIAL = NoticeState(AlertState.ARMED, 0, 0, None)


# --- notifications ------------------------------------------------------------------------


class NotificationKind(StrEnum):
    LOW_CREDITS = "low_credits"
    RUNWAY = "runway"
    REMINDER = "reminder"
    RECOVERY = "recovery"


class NotificationStatus(StrEnum):
    PENDING = "pending"  # to be sent (or being sent)
    SENT = "sent"
    FAILED = "failed"
    SUPPRESSED = "suppressed"  # the organization turned its emails off
    NO_RECIPIENTS = "no_recipients"  # no admin with a deliverable address
    BASELINE = "baseline"  # recorded on first sight (--baseline), never sent


# Statuses a new outbox row may start with.
NEW_STATUSES = frozenset(NotificationStatus) - {NotificationStatus.SENT, NotificationStatus.FAILED}

# Recipient address -> {"outcome": "sent" | "failed" | "retrying", "answer": str, "at": ISO
# time}; a recipient without an entry has not been tried yet.
Deliveries = dict[str, dict[str, str]]


@dataclass(frozen=True, slots=True)
class NewNotification:
    kind: NotificationKind
    breach_number: int
    org_name: str
    recipients: tuple[str, ...]
    subject: str
    balance: Decimal
    threshold: Decimal
    detected_at: datetime
    status: NotificationStatus
    auto_refill: bool = False  # the org's auto-refill setting when the breach was detected
    burn_per_day: Decimal | None = None
    runs_out_at: datetime | None = None


# --- what a cycle writes --------------------------------------------------------------------


@dataclass(slots=True)
class StateChange:
    """One org's alert-state write, and the notifications that go with it only if it hits."""

    observed: ObservedOrg
    expected: StoredState | None  # what the cycle loaded; None = the org was not stored
    new: StoredState
    notification: NewNotification | None  # the low-credits alert
    also_notify: tuple[NewNotification, ...] = ()  # the recovery notice of a re-arm


@dataclass(frozen=True, slots=True)
class NoticeChange:
    """One org's notice-state write, and its notices (written only if the write hits)."""

    org_id: int
    expected: NoticeState | None  # None: no notice_state row was loaded
    new: NoticeState
    notifications: tuple[NewNotification, ...]  # none for a runway re-arm


@dataclass(slots=True)
class CycleWrites:
    """Everything one cycle writes, handed to the store in one step."""

    states: list[StateChange]
    notices: list[NoticeChange]
    balances: list[tuple[int, Decimal]]  # (org id, balance) points for the history


@dataclass(frozen=True)
class ApplyResult:
    written: int
    notifications: list[int]
    conflicts: int
    # Orgs whose state write (a first insert or a guarded transition) this call made: a
    # concurrent poller that won the race wrote the others, and it alone reports them.
    applied: frozenset[int] = frozenset()
    # Orgs whose own change could not be written (org id -> why); nothing of theirs was.
    failed: dict[int, str] = field(default_factory=dict)
    # Outbox ids of the runway alerts and reminders written (Store.persist).
    notices: list[int] = field(default_factory=list)


@dataclass
class DeliveryReport:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    # Pending rows left after this run (waiting for a retry), not counting rows another
    # poller holds a live lease on: they are being delivered right now.
    undelivered: int = 0

    def add(self, other: DeliveryReport) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed


# --- the adaptive schedule's work queue (poller.engine.schedule, .queue; poller.store) ----------


@dataclass(frozen=True, slots=True)
class BurnRecord:
    """What the schedule remembers of an org's reads: the last one and the fastest burn."""

    read_at: datetime | None
    balance: Decimal | None
    peak: float  # credits per second, the fastest fall seen between two consecutive reads
    samples: int  # how many read-to-read intervals ``peak`` was taken over


NO_READS = BurnRecord(None, None, 0.0, 0)


@dataclass(frozen=True, slots=True)
class DueRead:
    """A balance read this process claimed: the org as last listed, and its burn record."""

    organization: Organization
    record: BurnRecord


@dataclass(frozen=True, slots=True)
class Reschedule:
    """When an org is due next and why, with its burn record after the read (if any)."""

    org_id: int
    due_at: datetime
    reason: str
    record: BurnRecord


@dataclass(frozen=True, slots=True)
class ScheduledRead:
    """One org's place in the queue, for `poller status`."""

    org_id: int
    due_at: datetime
    reason: str
    last_read_at: datetime | None
    claimed_by: str | None  # a replica reading it now (its claim not yet expired)


@dataclass(frozen=True, slots=True)
class ListingSync:
    """What one listing changed in the queue."""

    added: int  # new orgs, due at once
    changed: int  # settings changed (alerts turned on, threshold moved): due at once
    removed: int  # no longer listed: dropped from the queue


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The queue's health at one moment (metrics, /healthz, `poller health`)."""

    organizations: int
    overdue: int  # due before now and not being read
    oldest_overdue_seconds: float  # 0 when none is overdue
    # Seconds since the last read, at the 95th percentile of orgs read at least once.
    p95_staleness_seconds: float | None

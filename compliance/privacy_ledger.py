"""The ledger of data-subject requests and their legal deadlines (GDPR Art. 12(3)).

Every request (access, rectification, erasure, restriction, do-not-sell...) gets a row:
received, due one month later, extendable once by two further months with a reason
given within the first month. Requests made through the API are opened and closed by
the routes that serve them; requests received by letter, e-mail or phone are logged by
the compliance officer (:meth:`RequestLedger.log`, with the day they arrived: the
deadline runs from receipt) and closed by hand (:meth:`RequestLedger.complete`).
Times are UTC; the clock is injectable for tests.
"""

from __future__ import annotations

import calendar
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select, update

from compliance.privacy_schema import requests

OPEN, COMPLETED, REFUSED, BLOCKED = "open", "completed", "refused", "blocked"
"""``blocked``: waiting on something (a legal hold); still counts against the deadline."""
REQUEST_TYPES = frozenset(
    {
        "access",
        "rectification",
        "erasure",
        "restriction",
        "lift_restriction",
        "objection",
        "portability",
        "do_not_sell",
    }
)
CHANNELS = ("letter", "email", "phone", "in_person", "other")
"""How a request logged by hand arrived; rows opened by the API have no channel."""
MAX_BACKDATE = timedelta(days=366)
"""How far back a logged request may have been received: every deadline of an older one
(three months at most) has long passed, and such a date is far likelier a typo."""
CLOCK_SKEW = timedelta(minutes=5)


class ExtensionRefused(Exception):
    """The request cannot be extended (already, too late, or no longer open)."""


class LedgerRefused(ValueError):
    """A request cannot be logged or closed as asked; ``str()`` says why."""


def add_months(when: datetime, months: int) -> datetime:
    """The same day ``months`` later, or that month's last day (31 Jan + 1 = 28/29 Feb)."""
    month0 = when.month - 1 + months
    year, month = when.year + month0 // 12, month0 % 12 + 1
    day = min(when.day, calendar.monthrange(year, month)[1])
    return when.replace(year=year, month=month, day=day)


def to_us(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000)


def from_us(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat()


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class LedgerRow:
    id: str
    type: str
    subject: str
    received_us: int
    due_us: int
    extended_due_us: int | None
    extension_reason: str | None
    status: str
    status_reason: str | None
    completed_us: int | None
    channel: str | None = None
    note: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "subject": self.subject,
            "received": from_us(self.received_us),
            "due": from_us(self.due_us),
            "extended_due": from_us(self.extended_due_us),
            "extension_reason": self.extension_reason,
            "status": self.status,
            "status_reason": self.status_reason,
            "completed_at": from_us(self.completed_us),
            "channel": self.channel or "api",
            "note": self.note,
        }


class RequestLedger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime] = _utcnow) -> None:
        self._engine = engine
        self._clock = clock

    def open(
        self,
        type_: str,
        subject_id: str,
        *,
        received: datetime | None = None,
        channel: str | None = None,
        note: str | None = None,
    ) -> LedgerRow:
        """A new open request, due one month after ``received`` (default: now)."""
        if type_ not in REQUEST_TYPES:
            raise ValueError(f"unknown request type {type_!r}")
        received = received or self._clock()
        row = LedgerRow(
            id=os.urandom(8).hex(),
            type=type_,
            subject=subject_id,
            received_us=to_us(received),
            due_us=to_us(add_months(received, 1)),
            extended_due_us=None,
            extension_reason=None,
            status=OPEN,
            status_reason=None,
            completed_us=None,
            channel=channel,
            note=note,
        )
        with self._engine.begin() as connection:
            connection.execute(requests.insert().values(**_values(row)))
        return row

    def log(
        self,
        type_: str,
        subject_id: str,
        received: datetime,
        channel: str,
        note: str | None = None,
    ) -> LedgerRow:
        """Log a request received outside the API; the deadline runs from ``received``.

        ``received`` may lie in the past (up to :data:`MAX_BACKDATE`), not in the future.
        """
        if type_ not in REQUEST_TYPES:
            raise LedgerRefused(f"unknown right {type_!r}")
        if channel not in CHANNELS:
            raise LedgerRefused(f"unknown channel {channel!r}: one of {', '.join(CHANNELS)}")
        if received.tzinfo is None:
            received = received.replace(tzinfo=UTC)
        now = self._clock()
        if received > now + CLOCK_SKEW:
            raise LedgerRefused("the request cannot have been received in the future")
        if received < now - MAX_BACKDATE:
            raise LedgerRefused(
                "the request was received more than a year ago: every deadline it had has "
                "passed; keep it in your own records"
            )
        return self.open(type_, subject_id, received=received, channel=channel, note=note)

    def complete(
        self, request_id: str, status: str = COMPLETED, reason: str | None = None
    ) -> LedgerRow:
        """Close an open (or blocked) request as completed, or refused with a reason.

        KeyError when there is no such request; :class:`LedgerRefused` when it is closed
        already or a refusal gives no reason.
        """
        if status not in (COMPLETED, REFUSED):
            raise LedgerRefused(f"a request ends {COMPLETED!r} or {REFUSED!r}, not {status!r}")
        if status == REFUSED and not (reason or "").strip():
            raise LedgerRefused("a refusal needs a reason (Art. 12(4))")
        with self._engine.begin() as connection:
            done = connection.execute(
                update(requests)
                .where(requests.c.id == request_id, requests.c.status.in_((OPEN, BLOCKED)))
                .values(status=status, status_reason=reason, completed_us=to_us(self._clock()))
            ).rowcount
        row = self.get(request_id)
        if row is None:
            raise KeyError(request_id)
        if done != 1:
            raise LedgerRefused(f"the request is {row.status} already")
        return row

    def close(self, request_id: str, status: str = COMPLETED, reason: str | None = None) -> None:
        """Mark a request done (or refused/blocked, with the reason)."""
        completed = to_us(self._clock()) if status in (COMPLETED, REFUSED) else None
        with self._engine.begin() as connection:
            connection.execute(
                update(requests)
                .where(requests.c.id == request_id)
                .values(status=status, status_reason=reason, completed_us=completed)
            )

    def get(self, request_id: str) -> LedgerRow | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(requests).where(requests.c.id == request_id)).first()
        return LedgerRow(*row) if row is not None else None

    def list(
        self, *, subject_id: str | None = None, status: str | None = None, limit: int = 1000
    ) -> list[LedgerRow]:
        query = select(requests).order_by(requests.c.received_us, requests.c.id).limit(limit)
        if subject_id is not None:
            query = query.where(requests.c.subject == subject_id)
        if status is not None:
            query = query.where(requests.c.status == status)
        with self._engine.connect() as connection:
            return [LedgerRow(*row) for row in connection.execute(query)]

    def extend(self, request_id: str, reason: str) -> LedgerRow:
        """Two more months (Art. 12(3)), once, only while the first month runs."""
        if not reason.strip():
            raise ExtensionRefused("an extension needs a reason")
        row = self.get(request_id)
        if row is None:
            raise KeyError(request_id)
        if row.extended_due_us is not None:
            raise ExtensionRefused("the request was extended already")
        if row.status not in (OPEN, BLOCKED):
            raise ExtensionRefused(f"the request is {row.status}")
        now = self._clock()
        if to_us(now) > row.due_us:
            raise ExtensionRefused("the first month is over: an extension must be given within it")
        received = datetime.fromtimestamp(row.received_us / 1_000_000, UTC)
        extended = to_us(add_months(received, 3))
        with self._engine.begin() as connection:
            connection.execute(
                update(requests)
                .where(requests.c.id == request_id, requests.c.extended_due_us.is_(None))
                .values(extended_due_us=extended, extension_reason=reason)
            )
        done = self.get(request_id)
        assert done is not None
        return done

    def pseudonymise(self, subject_id: str, replacement: str) -> int:
        """After erasure the ledger keeps its rows (accountability) but not the subject id,
        nor the notes, which are free text and may name them."""
        with self._engine.begin() as connection:
            return connection.execute(
                update(requests)
                .where(requests.c.subject == subject_id)
                .values(subject=replacement, note=None)
            ).rowcount


def _values(row: LedgerRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in LedgerRow.__slots__}

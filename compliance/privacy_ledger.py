"""The ledger of data-subject requests and their legal deadlines (GDPR Art. 12(3)).

Every request (access, rectification, erasure, restriction, do-not-sell...) gets a row:
received, due one month later, extendable once by two further months with a reason
given within the first month. Times are UTC; the clock is injectable for tests.
"""

from __future__ import annotations

import calendar
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update

from compliance.privacy_schema import requests

OPEN, COMPLETED, REFUSED, BLOCKED = "open", "completed", "refused", "blocked"
"""``blocked``: waiting on something (a legal hold); still counts against the deadline."""
REQUEST_TYPES = frozenset(
    {"access", "rectification", "erasure", "restriction", "lift_restriction", "do_not_sell"}
)


class ExtensionRefused(Exception):
    """The request cannot be extended (already, too late, or no longer open)."""


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
        }


class RequestLedger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime] = _utcnow) -> None:
        self._engine = engine
        self._clock = clock

    def open(self, type_: str, subject_id: str) -> LedgerRow:
        if type_ not in REQUEST_TYPES:
            raise ValueError(f"unknown request type {type_!r}")
        received = self._clock()
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
        )
        with self._engine.begin() as connection:
            connection.execute(requests.insert().values(**_values(row)))
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
        """After erasure the ledger keeps its rows (accountability) but not the subject id."""
        with self._engine.begin() as connection:
            return connection.execute(
                update(requests).where(requests.c.subject == subject_id).values(subject=replacement)
            ).rowcount


def _values(row: LedgerRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in LedgerRow.__slots__}

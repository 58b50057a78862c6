"""Paged queries over the audit log for the compliance officer.

Entries come oldest first, ordered by ``(time_us, writer_id, seq)``; a page ends with a
cursor naming its last entry, and the next page starts strictly after it, so paging is
stable while new entries arrive.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from sqlalchemy import Engine, select, tuple_

from compliance.audit_schema import entries
from compliance.keyring import KeyRing, subject_owner
from compliance.reader import AuditEntry


class BadCursor(ValueError):
    """The cursor was not made by :func:`encode_cursor`."""


def encode_cursor(entry: AuditEntry) -> str:
    raw = orjson.dumps([entry.time_us, entry.writer_id, entry.seq])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        time_us, writer_id, seq = orjson.loads(raw)
    except (ValueError, TypeError) as exc:
        raise BadCursor("malformed cursor") from exc
    if not (isinstance(time_us, int) and isinstance(writer_id, str) and isinstance(seq, int)):
        raise BadCursor("malformed cursor")
    return time_us, writer_id, seq


@dataclass(frozen=True, slots=True)
class AuditFilter:
    subject_id: str | None = None
    key_id: str | None = None
    request_id: str | None = None
    kinds: Sequence[str] | None = None
    since_us: int | None = None
    until_us: int | None = None


@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: list[AuditEntry]
    next_cursor: str | None


def query_page(
    engine: Engine,
    keyring: KeyRing,
    where: AuditFilter,
    *,
    limit: int = 100,
    cursor: str | None = None,
) -> AuditPage:
    """One page of entries matching every filter given."""
    query = select(entries)
    if where.subject_id is not None:
        pseudonyms = keyring.ids_for(subject_owner(where.subject_id))
        if not pseudonyms:
            return AuditPage([], None)
        query = query.where(entries.c.data_key_id.in_(pseudonyms))
    if where.key_id is not None:
        query = query.where(entries.c.key_id == where.key_id)
    if where.request_id is not None:
        query = query.where(entries.c.request_id == where.request_id)
    if where.kinds:
        query = query.where(entries.c.kind.in_(list(where.kinds)))
    if where.since_us is not None:
        query = query.where(entries.c.time_us >= where.since_us)
    if where.until_us is not None:
        query = query.where(entries.c.time_us < where.until_us)
    order = (entries.c.time_us, entries.c.writer_id, entries.c.seq)
    if cursor is not None:
        query = query.where(tuple_(*order) > tuple_(*decode_cursor(cursor)))
    query = query.order_by(*order).limit(limit + 1)
    with engine.connect() as connection:
        found = [AuditEntry(*row) for row in connection.execute(query)]
    more = len(found) > limit
    found = found[:limit]
    return AuditPage(found, encode_cursor(found[-1]) if more and found else None)

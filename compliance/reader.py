"""Reading the audit log: entries by subject, key, request or time; payloads decrypted.

Decrypting a payload is itself an auditable act: the caller (the compliance API) records
an ``audit.content_viewed`` entry naming what it opened and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine, select

from compliance.audit_schema import HASHED_COLUMNS, entries
from compliance.chain import parse_entry_id
from compliance.envelope import EnvelopeError, open_sealed, payload_aad
from compliance.keyring import DataKeyUnavailable, KeyRing, subject_owner


class PayloadUnavailable(Exception):
    """The payload cannot be read: shredded (its data key destroyed), absent, or altered."""

    def __init__(self, entry_id: str, reason: str) -> None:
        super().__init__(f"payload of {entry_id}: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An entry's metadata as stored, and its sealed payload."""

    writer_id: str
    seq: int
    time_us: int
    kind: str
    request_id: str | None
    key_id: str | None
    data_key_id: str | None
    model: str | None
    route: str | None
    status: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_us: int | None
    ttft_us: int | None
    guard: str | None
    watermark: str | None
    detail: str | None
    payload: bytes | None
    entry_hash: bytes

    @property
    def id(self) -> str:
        return f"{self.writer_id}:{self.seq}"

    def as_json(self) -> dict[str, Any]:
        """The metadata (no payload) as JSON-ready values."""
        out: dict[str, Any] = {"id": self.id}
        for name in HASHED_COLUMNS[1:-1]:
            out[name] = getattr(self, name)
        out["detail"] = orjson.loads(self.detail) if self.detail is not None else None
        out["has_payload"] = self.payload is not None
        out["entry_hash"] = self.entry_hash.hex()
        return out


class AuditReader:
    def __init__(self, engine: Engine, keyring: KeyRing) -> None:
        self._engine = engine
        self._keyring = keyring

    def entries(
        self,
        *,
        subject_id: str | None = None,
        key_id: str | None = None,
        request_id: str | None = None,
        kinds: Sequence[str] | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        """Entries matching every filter given, oldest first."""
        query = select(entries)
        if subject_id is not None:
            pseudonyms = self._keyring.ids_for(subject_owner(subject_id))
            if not pseudonyms:
                return []
            query = query.where(entries.c.data_key_id.in_(pseudonyms))
        if key_id is not None:
            query = query.where(entries.c.key_id == key_id)
        if request_id is not None:
            query = query.where(entries.c.request_id == request_id)
        if kinds is not None:
            query = query.where(entries.c.kind.in_(list(kinds)))
        if since_us is not None:
            query = query.where(entries.c.time_us >= since_us)
        if until_us is not None:
            query = query.where(entries.c.time_us < until_us)
        query = query.order_by(entries.c.time_us, entries.c.writer_id, entries.c.seq).limit(limit)
        with self._engine.connect() as connection:
            return [AuditEntry(*row) for row in connection.execute(query)]

    def entry(self, entry_id: str) -> AuditEntry | None:
        writer_id, seq = parse_entry_id(entry_id)
        with self._engine.connect() as connection:
            row = connection.execute(
                select(entries).where(entries.c.writer_id == writer_id, entries.c.seq == seq)
            ).first()
        return AuditEntry(*row) if row is not None else None

    def payload(self, entry: AuditEntry) -> dict[str, Any]:
        """The decrypted payload; PayloadUnavailable if there is none or it cannot open."""
        if entry.payload is None or entry.data_key_id is None:
            raise PayloadUnavailable(entry.id, "the entry has no payload")
        try:
            key = self._keyring.get(entry.data_key_id)
        except DataKeyUnavailable as exc:
            raise PayloadUnavailable(entry.id, f"shredded ({exc})") from exc
        aad = payload_aad(entry.writer_id, entry.seq, entry.data_key_id)
        try:
            payload: dict[str, Any] = orjson.loads(open_sealed(key.aead, aad, entry.payload))
        except EnvelopeError as exc:
            raise PayloadUnavailable(entry.id, str(exc)) from exc
        return payload

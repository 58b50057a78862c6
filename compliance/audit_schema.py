"""The audit log's tables: entries, signed checkpoints and wrapped data keys.

The schema is owned by Alembic (``gateway/migrations/versions/0002_audit_log.py``); these
classes describe it for queries. Everything the chain hashes is a plain integer, text or
bytes column, so the canonical encoding (:mod:`compliance.chain`) is the same whether
the rows come from SQLite or PostgreSQL: times are integer microseconds since the Unix
epoch (UTC), latencies integer microseconds, JSON in clear is stored as text.

Entries have no surrogate id: an entry is named by its chain, ``(writer_id, seq)``, shown
as ``writer_id:seq``, and every one of its columns is covered by its hash.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT does not autoincrement on SQLite: only an INTEGER PRIMARY KEY is the rowid.
AUTO_ID = BigInteger().with_variant(Integer(), "sqlite")


class AuditBase(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class AuditEntryRow(AuditBase):
    """One audited request or action. Column order below is the canonical field order."""

    __tablename__ = "audit_entries"

    writer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    time_us: Mapped[int] = mapped_column(BigInteger, index=True)
    kind: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    key_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # The data key that seals the payload; for a subject's entries it is also the
    # subject's pseudonym (the link to the subject id lives only in audit_data_keys).
    data_key_id: Mapped[str | None] = mapped_column(String(32), index=True)
    model: Mapped[str | None] = mapped_column(String(256))
    route: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[int | None] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_us: Mapped[int | None] = mapped_column(BigInteger)
    ttft_us: Mapped[int | None] = mapped_column(BigInteger)
    guard: Mapped[str | None] = mapped_column(String(512))
    watermark: Mapped[str | None] = mapped_column(String(256))
    detail: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    entry_hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditCheckpointRow(AuditBase):
    """An Ed25519 signature over (kind, writer, seq, chain head hash, time)."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    writer_id: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    head_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    time_us: Mapped[int] = mapped_column(BigInteger)
    signer: Mapped[str] = mapped_column(String(32))
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))


class DataKeyRow(AuditBase):
    """A data key, wrapped by the key-encryption key; ``wrapped`` NULL once destroyed."""

    __tablename__ = "audit_data_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # "subject:<id>", "key:<id>" or "anonymous"; NULL after crypto-shredding, which
    # unlinks the pseudonym in the entries from the subject.
    owner: Mapped[str | None] = mapped_column(String(300), unique=True)
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary)
    kek_id: Mapped[str | None] = mapped_column(String(16))
    created_us: Mapped[int] = mapped_column(BigInteger)
    destroyed_us: Mapped[int | None] = mapped_column(BigInteger)


def _table(cls: type[AuditBase]) -> Table:
    table = cls.__table__
    assert isinstance(table, Table)
    return table


entries: Table = _table(AuditEntryRow)
checkpoints: Table = _table(AuditCheckpointRow)
data_keys: Table = _table(DataKeyRow)

# What an entry's hash covers after its writer id, in canonical order: seq ... payload.
HASHED_COLUMNS: tuple[str, ...] = tuple(c.name for c in entries.columns)[1:-1]

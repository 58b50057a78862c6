"""ChainAppender: seals, chains and commits batches of records to one writer's chain.

Synchronous and for one thread at a time: :class:`compliance.audit_writer.AuditWriter`
drives it from its thread; a CLI command or an admin job can call :meth:`append`
directly and :meth:`close` when done. A batch is one transaction, so a commit makes
every entry of the batch durable at once (group commit), together with the checkpoint
that falls due in it. On SQLite the appender asks for ``synchronous=FULL`` (fsync of the
WAL at each commit); PostgreSQL commits durably by default (``synchronous_commit=on``).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    LargeBinary,
    String,
    insert,
    select,
)

from compliance.audit_schema import checkpoints, entries
from compliance.chain import (
    FINAL,
    PERIODIC,
    Checkpoint,
    check_writer_id,
    default_writer_id,
    entry_hash,
    genesis_hash,
)
from compliance.envelope import fresh_nonces, payload_aad, seal
from compliance.keyring import KeyRing
from compliance.records import AuditRecord, EntryRef, PreparedRecord, now_us, prepare
from compliance.signing import sign_checkpoint

log = logging.getLogger("bastion.audit")

ENTRY_COLUMNS = tuple(c.name for c in entries.columns)
_COLUMN_LIST = ", ".join(ENTRY_COLUMNS)
# SQLite: rows per INSERT statement. sqlite3 releases the GIL for every statement it
# steps, and the writer thread must then take it back from the event loop's thread (up
# to the 5 ms switch interval when the loop is busy): an executemany paid that per row.
# A few fixed sizes keep the statements in the driver's cache; before SQLite 3.32 a
# statement takes at most 999 parameters.
_SQLITE_ROWS_PER_STATEMENT = (
    (256, 64, 16, 4, 1) if sqlite3.sqlite_version_info >= (3, 32) else (32, 8, 2, 1)
)
_SQLITE_ROW = f"({', '.join('?' * len(ENTRY_COLUMNS))})"
_SQLITE_INSERTS = {
    n: f"INSERT INTO audit_entries ({_COLUMN_LIST}) VALUES {', '.join([_SQLITE_ROW] * n)}"
    for n in _SQLITE_ROWS_PER_STATEMENT
}


def _postgres_type(column: Column[Any]) -> str:
    kind = column.type
    if isinstance(kind, BigInteger):
        return "int8"
    if isinstance(kind, Integer):
        return "int4"
    if isinstance(kind, LargeBinary):
        return "bytea"
    assert isinstance(kind, String)  # Text is a String
    return "text"


# Binary COPY: no text escaping of the payload and hash (bytea would double in size),
# no parsing of numbers on the server, and half the bytes to send.
_POSTGRES_COPY = f"COPY audit_entries ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)"
_POSTGRES_TYPES = [_postgres_type(c) for c in entries.columns]


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """Sign the chain head once ``every_entries`` entries are unsigned (at the end of
    the batch that reaches it), or when the oldest unsigned entry is ``every_seconds``
    old."""

    every_entries: int = 1000
    every_seconds: float = 10.0


@dataclass(slots=True)
class _Head:
    seq: int
    hash: bytes
    signed_seq: int
    unsigned_since: float | None


def insert_entries(connection: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert entry rows (tuples in ENTRY_COLUMNS order) in the current transaction.

    The rows are plain values, so they go to the driver directly (SQLAlchemy's per-row
    parameter processing cost more than the inserts): binary COPY on psycopg, multi-row
    INSERTs on SQLite.
    """
    dialect = connection.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        driver_connection: Any = connection.connection.driver_connection
        with driver_connection.cursor() as cursor, cursor.copy(_POSTGRES_COPY) as copy:
            copy.set_types(_POSTGRES_TYPES)
            for row in rows:
                copy.write_row(row)
    elif dialect.name == "sqlite":
        sqlite_connection: Any = connection.connection.driver_connection
        cursor = sqlite_connection.cursor()
        try:
            start, left = 0, len(rows)
            for size in _SQLITE_ROWS_PER_STATEMENT:
                statement = _SQLITE_INSERTS[size]
                while left >= size:
                    cursor.execute(statement, list(chain.from_iterable(rows[start : start + size])))
                    start, left = start + size, left - size
        finally:
            cursor.close()
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported stores
        connection.execute(
            insert(entries), [dict(zip(ENTRY_COLUMNS, r, strict=True)) for r in rows]
        )


class ChainAppender:
    """Appends to the chain of ``writer_id`` (default: unique to this process).

    A writer id must be used by one live process at a time; a restarted process may take
    its old id back and continues that chain (a second live user of an id fails on the
    primary key instead of forking the chain).
    """

    def __init__(
        self,
        engine: Engine,
        keyring: KeyRing,
        signing_key: Ed25519PrivateKey,
        writer_id: str | None = None,
        *,
        policy: CheckpointPolicy | None = None,
        durable: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer_id = check_writer_id(writer_id or default_writer_id())
        self._engine = engine
        self.keyring = keyring
        self._signing_key = signing_key
        self._policy = policy or CheckpointPolicy()
        self._durable = durable and engine.dialect.name == "sqlite"
        self._clock = clock
        self._head: _Head | None = None

    def append(self, record: AuditRecord) -> EntryRef:
        """Write one record now (its own transaction) and return where it is."""
        return self.append_prepared([prepare(record)])[0]

    def append_batch(self, records: Sequence[AuditRecord]) -> list[EntryRef]:
        return self.append_prepared([prepare(r) for r in records])

    def append_prepared(self, batch: Sequence[PreparedRecord]) -> list[EntryRef]:
        """Seal, chain and commit ``batch`` in one transaction; all or nothing."""
        head = self._head or self._load_head()
        writer = self.writer_id
        keys = self.keyring.for_owners({p.owner for p in batch if p.owner is not None})
        rows: list[tuple[Any, ...]] = []
        refs: list[EntryRef] = []
        make_ref = EntryRef._make
        seq, prev = head.seq, head.hash
        nonces = fresh_nonces(len(batch))
        for (c, owner, plaintext), nonce in zip(batch, nonces, strict=True):
            seq += 1
            if owner is None:
                if plaintext is not None:
                    raise ValueError("a payload needs a data key owner")
                key_id = sealed = None
            else:
                key = keys[owner]
                key_id = key.id
                sealed = None
                if plaintext is not None:
                    sealed = seal(key.aead, payload_aad(writer, seq, key_id), plaintext, nonce)
            fields = (seq, *c[:4], key_id, *c[4:], sealed)
            prev = entry_hash(prev, writer, fields)
            rows.append((writer, *fields, prev))
            refs.append(make_ref((writer, seq, prev)))
        now = self._clock()
        checkpoint = None
        if self._due(head, seq, now):
            checkpoint = sign_checkpoint(self._signing_key, PERIODIC, writer, seq, prev, now_us())
        try:
            with self._engine.begin() as connection:
                self._begin(connection)
                insert_entries(connection, rows)
                if checkpoint is not None:
                    connection.execute(insert(checkpoints), checkpoint.as_row())
        except BaseException:
            # The commit may or may not have happened: read the head again next time.
            self._head = None
            raise
        head.seq, head.hash = seq, prev
        if checkpoint is not None:
            head.signed_seq, head.unsigned_since = seq, None
        elif head.unsigned_since is None:
            head.unsigned_since = now
        return refs

    def _due(self, head: _Head, seq: int, now: float) -> bool:
        if seq <= head.signed_seq:
            return False
        if seq - head.signed_seq >= self._policy.every_entries:
            return True
        since = head.unsigned_since
        return since is not None and now - since >= self._policy.every_seconds

    def seconds_until_checkpoint(self) -> float | None:
        """How long until a time-based checkpoint is due; None when nothing is unsigned."""
        head = self._head
        if head is None or head.unsigned_since is None:
            return None
        return max(0.0, head.unsigned_since + self._policy.every_seconds - self._clock())

    def checkpoint(self, kind: str = PERIODIC) -> Checkpoint | None:
        """Sign and store the chain head now (nothing to sign: None)."""
        head = self._head or self._load_head()
        if head.seq == 0 or (kind == PERIODIC and head.seq == head.signed_seq):
            return None
        checkpoint = sign_checkpoint(
            self._signing_key, kind, self.writer_id, head.seq, head.hash, now_us()
        )
        try:
            with self._engine.begin() as connection:
                self._begin(connection)
                connection.execute(insert(checkpoints), checkpoint.as_row())
        except BaseException:
            self._head = None
            raise
        head.signed_seq, head.unsigned_since = head.seq, None
        return checkpoint

    def checkpoint_if_due(self) -> Checkpoint | None:
        wait = self.seconds_until_checkpoint()
        return self.checkpoint() if wait is not None and wait <= 0 else None

    def close(self) -> Checkpoint | None:
        """Sign the head as the chain's last (``final``) checkpoint."""
        return self.checkpoint(FINAL)

    def _begin(self, connection: Connection) -> None:
        if self._durable:
            connection.exec_driver_sql("PRAGMA synchronous=FULL")

    def _load_head(self) -> _Head:
        writer = self.writer_id
        with self._engine.connect() as connection:
            last = connection.execute(
                select(entries.c.seq, entries.c.entry_hash)
                .where(entries.c.writer_id == writer)
                .order_by(entries.c.seq.desc())
                .limit(1)
            ).first()
            signed = connection.execute(
                select(checkpoints.c.seq, checkpoints.c.head_hash)
                .where(checkpoints.c.writer_id == writer)
                .order_by(checkpoints.c.seq.desc())
                .limit(1)
            ).first()
        seq, head_hash = (
            (last.seq, last.entry_hash) if last is not None else (0, genesis_hash(writer))
        )
        signed_seq = signed.seq if signed is not None else 0
        if signed is not None and signed.seq > seq:
            # Entries the checkpoint covers are gone (retention, or worse): carry on after
            # it; the verifier reports a gap if no retention anchor explains it.
            if last is not None:
                log.error("audit chain %s: entries %d..%d are missing", writer, seq + 1, signed.seq)
            seq, head_hash = signed.seq, signed.head_hash
        unsigned_since = self._clock() if seq > signed_seq else None
        self._head = _Head(seq, bytes(head_hash), signed_seq, unsigned_since)
        return self._head

"""Reading chains from the store: checkpoints, chain starts, and the walk along a chain.

:func:`walk_chain` is the inner loop of verification (and of retention, which verifies
what it deletes): it recomputes each entry's leaf and chain hash from its stored bytes,
compares it with the stored hash (an altered byte), checks that sequence numbers run
without a gap (a deleted or reordered entry) and that the chain passes through every
genuine checkpoint (entries altered and re-hashed; a tail cut off).

It is the one place where speed matters (``bastion audit verify`` reads every entry), so
rows come straight from the driver's cursor as plain tuples in big batches, already in
the order the canonical metadata lists them: no SQLAlchemy rows, no per-row objects
beyond the driver's tuple and the two hashes.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, func, select, text

from compliance.audit_schema import HASHED_COLUMNS, checkpoints, entries
from compliance.chain import RETENTION, Checkpoint, genesis_hash, meta_prefix
from compliance.signing import CheckpointVerifier

Progress = Callable[[int], None]
Signed = dict[int, list[Checkpoint]]
"""Genuine checkpoints of one chain, by sequence number."""

Row = tuple[Any, ...]
"""A stored entry as :func:`stored_rows` yields it: ``row[:META]`` is seq ... detail and
the payload's length (or None), the rest of the canonical metadata after the writer id;
then ``row[PAYLOAD]`` and ``row[HASH]``, the stored chain hash."""
META = len(HASHED_COLUMNS)
PAYLOAD, HASH = META, META + 1
_ROW_COLUMNS = [
    *(entries.c[name] for name in HASHED_COLUMNS[:-1]),
    func.length(entries.c.payload),
    entries.c.payload,
    entries.c.entry_hash,
]
# A loose index scan: the distinct writer ids straight from the primary key index,
# without reading every row (PostgreSQL has no skip scan of its own).
_WRITER_IDS = text(
    """
    WITH RECURSIVE w(id) AS (
        SELECT min(writer_id) FROM audit_entries
        UNION ALL
        SELECT (SELECT min(writer_id) FROM audit_entries WHERE writer_id > w.id)
        FROM w WHERE w.id IS NOT NULL
    )
    SELECT id FROM w WHERE id IS NOT NULL
    """
)


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a chain does not verify, at its first bad entry (or a bad checkpoint)."""

    writer_id: str
    seq: int | None
    reason: str
    checkpoint_id: int | None = None

    def __str__(self) -> str:
        if self.checkpoint_id is not None:
            where = f"checkpoint #{self.checkpoint_id} ({self.writer_id}:{self.seq})"
        elif self.seq is not None:
            where = f"entry {self.writer_id}:{self.seq}"
        else:
            where = f"chain {self.writer_id}"
        return f"{where}: {self.reason}"


@dataclass(slots=True)
class WalkResult:
    seq: int
    head: bytes
    entries: int
    problem: Problem | None
    signed_seq: int


def load_checkpoints(connection: Connection) -> list[Checkpoint]:
    rows = connection.execute(select(checkpoints).order_by(checkpoints.c.id))
    return [
        Checkpoint(
            r.writer_id,
            r.seq,
            r.kind,
            bytes(r.head_hash),
            r.time_us,
            r.signer,
            bytes(r.signature),
            r.id,
        )
        for r in rows
    ]


def walk_chain(
    connection: Connection,
    writer_id: str,
    start_seq: int,
    start_hash: bytes,
    signed: Signed,
    *,
    until_seq: int | None = None,
    progress: Progress | None = None,
    batch: int = 10_000,
) -> WalkResult:
    """Check the chain of ``writer_id`` after ``(start_seq, start_hash)``.

    ``signed`` maps sequence numbers to the genuine checkpoints at them. Stops at the
    first problem. A checkpoint beyond the last entry (up to ``until_seq``) is a cut tail.
    """
    stop = until_seq
    marks = sorted(
        (s for s in signed if s > start_seq and (stop is None or s <= stop)), reverse=True
    )
    next_mark = marks.pop() if marks else -1
    prev, expected, signed_seq = start_hash, start_seq + 1, start_seq

    def result(problem_seq: int | None = None, reason: str = "") -> WalkResult:
        problem = None if problem_seq is None else Problem(writer_id, problem_seq, reason)
        return WalkResult(expected - 1, prev, expected - 1 - start_seq, problem, signed_seq)

    # The loop below is row_leaf and link_hash written out: a call per row costs more
    # than the hashing.
    prefix, sha256, dumps = meta_prefix(writer_id), hashlib.sha256, orjson.dumps
    for part in stored_rows(connection, writer_id, start_seq, stop, batch):
        for row in part:
            seq = row[0]
            if seq != expected:
                gone = f"entries {expected}..{seq - 1} were" if seq - 1 > expected else "it was"
                return result(expected, f"missing: {gone} deleted or moved")
            try:
                leaf = sha256(prefix + dumps(row[:META])[1:] + (row[PAYLOAD] or b"")).digest()
            except TypeError:  # a value of a type no writer stores (SQLite keeps any)
                return result(seq, "altered: a column holds a value of the wrong type")
            digest = sha256(prev + leaf).digest()
            if digest != row[HASH]:
                return result(seq, "altered: its stored bytes do not match its hash")
            if seq == next_mark:
                for checkpoint in signed[seq]:
                    if checkpoint.head_hash != digest:
                        return result(
                            seq,
                            f"does not match signed checkpoint #{checkpoint.id}: entries "
                            f"{signed_seq + 1}..{seq} were altered and re-hashed",
                        )
                signed_seq = seq
                next_mark = marks.pop() if marks else -1
            prev = digest
            expected += 1
        if progress is not None:
            progress(len(part))
    if next_mark != -1:
        cut = max([next_mark, *marks])
        return result(
            expected, f"missing: entries {expected}..{cut} gone, a checkpoint covers them"
        )
    return result()


def row_leaf(prefix: bytes, row: Row) -> bytes:
    """The leaf of a stored row (:data:`Row`); ``prefix`` is its writer's
    :func:`compliance.chain.meta_prefix`. TypeError if a column holds a foreign type."""
    return hashlib.sha256(prefix + orjson.dumps(row[:META])[1:] + (row[PAYLOAD] or b"")).digest()


def stored_rows(
    connection: Connection,
    writer_id: str,
    after_seq: int,
    until_seq: int | None = None,
    batch: int = 10_000,
) -> Iterator[list[Row]]:
    """The entries of a chain after ``after_seq`` (up to ``until_seq``), in seq order,
    ``batch`` at a time, as the driver's own tuples (:data:`Row`).

    Straight from the DBAPI cursor: SQLAlchemy's Row objects and its result machinery
    cost more per row than the hashing. On psycopg, a binary server-side cursor: text
    results send bytea as hex (twice the bytes, decoded row by row).
    """
    query = select(*_ROW_COLUMNS).where(entries.c.writer_id == writer_id, entries.c.seq > after_seq)
    if until_seq is not None:
        query = query.where(entries.c.seq <= until_seq)
    compiled = query.order_by(entries.c.seq).compile(dialect=connection.dialect)
    params: Any = compiled.params
    if compiled.positional:
        params = tuple(compiled.params[name] for name in compiled.positiontup or ())
    driver: Any = connection.connection.driver_connection
    if connection.dialect.driver == "psycopg":
        cursor = driver.cursor(name=f"bastion_audit_{secrets.token_hex(4)}", binary=True)
    else:
        cursor = driver.cursor()
    try:
        cursor.execute(str(compiled), params)
        while part := cursor.fetchmany(batch):
            yield part
    finally:
        cursor.close()


def sort_checkpoints(
    all_checkpoints: Iterable[Checkpoint], signatures: CheckpointVerifier
) -> tuple[dict[str, dict[int, list[Checkpoint]]], list[Problem]]:
    """Genuine checkpoints by writer and sequence number, and the others as problems."""
    genuine: dict[str, dict[int, list[Checkpoint]]] = {}
    bad: list[Problem] = []
    for checkpoint in all_checkpoints:
        problem = signatures.problem(checkpoint)
        if problem is not None:
            bad.append(Problem(checkpoint.writer_id, checkpoint.seq, problem, checkpoint.id))
            continue
        by_seq = genuine.setdefault(checkpoint.writer_id, {})
        by_seq.setdefault(checkpoint.seq, []).append(checkpoint)
    return genuine, bad


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection that reads one consistent state of the log throughout.

    Writers append and the retention job deletes while a verification runs; reading the
    checkpoints and the entries at different moments could show a retention deletion
    without its anchor. PostgreSQL: REPEATABLE READ. SQLite (WAL): one read transaction.
    """
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
        elif connection.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN")
        yield connection


def writer_ids(connection: Connection) -> list[str]:
    in_entries = connection.execute(_WRITER_IDS).scalars().all()
    in_checkpoints = connection.execute(select(checkpoints.c.writer_id).distinct()).scalars()
    return sorted(set(in_entries) | set(in_checkpoints))


def first_seq(connection: Connection, writer_id: str) -> int | None:
    return connection.execute(
        select(func.min(entries.c.seq)).where(entries.c.writer_id == writer_id)
    ).scalar()


def last_seq(connection: Connection, writer_id: str) -> int | None:
    return connection.execute(
        select(func.max(entries.c.seq)).where(entries.c.writer_id == writer_id)
    ).scalar()


def chain_start(connection: Connection, writer: str, signed: Signed) -> tuple[int, bytes] | Problem:
    """Genesis, or the retention anchor just before the oldest entry left."""
    anchors = sorted(s for s, cps in signed.items() if any(c.kind == RETENTION for c in cps))
    oldest = first_seq(connection, writer)
    if oldest is None:  # no entries: fine if retention removed them all
        newest_signed = max(signed, default=0)
        if anchors and anchors[-1] >= newest_signed:
            anchor = anchors[-1]
            return anchor, _head(signed[anchor])
        after = anchors[-1] if anchors else 0
        if newest_signed == 0:
            return 0, genesis_hash(writer)
        return Problem(
            writer,
            after + 1,
            f"missing: entries {after + 1}..{newest_signed} are gone "
            "but a signed checkpoint covers them",
        )
    if oldest == 1:
        return 0, genesis_hash(writer)
    if oldest - 1 in anchors:
        return oldest - 1, _head(signed[oldest - 1])
    below = [a for a in anchors if a < oldest]
    after = below[-1] if below else 0
    return Problem(
        writer,
        after + 1,
        f"missing: entries {after + 1}..{oldest - 1} were deleted without a retention anchor",
    )


def _head(checkpoints_at_seq: list[Checkpoint]) -> bytes:
    return next(c.head_hash for c in checkpoints_at_seq if c.kind == RETENTION)

"""Retention: delete entries older than the retention period, chains staying verifiable.

Each chain loses a prefix: the entries up to the last one before the first entry that is
still young (so an entry written with a late clock is never removed early). Before it
deletes, the job verifies that prefix from its start (genesis or the previous anchor),
so tampering cannot be laundered by a signature; then, per chunk of ``chunk`` entries and
in one transaction each, it signs a ``retention`` checkpoint over the head hash at the
chunk's last entry (the *anchor* the rest of the chain now starts from), deletes the
entries up to it and the checkpoints before it. A chain whose writer closed it and whose
entries have all expired is removed whole, anchor included: nothing is left to verify.

The gateway runs this on a schedule, one process at a time (gateway/retention_job.py,
behind a lease in the database: compliance/job_lease.py); ``proceed`` lets such a caller
stop between chunks, each of which is whole on its own.

Default period: 90 days. The EU AI Act asks high-risk systems to keep logs for at least
six months (Art. 19(1)); set ``days`` accordingly for those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, Engine, delete, func, insert, select

from compliance.audit_schema import checkpoints, entries
from compliance.chain import FINAL, RETENTION, Checkpoint
from compliance.chain_walk import (
    Problem,
    chain_start,
    last_seq,
    load_checkpoints,
    sort_checkpoints,
    walk_chain,
    writer_ids,
)
from compliance.records import now_us
from compliance.signing import CheckpointVerifier, sign_checkpoint

DEFAULT_DAYS = 90.0
_DAY_US = 86_400 * 1_000_000


@dataclass(slots=True)
class RetentionResult:
    cutoff_us: int
    deleted: dict[str, int] = field(default_factory=dict)
    """Entries deleted, per writer."""
    anchors: int = 0
    refused: list[Problem] = field(default_factory=list)
    """Chains left alone because what would be deleted does not verify."""
    stopped: bool = False
    """``proceed`` said no: the run ended early, between two chunks."""

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


def apply_retention(
    engine: Engine,
    signing_key: Ed25519PrivateKey,
    *,
    days: float = DEFAULT_DAYS,
    now: int | None = None,
    chunk: int = 10_000,
    other_public_keys: Iterable[Ed25519PublicKey] = (),
    dry_run: bool = False,
    proceed: Callable[[], bool] | None = None,
) -> RetentionResult:
    """Delete entries older than ``days`` before ``now`` (µs since the epoch).

    ``other_public_keys``: earlier signing keys whose checkpoints are still trusted.
    With ``dry_run`` nothing is changed and ``deleted`` says what would go.
    ``proceed`` is asked before each chunk is deleted; False ends the run there.
    """
    if days <= 0 or chunk < 1:
        raise ValueError("days must be positive and chunk at least 1")
    cutoff = (now if now is not None else now_us()) - int(days * _DAY_US)
    result = RetentionResult(cutoff)
    verifier = CheckpointVerifier([signing_key.public_key(), *other_public_keys])
    with engine.connect() as connection:
        genuine, _ = sort_checkpoints(load_checkpoints(connection), verifier)
        writers = writer_ids(connection)
    for writer in writers:
        signed = genuine.get(writer, {})
        with engine.connect() as connection:
            start = chain_start(connection, writer, signed)
            if isinstance(start, Problem):
                result.refused.append(start)
                continue
            cut, all_expired = _cut(connection, writer, cutoff)
        seq, head = start
        if cut is None or cut <= seq:
            continue
        if dry_run:
            result.deleted[writer] = cut - seq
            continue
        # A closed chain with nothing young left goes whole, with no anchor.
        closed = all_expired and any(c.kind == FINAL for c in signed.get(cut, []))
        while seq < cut:
            if proceed is not None and not proceed():
                result.stopped = True
                return result
            end = min(seq + chunk, cut)
            with engine.connect() as connection:
                walk = walk_chain(connection, writer, seq, head, signed, until_seq=end)
            if walk.problem is not None:
                result.refused.append(walk.problem)
                break
            whole = closed and end == cut
            removed = _drop_prefix(engine, signing_key, writer, end, walk.head, whole=whole)
            result.deleted[writer] = result.deleted.get(writer, 0) + removed
            result.anchors += 0 if whole else 1
            seq, head = end, walk.head
    return result


def _cut(connection: Connection, writer: str, cutoff: int) -> tuple[int | None, bool]:
    """The last seq of the chain's expired prefix (None: no entries), and whether that
    prefix is the whole chain."""
    young = connection.execute(
        select(func.min(entries.c.seq)).where(
            entries.c.writer_id == writer, entries.c.time_us >= cutoff
        )
    ).scalar()
    if young is not None:
        return int(young) - 1, False
    return last_seq(connection, writer), True


def _drop_prefix(
    engine: Engine, key: Ed25519PrivateKey, writer: str, end: int, head: bytes, *, whole: bool
) -> int:
    """Anchor the chain at ``end`` and delete what came before; returns entries deleted."""
    anchor: Checkpoint = sign_checkpoint(key, RETENTION, writer, end, head, now_us())
    with engine.begin() as connection:
        if not whole:
            connection.execute(insert(checkpoints), anchor.as_row())
        removed = connection.execute(
            delete(entries).where(entries.c.writer_id == writer, entries.c.seq <= end)
        ).rowcount
        stale = checkpoints.c.seq <= end if whole else checkpoints.c.seq < end
        connection.execute(delete(checkpoints).where(checkpoints.c.writer_id == writer, stale))
        if not whole:
            # Periodic/final checkpoints at the anchor's seq say nothing the anchor doesn't.
            connection.execute(
                delete(checkpoints).where(
                    checkpoints.c.writer_id == writer,
                    checkpoints.c.seq == end,
                    checkpoints.c.kind != RETENTION,
                )
            )
    return int(removed)

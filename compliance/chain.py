"""The hash chain: canonical bytes of an entry, its leaf and chain hashes, what a checkpoint signs.

One chain per writer (a gateway process, or one CLI run), so concurrent processes never
contend for a chain head: no cross-process lock, no serialisable transactions, and a
PostgreSQL shared by many gateways keeps a verifiable history per writer. The price is
that the log is a set of chains rather than one total order; each entry still carries
its time, and checkpoints sign each chain's head regularly.

Format v2. For the entry ``seq`` of writer ``w``::

    meta  = JCS(["bastion.audit.entry.v2", w, seq, time_us, kind, request_id, key_id,
                 data_key_id, model, route, status, prompt_tokens, completion_tokens,
                 latency_us, ttft_us, guard, watermark, detail, len(payload) or null])
    leaf  = SHA-256(meta || payload)
    hash  = SHA-256(prev || leaf)
    prev  = hash of entry seq - 1, or for seq 1 SHA-256("bastion.audit.genesis.v2|" || w)

JCS is RFC 8785 canonical JSON; with only strings, integers below 2**53 and null it is
compact JSON with minimal escapes, which ``orjson.dumps`` writes. The leaf covers every
stored column of the entry: the stored bytes, not a re-serialisation of them.

Why a leaf: the chain links only leaves, so an entry can be proved to lead to a signed
head from its neighbours' 32-byte leaves alone, without their metadata or ciphertext.
Export bundles rely on that (:mod:`compliance.export_format`): entries that are not
exported appear there as ``(writer, seq, leaf)`` only.

A checkpoint signs (Ed25519) ``JCS(["bastion.audit.checkpoint.v2", kind, w, seq,
hex(hash of entry seq), time_us])``. Kinds: ``periodic`` (every N entries or T seconds),
``final`` (the writer closed), ``retention`` (entries up to seq were deleted by the
retention job, and the chain legitimately restarts after it), ``export`` (an export
signed a head that no checkpoint covered yet, after verifying the chain up to it).

Format v1 (``hash = SHA-256(prev || meta || payload)``, tags ``...v1``) is not read: a v1
log or checkpoint does not verify under v2.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

ENTRY_TAG = "bastion.audit.entry.v2"
CHECKPOINT_TAG = "bastion.audit.checkpoint.v2"
GENESIS_TAG = b"bastion.audit.genesis.v2|"
PERIODIC = "periodic"
FINAL = "final"
RETENTION = "retention"
EXPORT = "export"
CHECKPOINT_KINDS = (PERIODIC, FINAL, RETENTION, EXPORT)

WRITER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_dumps = orjson.dumps
_sha256 = hashlib.sha256


def default_writer_id(prefix: str | None = None) -> str:
    """A writer id unique to this process: ``<host>-<pid>-<random>``."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", prefix or socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def check_writer_id(writer_id: str) -> str:
    if not WRITER_ID.fullmatch(writer_id):
        raise ValueError(f"writer id {writer_id!r}: 1-64 characters of A-Z a-z 0-9 . _ -")
    return writer_id


def genesis_hash(writer_id: str) -> bytes:
    return _sha256(GENESIS_TAG + writer_id.encode()).digest()


def entry_meta(writer_id: str, fields: Sequence[Any]) -> bytes:
    """The canonical metadata of an entry; ``fields`` are its HASHED_COLUMNS (payload last)."""
    payload = fields[-1]
    return _dumps((ENTRY_TAG, writer_id, *fields[:-1], None if payload is None else len(payload)))


def entry_leaf(writer_id: str, fields: Sequence[Any]) -> bytes:
    """SHA-256(entry_meta(writer_id, fields) || payload)."""
    return leaf_hash(writer_id, fields[:-1], fields[-1])


def entry_hash(prev: bytes, writer_id: str, fields: Sequence[Any]) -> bytes:
    """The chain hash of an entry: SHA-256(prev || entry_leaf(writer_id, fields))."""
    return _sha256(prev + leaf_hash(writer_id, fields[:-1], fields[-1])).digest()


def leaf_hash(writer_id: str, meta: Sequence[Any], payload: bytes | None) -> bytes:
    """:func:`entry_leaf` with the payload apart from the other fields (seq ... detail)."""
    if payload is None:
        return _sha256(_dumps((ENTRY_TAG, writer_id, *meta, None))).digest()
    return _sha256(_dumps((ENTRY_TAG, writer_id, *meta, len(payload))) + payload).digest()


def link_hash(prev: bytes, leaf: bytes) -> bytes:
    """SHA-256(prev || leaf): the next chain hash."""
    return _sha256(prev + leaf).digest()


def meta_prefix(writer_id: str) -> bytes:
    """What every :func:`entry_meta` of ``writer_id`` starts with, up to its first field.

    The verifier's hot loop serialises only ``[seq, ..., len(payload)]`` and puts this
    in place of the opening bracket: ``meta = meta_prefix(w) + dumps(rest)[1:]``.
    """
    return _dumps((ENTRY_TAG, writer_id))[:-1] + b","


def parse_entry_id(text: str) -> tuple[str, int]:
    """``writer:seq`` → (writer, seq); ValueError if it is not one."""
    writer_id, sep, seq = text.rpartition(":")
    if not sep or not WRITER_ID.fullmatch(writer_id) or not seq.isdigit():
        raise ValueError(f"{text!r} is not an entry id (WRITER:SEQ)")
    return writer_id, int(seq)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: writer's chain had head ``head_hash`` at ``seq``."""

    writer_id: str
    seq: int
    kind: str
    head_hash: bytes
    time_us: int
    signer: str
    signature: bytes
    id: int | None = None

    def message(self) -> bytes:
        return checkpoint_message(self.kind, self.writer_id, self.seq, self.head_hash, self.time_us)

    def as_row(self) -> dict[str, Any]:
        return {
            "writer_id": self.writer_id,
            "seq": self.seq,
            "kind": self.kind,
            "head_hash": self.head_hash,
            "time_us": self.time_us,
            "signer": self.signer,
            "signature": self.signature,
        }


def checkpoint_message(
    kind: str, writer_id: str, seq: int, head_hash: bytes, time_us: int
) -> bytes:
    return orjson.dumps([CHECKPOINT_TAG, kind, writer_id, seq, head_hash.hex(), time_us])

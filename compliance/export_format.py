"""The export bundle's format, shared by its builder and its verifier.

A bundle is an uncompressed POSIX tar (stdlib ``tarfile``; any ``tar`` lists it) of::

    entries.jsonl      the exported entries, one JSON object a line, chain order
    chain.jsonl        what links them to signed checkpoints (segments, others' leaves)
    checkpoints.jsonl  the signed checkpoints that end those segments
    manifest.json      SHA-256 and size of each file above, the query, the time, the signer
    manifest.sig       Ed25519 signature over manifest.json's bytes (raw, 64 bytes)

An entry line carries every stored column of the entry, exactly as the chain hashes it
(``detail`` as its stored JSON text, the sealed payload in base64 as ``payload_sealed``),
its stored ``entry_hash``, and, for exports with payloads, the decrypted ``payload`` (or
``payload_error`` when it cannot be opened, e.g. shredded). ``time`` (ISO 8601) is for
people and is not hashed.

``chain.jsonl`` holds, per writer, segments: a ``segment`` line ``{writer_id, after_seq,
prev_hash, to_seq}``, then one ``leaf`` line ``{writer_id, seq, leaf}`` (the entry's leaf
digest, hex) for every entry of the chain in ``(after_seq, to_seq]`` that is not exported,
and nothing else about it: no metadata, no ciphertext. The chain links leaves
(``hash = SHA-256(prev || leaf)``, :mod:`compliance.chain`), so walking the segment from
``prev_hash``, with the leaves of exported entries recomputed from their lines in
``entries.jsonl`` and the others taken from ``chain.jsonl``, must give every exported
entry's hash and end on the head of a signed checkpoint at ``to_seq``. A leaf line never
stands for an exported entry: those are always recomputed from their bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from compliance.audit_schema import HASHED_COLUMNS
from compliance.chain import leaf_hash

FORMAT = "bastion.export.v2"
ENTRIES = "entries.jsonl"
CHAIN = "chain.jsonl"
CHECKPOINTS = "checkpoints.jsonl"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CONTENT_FILES = (ENTRIES, CHAIN, CHECKPOINTS)

# Hashed columns after seq and before the payload, as named in a line.
META_FIELDS: tuple[str, ...] = HASHED_COLUMNS[1:-1]


def iso_time(time_us: int) -> str:
    return datetime.fromtimestamp(time_us / 1_000_000, UTC).isoformat().replace("+00:00", "Z")


def entry_line(writer_id: str, row: Sequence[Any], entry_hash: bytes) -> dict[str, Any]:
    """A JSON-ready entry from its HASHED_COLUMNS values (seq ... payload)."""
    seq, payload = row[0], row[-1]
    line: dict[str, Any] = {"id": f"{writer_id}:{seq}", "writer_id": writer_id, "seq": seq}
    line["time"] = iso_time(row[1])
    for name, value in zip(META_FIELDS, row[1:-1], strict=True):
        line[name] = value
    line["payload_sealed"] = None if payload is None else base64.b64encode(payload).decode()
    line["entry_hash"] = entry_hash.hex()
    return line


class LineError(ValueError):
    """A line of the bundle is not what the format says."""


def leaf_line(writer_id: str, seq: int, leaf: bytes) -> dict[str, Any]:
    """The ``chain.jsonl`` line that stands for an entry that is not exported."""
    return {"type": "leaf", "writer_id": writer_id, "seq": seq, "leaf": leaf.hex()}


def entry_leaf(line: dict[str, Any]) -> bytes:
    """The leaf of the entry in an ``entries.jsonl`` line, from its stored bytes;
    LineError if the line is malformed."""
    try:
        writer_id = line["writer_id"]
        meta = [line["seq"], *(line[name] for name in META_FIELDS)]
        sealed = line["payload_sealed"]
        payload = None if sealed is None else base64.b64decode(sealed, validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise LineError(f"malformed entry ({exc})") from exc
    if not isinstance(writer_id, str):
        raise LineError("malformed entry (writer_id)")
    try:
        return leaf_hash(writer_id, meta, payload)
    except TypeError as exc:
        raise LineError(f"malformed entry ({exc})") from exc

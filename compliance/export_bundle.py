"""Build the compliance officer's signed export bundle (format: :mod:`compliance.export_format`).

:func:`build_export` selects entries by time, subjects and keys, optionally decrypts
their payloads, links them to signed checkpoints, and writes a tar whose manifest is
signed with the audit signing key. Used by ``POST /compliance/exports`` and by ``bastion
compliance export``; each caller then records the export (:func:`export_records`) before
handing the bundle over.

Entries beyond their chain's last checkpoint (a writer's newest few, at most N entries or
T seconds) have no signed head yet: the builder verifies their chain from its last
genuine checkpoint and signs that head itself (an ``export`` checkpoint, stored in the
log like any other), so every exported entry ends on a signature.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import secrets
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine, insert, select

from compliance import export_format as fmt
from compliance.audit_schema import HASHED_COLUMNS, checkpoints, entries
from compliance.chain import EXPORT, Checkpoint, genesis_hash, meta_prefix
from compliance.chain_walk import (
    Row,
    load_checkpoints,
    row_leaf,
    snapshot,
    sort_checkpoints,
    stored_rows,
    walk_chain,
)
from compliance.keyring import KeyRing, subject_owner
from compliance.private_files import open_private
from compliance.reader import AuditEntry, AuditReader, PayloadUnavailable
from compliance.records import CONTENT_VIEWED, EXPORT_MADE, AuditRecord, now_us
from compliance.signing import CheckpointVerifier, fingerprint, public_key_pem, sign_checkpoint

DoNotSell = Callable[[Engine], set[str]]
Progress = Callable[[int], None]


class ExportError(Exception):
    """The export cannot be made as asked (the message says why)."""


@dataclass(frozen=True, slots=True)
class ExportQuery:
    """What to export: ``since <= time < until`` (µs), and every other filter given."""

    since_us: int
    until_us: int
    subjects: tuple[str, ...] | None = None
    keys: tuple[str, ...] | None = None
    payloads: bool = False
    reason: str | None = None
    third_party: bool = False

    def __post_init__(self) -> None:
        if self.until_us <= self.since_us:
            raise ExportError("until must be later than since")
        if self.payloads and not (self.reason or "").strip():
            raise ExportError("a reason is required to export payloads")

    def as_json(self) -> dict[str, Any]:
        return {
            "since": fmt.iso_time(self.since_us),
            "until": fmt.iso_time(self.until_us),
            "subjects": list(self.subjects) if self.subjects is not None else None,
            "keys": list(self.keys) if self.keys is not None else None,
            "payloads": self.payloads,
            "reason": self.reason,
            "third_party": self.third_party,
        }


@dataclass(slots=True)
class ExportResult:
    path: Path
    export_id: str
    manifest: dict[str, Any]
    manifest_sha256: str
    entries: int = 0
    payloads_opened: int = 0
    signed_heads: list[str] = field(default_factory=list)
    """Chains whose head the export signed itself (``writer:seq``)."""


def privacy_store_do_not_sell(engine: Engine) -> set[str]:
    """Subjects flagged do-not-sell/share (CCPA), from compliance.privacy_store.

    Third-party exports fail closed when that store is not there: nobody can then say
    who must be left out.
    """
    try:
        store: Any = importlib.import_module("compliance.privacy_store")
    except ImportError as exc:
        raise ExportError(
            "third-party exports need the CCPA do-not-sell store (compliance.privacy_store)"
        ) from exc
    subjects: set[str] = store.do_not_sell_subjects(engine)
    return subjects


def build_export(
    engine: Engine,
    keyring: KeyRing,
    signing_key: Ed25519PrivateKey,
    query: ExportQuery,
    directory: Path,
    *,
    do_not_sell: DoNotSell = privacy_store_do_not_sell,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the bundle for ``query`` into ``directory``; ExportError if it cannot be."""
    export_id = secrets.token_hex(8)
    reader = AuditReader(engine, keyring)
    included, excluded = _pseudonyms(engine, keyring, query, do_not_sell)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        parts = Path(work)
        result = ExportResult(directory / f"bastion-export-{export_id}.tar", export_id, {}, "")
        with snapshot(engine) as connection:
            with open(parts / fmt.ENTRIES, "wb") as out:
                selected = _write_entries(
                    connection, reader, query, included, excluded, out, result, progress
                )
            signed, fresh = _signed_heads(connection, signing_key, selected, result)
            with open(parts / fmt.CHAIN, "wb") as chain, open(parts / fmt.CHECKPOINTS, "wb") as cps:
                _write_chain(connection, selected, signed, chain, cps)
        if fresh:  # the heads signed for this export go into the log too
            with engine.begin() as connection:
                connection.execute(insert(checkpoints), [c.as_row() for c in fresh])
        manifest = _manifest(parts, query, export_id, signing_key, result)
        raw = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        (parts / fmt.MANIFEST).write_bytes(raw)
        (parts / fmt.SIGNATURE).write_bytes(signing_key.sign(raw))
        _tar(parts, result.path, manifest["created_us"])
    result.manifest = manifest
    result.manifest_sha256 = hashlib.sha256(raw).hexdigest()
    return result


def _pseudonyms(
    engine: Engine, keyring: KeyRing, query: ExportQuery, do_not_sell: DoNotSell
) -> tuple[set[str] | None, set[str]]:
    """Data-key ids to keep (None: any) and to leave out (do-not-sell, third parties)."""
    included: set[str] | None = None
    if query.subjects is not None:
        included = {p for s in query.subjects for p in keyring.ids_for(subject_owner(s))}
    excluded: set[str] = set()
    if query.third_party:
        for subject in do_not_sell(engine):
            excluded.update(keyring.ids_for(subject_owner(subject)))
    return included, excluded


def _write_entries(
    connection: Connection,
    reader: AuditReader,
    query: ExportQuery,
    included: set[str] | None,
    excluded: set[str],
    out: IO[bytes],
    result: ExportResult,
    progress: Progress | None,
) -> dict[str, list[int]]:
    """entries.jsonl; returns the exported sequence numbers by writer."""
    selected: dict[str, list[int]] = {}
    if included is not None and not included:
        return selected
    stmt = select(entries).where(
        entries.c.time_us >= query.since_us, entries.c.time_us < query.until_us
    )
    if included is not None:
        stmt = stmt.where(entries.c.data_key_id.in_(sorted(included)))
    if query.keys is not None:
        stmt = stmt.where(entries.c.key_id.in_(list(query.keys)))
    stmt = stmt.order_by(entries.c.writer_id, entries.c.seq)
    rows = connection.execution_options(yield_per=2000).execute(stmt)
    for part in rows.partitions():
        for row in part:
            entry = AuditEntry(*row)
            if entry.data_key_id is not None and entry.data_key_id in excluded:
                continue
            columns = [getattr(entry, name) for name in HASHED_COLUMNS]
            line = fmt.entry_line(entry.writer_id, columns, bytes(entry.entry_hash))
            if query.payloads and entry.payload is not None:
                try:
                    line["payload"] = reader.payload(entry)
                    result.payloads_opened += 1
                except PayloadUnavailable as exc:
                    line["payload_error"] = exc.reason
            out.write(orjson.dumps(line) + b"\n")
            selected.setdefault(entry.writer_id, []).append(entry.seq)
            result.entries += 1
        if progress is not None:
            progress(len(part))
    return selected


Genuine = dict[str, dict[int, list[Checkpoint]]]


def _signed_heads(
    connection: Connection,
    signing_key: Ed25519PrivateKey,
    selected: dict[str, list[int]],
    result: ExportResult,
) -> tuple[Genuine, list[Checkpoint]]:
    """Genuine checkpoints by writer and seq (with the heads signed now), and those new ones."""
    trusted = CheckpointVerifier([signing_key.public_key()])
    genuine, _ = sort_checkpoints(load_checkpoints(connection), trusted)
    fresh: list[Checkpoint] = []
    for writer, seqs in selected.items():
        signed = genuine.setdefault(writer, {})
        newest = max(seqs)
        if any(s >= newest for s in signed):
            continue
        start = max(signed, default=0)
        head = signed[start][0].head_hash if start else genesis_hash(writer)
        walk = walk_chain(connection, writer, start, head, signed, until_seq=newest)
        if walk.problem is not None:
            raise ExportError(f"the audit log does not verify: {walk.problem}")
        if walk.seq != newest:
            raise ExportError(f"chain {writer} ends at {walk.seq}, before entry {newest}")
        checkpoint = sign_checkpoint(signing_key, EXPORT, writer, newest, walk.head, now_us())
        signed[newest] = [checkpoint]
        fresh.append(checkpoint)
        result.signed_heads.append(f"{writer}:{newest}")
    return genuine, fresh


def _write_chain(
    connection: Connection,
    selected: dict[str, list[int]],
    signed: Genuine,
    chain: IO[bytes],
    cps: IO[bytes],
) -> None:
    """chain.jsonl (segments, and the leaves of the entries not exported) and the
    checkpoints that end the segments."""
    for writer, seqs in selected.items():
        marks = sorted(signed.get(writer, {}))
        prefix, wanted = meta_prefix(writer), set(seqs)
        for after, until in _segments(seqs, marks):
            prev = _hash_before(connection, writer, after, signed.get(writer, {}))
            header = {
                "type": "segment",
                "writer_id": writer,
                "after_seq": after,
                "prev_hash": prev.hex(),
                "to_seq": until,
            }
            chain.write(orjson.dumps(header) + b"\n")
            for part in stored_rows(connection, writer, after, until, batch=2000):
                for row in part:
                    if row[0] not in wanted:
                        line = fmt.leaf_line(writer, row[0], _leaf(prefix, writer, row))
                        chain.write(orjson.dumps(line) + b"\n")
            for checkpoint in signed[writer][until]:
                cps.write(orjson.dumps(_checkpoint_json(checkpoint)) + b"\n")


def _leaf(prefix: bytes, writer: str, row: Row) -> bytes:
    try:
        return row_leaf(prefix, row)
    except TypeError as exc:
        raise ExportError(
            f"the audit log does not verify: entry {writer}:{row[0]} ({exc})"
        ) from exc


def _segments(seqs: list[int], marks: list[int]) -> Iterator[tuple[int, int]]:
    """(after_seq, to_seq) spans: from before an exported entry to the first signed head
    at or after it, taking in the exported entries on the way."""
    i = 0
    while i < len(seqs):
        first = seqs[i]
        until = next(m for m in marks if m >= first)
        while i < len(seqs) and seqs[i] <= until:
            i += 1
        yield first - 1, until


def _hash_before(
    connection: Connection, writer: str, seq: int, signed: dict[int, list[Checkpoint]]
) -> bytes:
    if seq == 0:
        return genesis_hash(writer)
    stored = connection.execute(
        select(entries.c.entry_hash).where(entries.c.writer_id == writer, entries.c.seq == seq)
    ).scalar()
    if stored is not None:
        return bytes(stored)
    if seq in signed:  # a retention anchor: the entry itself is gone
        return signed[seq][0].head_hash
    raise ExportError(f"chain {writer}: entry {seq} is missing and no checkpoint covers it")


def _checkpoint_json(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "writer_id": checkpoint.writer_id,
        "seq": checkpoint.seq,
        "kind": checkpoint.kind,
        "head_hash": checkpoint.head_hash.hex(),
        "time_us": checkpoint.time_us,
        "signer": checkpoint.signer,
        "signature": checkpoint.signature.hex(),
    }


def _manifest(
    parts: Path,
    query: ExportQuery,
    export_id: str,
    signing_key: Ed25519PrivateKey,
    result: ExportResult,
) -> dict[str, Any]:
    files = {}
    for name in fmt.CONTENT_FILES:
        data = (parts / name).read_bytes()
        files[name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "lines": data.count(b"\n"),
        }
    created = now_us()
    public = signing_key.public_key()
    return {
        "format": fmt.FORMAT,
        "export_id": export_id,
        "created_us": created,
        "created": fmt.iso_time(created),
        "query": query.as_json(),
        "entries": result.entries,
        "payloads_opened": result.payloads_opened,
        "files": files,
        "signer": {"fingerprint": fingerprint(public), "public_key_pem": public_key_pem(public)},
    }


def _tar(parts: Path, path: Path, created_us: int) -> None:
    # 0600: the bundle may hold decrypted payloads.
    with (
        open_private(path) as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in (fmt.MANIFEST, fmt.SIGNATURE, *fmt.CONTENT_FILES):
            data = (parts / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), created_us // 1_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))


def export_records(
    query: ExportQuery,
    result: ExportResult,
    *,
    key_id: str | None,
    request_id: str | None,
    route: str | None,
) -> list[AuditRecord]:
    """The entries that record this export: ``audit.content_viewed`` when payloads were
    opened (with the reason), then ``export.made``. Subject ids are personal data: they
    go into the sealed payload, never into the clear ``detail``."""
    common: dict[str, Any] = {"key_id": key_id, "request_id": request_id, "route": route}
    clear = query.as_json() | {"subjects": None if query.subjects is None else len(query.subjects)}
    sealed = {"subjects": list(query.subjects)} if query.subjects else None
    records = []
    if query.payloads:
        detail = {
            "export_id": result.export_id,
            "reason": query.reason,
            "payloads_opened": result.payloads_opened,
        }
        records.append(AuditRecord(kind=CONTENT_VIEWED, status=200, detail=detail, **common))
    made: dict[str, Any] = {
        "export_id": result.export_id,
        "query": clear,
        "entries": result.entries,
        "manifest_sha256": result.manifest_sha256,
        "signed_heads": result.signed_heads,
    }
    records.append(AuditRecord(kind=EXPORT_MADE, status=200, detail=made, payload=sealed, **common))
    return records

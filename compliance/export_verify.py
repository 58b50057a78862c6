"""Check an export bundle offline: signature, file hashes, every entry's link to a signed head.

Needs only the bundle and, to trust it, the audit public key (``bastion audit
public-key``); without one, the key named in the manifest is used, which proves the
bundle is intact but not who made it. Stops at the first problem and names it.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from compliance import export_format as fmt
from compliance.chain import Checkpoint, link_hash
from compliance.signing import CheckpointVerifier, fingerprint

Progress = Callable[[int], None]
_MEMBERS = {fmt.MANIFEST, fmt.SIGNATURE, *fmt.CONTENT_FILES}


class BundleProblem(Exception):
    """The first thing found wrong with the bundle."""


@dataclass(slots=True)
class ExportCheck:
    ok: bool
    problem: str | None = None
    entries: int = 0
    checkpoints: int = 0
    signer: str | None = None
    notes: list[str] = field(default_factory=list)


def bundle_size(path: Path) -> int:
    """Lines a verification reads (entries and chain), for progress bars; 0 if unknown."""
    try:
        with tarfile.open(path, "r:") as tar:
            manifest = _manifest(_read(tar, fmt.MANIFEST))
        files = manifest.get("files", {})
        return sum(int(files.get(n, {}).get("lines", 0)) for n in (fmt.ENTRIES, fmt.CHAIN))
    except (OSError, tarfile.TarError, BundleProblem, AttributeError, TypeError, ValueError):
        return 0


def verify_export(
    path: Path, public_key: Ed25519PublicKey | None = None, progress: Progress | None = None
) -> ExportCheck:
    """Check everything; ``ok`` only if all holds, else ``problem`` says what failed first."""
    check = ExportCheck(ok=False)
    try:
        with tarfile.open(path, "r:") as tar:
            _check(tar, public_key, check, progress or (lambda n: None))
    except (OSError, tarfile.TarError) as exc:
        check.problem = f"{path}: not a readable export bundle ({exc})"
    except BundleProblem as exc:
        check.problem = str(exc)
    else:
        check.ok = True
    return check


def _check(
    tar: tarfile.TarFile, trusted: Ed25519PublicKey | None, check: ExportCheck, progress: Progress
) -> None:
    names = [m.name for m in tar.getmembers()]
    for member in tar.getmembers():
        if member.name not in _MEMBERS or not member.isfile():
            raise BundleProblem(f"{member.name}: not part of an export bundle")
    if len(names) != len(set(names)):
        raise BundleProblem("the bundle holds a file twice")
    raw = _read(tar, fmt.MANIFEST)
    manifest = _manifest(raw)
    key = trusted or _named_key(manifest)
    check.signer = fingerprint(key)
    if trusted is None:
        check.notes.append(
            f"checked against the key the manifest names ({check.signer}); "
            "give --public-key to check who signed it"
        )
    try:
        key.verify(_read(tar, fmt.SIGNATURE), raw)
    except InvalidSignature:
        raise BundleProblem(
            f"manifest.sig: the signature does not match manifest.json under key {check.signer} "
            "(the manifest was altered, or another key signed it)"
        ) from None
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleProblem("manifest.json: no files listed")
    for name in fmt.CONTENT_FILES:
        _check_file(tar, name, files.get(name))
    heads = _checkpoints(tar, key)
    check.checkpoints = sum(len(v) for v in heads.values())
    exported = _entries(tar, progress)
    check.entries = len(exported)
    if check.entries != manifest.get("entries"):
        raise BundleProblem("entries.jsonl: the manifest counts a different number of entries")
    linked = _walk(tar, exported, heads, progress)
    for entry_id in exported:
        if entry_id not in linked:
            raise BundleProblem(f"entry {entry_id}: not linked to any signed checkpoint")


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    with _open(tar, name) as handle:
        return handle.read()


def _open(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    try:
        handle = tar.extractfile(name)
    except KeyError:
        handle = None
    if handle is None:
        raise BundleProblem(f"{name}: missing from the bundle")
    return handle


def _manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BundleProblem(f"manifest.json: not JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT:
        raise BundleProblem(f"manifest.json: not a {fmt.FORMAT} manifest")
    return manifest


def _named_key(manifest: dict[str, Any]) -> Ed25519PublicKey:
    pem = (manifest.get("signer") or {}).get("public_key_pem")
    try:
        key = serialization.load_pem_public_key(str(pem).encode())
    except ValueError as exc:
        raise BundleProblem("manifest.json: the signer's public key is not a PEM key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleProblem("manifest.json: the signer's key is not an Ed25519 key")
    return key


def _check_file(tar: tarfile.TarFile, name: str, listed: Any) -> None:
    if not isinstance(listed, dict) or not isinstance(listed.get("sha256"), str):
        raise BundleProblem(f"{name}: not listed in the manifest")
    digest = hashlib.sha256()
    with _open(tar, name) as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != listed["sha256"]:
        raise BundleProblem(
            f"{name}: its SHA-256 does not match the manifest (the file was altered)"
        )


def _lines(tar: tarfile.TarFile, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open(tar, name) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise BundleProblem(f"{name} line {number}: not JSON ({exc})") from exc
            if not isinstance(line, dict):
                raise BundleProblem(f"{name} line {number}: not a JSON object")
            yield number, line


def _checkpoints(tar: tarfile.TarFile, key: Ed25519PublicKey) -> dict[tuple[str, int], list[bytes]]:
    verifier = CheckpointVerifier([key])
    heads: dict[tuple[str, int], list[bytes]] = {}
    for number, line in _lines(tar, fmt.CHECKPOINTS):
        try:
            checkpoint = Checkpoint(
                line["writer_id"],
                line["seq"],
                line["kind"],
                bytes.fromhex(line["head_hash"]),
                line["time_us"],
                line["signer"],
                bytes.fromhex(line["signature"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleProblem(f"checkpoints.jsonl line {number}: malformed ({exc})") from exc
        problem = verifier.problem(checkpoint)
        if problem is not None:
            where = f"{checkpoint.writer_id}:{checkpoint.seq}"
            raise BundleProblem(f"checkpoints.jsonl line {number} ({where}): {problem}")
        heads.setdefault((checkpoint.writer_id, checkpoint.seq), []).append(checkpoint.head_hash)
    return heads


def _entries(tar: tarfile.TarFile, progress: Progress) -> dict[str, dict[str, Any]]:
    exported: dict[str, dict[str, Any]] = {}
    for number, line in _lines(tar, fmt.ENTRIES):
        entry_id = f"{line.get('writer_id')}:{line.get('seq')}"
        if line.get("id") != entry_id or entry_id in exported:
            raise BundleProblem(f"entries.jsonl line {number}: bad or repeated entry id")
        line.pop("payload", None)  # not hashed: keep memory to what the walk needs
        exported[entry_id] = line
        if number % 1000 == 0:
            progress(1000)
    progress(len(exported) % 1000)
    return exported


def _walk(
    tar: tarfile.TarFile,
    exported: dict[str, dict[str, Any]],
    heads: dict[tuple[str, int], list[bytes]],
    progress: Progress,
) -> set[str]:
    """Walk each segment of chain.jsonl; the ids of the exported entries it links.

    An exported entry's leaf is recomputed from its line in entries.jsonl; the entries in
    between give only their leaf. Either way the chain hash is SHA-256(prev || leaf), and
    the segment must end on a signed head.
    """
    linked: set[str] = set()
    segment: dict[str, Any] | None = None
    prev, seq, after_leaf = b"", 0, False

    def close() -> None:
        if segment is None:
            return
        writer, end = segment["writer_id"], segment["to_seq"]
        while seq < end:  # exported entries after the last leaf line
            exported_step(writer)
        signed = heads.get((writer, end))
        if not signed:
            raise BundleProblem(f"chain {writer}: no signed checkpoint at {end} in the bundle")
        if prev not in signed:
            raise BundleProblem(
                f"chain {writer}: entries {segment['after_seq'] + 1}..{end} do not lead to "
                f"the signed head at {end} (an entry or a leaf was altered)"
            )

    def exported_step(writer: str) -> None:
        nonlocal prev, seq, after_leaf
        entry_id = f"{writer}:{seq + 1}"
        line = exported.get(entry_id)
        if line is None:
            raise BundleProblem(f"entry {entry_id}: missing (neither exported nor in chain.jsonl)")
        try:
            leaf = fmt.entry_leaf(line)
        except fmt.LineError as exc:
            raise BundleProblem(f"entry {entry_id}: {exc}") from exc
        digest = link_hash(prev, leaf)
        if digest.hex() != line.get("entry_hash"):
            if after_leaf:
                raise BundleProblem(
                    f"entry {entry_id}: its hash does not follow from the leaf before it "
                    "(the entry or a leaf was altered)"
                )
            raise BundleProblem(f"entry {entry_id}: altered: its content does not match its hash")
        linked.add(entry_id)
        prev, seq, after_leaf = digest, seq + 1, False

    for number, line in _lines(tar, fmt.CHAIN):
        progress(1)
        kind = line.get("type")
        if kind == "segment":
            close()
            segment = line
            try:
                prev, seq = bytes.fromhex(line["prev_hash"]), int(line["after_seq"])
                after_leaf = False
                int(line["to_seq"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleProblem(f"chain.jsonl line {number}: malformed ({exc})") from exc
            continue
        if kind != "leaf":
            raise BundleProblem(f"chain.jsonl line {number}: not a segment or a leaf")
        if segment is None or line.get("writer_id") != segment["writer_id"]:
            raise BundleProblem(f"chain.jsonl line {number}: a leaf outside its segment")
        writer, target = segment["writer_id"], line.get("seq")
        if not isinstance(target, int) or target <= seq or target > segment["to_seq"]:
            raise BundleProblem(f"chain.jsonl line {number}: out of order")
        if f"{writer}:{target}" in exported:
            raise BundleProblem(
                f"chain.jsonl line {number}: a bare leaf for the exported entry "
                f"{writer}:{target} (exported entries are checked from their own bytes)"
            )
        try:
            leaf = bytes.fromhex(line["leaf"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleProblem(f"chain.jsonl line {number}: malformed ({exc})") from exc
        if len(leaf) != 32:
            raise BundleProblem(f"chain.jsonl line {number}: a leaf is 32 bytes")
        while seq + 1 < target:  # exported entries before this leaf
            exported_step(writer)
        prev, seq, after_leaf = link_hash(prev, leaf), target, True
    close()
    return linked

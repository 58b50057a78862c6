"""Canonical bytes, hashes, checkpoint signatures, key files and record checks."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compliance.audit_schema import HASHED_COLUMNS
from compliance.chain import (
    Checkpoint,
    check_writer_id,
    default_writer_id,
    entry_hash,
    entry_leaf,
    entry_meta,
    genesis_hash,
    link_hash,
    meta_prefix,
    parse_entry_id,
)
from compliance.records import AuditRecord, prepare
from compliance.signing import (
    CheckpointVerifier,
    SigningKeyError,
    create_signing_key_file,
    fingerprint,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_key_pem,
    sign_checkpoint,
)

FIELDS = (
    3,  # seq
    1_760_000_000_000_000,  # time_us
    "request",
    "req-1",
    "0123456789abcdef",
    "ab" * 16,
    "dev-model",
    "/v1/chat/completions",
    200,
    12,
    30,
    120_000,
    8_000,
    "pass",
    "watermarked z=4.10",
    '{"a":1}',
    b"\x00\x01sealed",
)


def test_hashed_columns_are_the_canonical_field_order() -> None:
    assert HASHED_COLUMNS == (
        "seq", "time_us", "kind", "request_id", "key_id", "data_key_id", "model", "route",
        "status", "prompt_tokens", "completion_tokens", "latency_us", "ttft_us", "guard",
        "watermark", "detail", "payload",
    )  # fmt: skip
    assert len(FIELDS) == len(HASHED_COLUMNS)


def test_entry_hash_is_sha256_over_prev_and_the_leaf_of_meta_and_payload() -> None:
    prev = genesis_hash("w1")
    assert prev == hashlib.sha256(b"bastion.audit.genesis.v2|w1").digest()
    meta = entry_meta("w1", FIELDS)
    assert meta == (
        b'["bastion.audit.entry.v2","w1",3,1760000000000000,"request","req-1",'
        b'"0123456789abcdef","abababababababababababababababab","dev-model",'
        b'"/v1/chat/completions",200,12,30,120000,8000,"pass","watermarked z=4.10",'
        b'"{\\"a\\":1}",8]'
    )
    leaf = entry_leaf("w1", FIELDS)
    assert leaf == hashlib.sha256(meta + FIELDS[-1]).digest()
    assert entry_hash(prev, "w1", FIELDS) == hashlib.sha256(prev + leaf).digest()
    assert link_hash(prev, leaf) == entry_hash(prev, "w1", FIELDS)
    # The stable test vectors (format v2): an external verifier must reproduce them.
    assert leaf.hex() == "8ef51df8c4e2feef981147b9d377910de9d9cbbecd722a0dd084f3364e702561"
    golden = "2de5e1957721f8d8bb9c27ca8c1b55c64359687535ce417eade16ddaa9e8777e"
    assert entry_hash(prev, "w1", FIELDS).hex() == golden


def test_the_verifiers_meta_prefix_rebuilds_the_canonical_meta() -> None:
    """The verifier serialises seq ... len(payload) and prepends the writer's prefix."""
    for writer in ["w1", "gw-1.a_b"]:
        for fields in [FIELDS, (*FIELDS[:-1], None)]:
            rest = (*fields[:-1], None if fields[-1] is None else len(fields[-1]))
            rebuilt = meta_prefix(writer) + orjson.dumps(rest)[1:]
            assert rebuilt == entry_meta(writer, fields)


def test_nothing_and_empty_are_different_and_every_field_counts() -> None:
    base = entry_hash(b"\x00" * 32, "w1", FIELDS)
    no_payload = (*FIELDS[:-1], None)
    empty_payload = (*FIELDS[:-1], b"")
    assert len({base, entry_hash(b"\x00" * 32, "w1", no_payload),
                entry_hash(b"\x00" * 32, "w1", empty_payload)}) == 3  # fmt: skip
    for i in range(len(FIELDS) - 1):
        changed = list(FIELDS)
        changed[i] = None
        assert entry_hash(b"\x00" * 32, "w1", changed) != base, HASHED_COLUMNS[i]
    assert entry_hash(b"\x01" * 32, "w1", FIELDS) != base
    assert entry_hash(b"\x00" * 32, "w2", FIELDS) != base


@pytest.mark.parametrize(
    "text", ['quote " backslash \\ slash /', "\x01\x1f\x7f", "é ü 😀 \u2028", "\n\r\t\b\f", "\x00"]
)
def test_orjson_writes_canonical_json(text: str) -> None:
    """RFC 8785 for strings and integers is compact JSON with minimal escapes."""
    value = [text, 2**53 - 1, None, -5]
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    assert orjson.dumps(value) == expected


def test_checkpoints_verify_only_when_genuine() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    checkpoint = sign_checkpoint(key, "periodic", "w1", 10, b"h" * 32, 1_000)
    assert checkpoint.signer == fingerprint(key.public_key())
    verifier = CheckpointVerifier([key.public_key()])
    assert verifier.problem(checkpoint) is None
    changes = {
        "seq": 11,
        "writer_id": "w2",
        "head_hash": b"i" * 32,
        "time_us": 1_001,
        "kind": "retention",
        "signature": bytes(64),
    }
    for name, value in changes.items():
        forged = Checkpoint(**{**checkpoint.as_row(), name: value})
        assert verifier.problem(forged) == "the signature does not match (forged or altered)", name
    foreign = sign_checkpoint(other, "periodic", "w1", 10, b"h" * 32, 1_000)
    assert "unknown key" in (verifier.problem(foreign) or "")
    with pytest.raises(ValueError):
        sign_checkpoint(key, "whatever", "w1", 1, b"h" * 32, 1)


def test_signing_key_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    key = create_signing_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    with pytest.raises(FileExistsError):
        create_signing_key_file(path)
    assert fingerprint(load_signing_key(path).public_key()) == fingerprint(key.public_key())
    assert fingerprint(load_or_create_signing_key(path).public_key()) == fingerprint(
        key.public_key()
    )
    public = tmp_path / "public.pem"
    public.write_text(public_key_pem(key.public_key()))
    assert fingerprint(load_public_key(public)) == fingerprint(key.public_key())
    assert fingerprint(load_public_key(path)) == fingerprint(key.public_key())
    fresh = load_or_create_signing_key(tmp_path / "new.pem")
    assert (tmp_path / "new.pem").exists() and fresh is not None
    for bad, message in [(tmp_path / "missing.pem", "cannot read"), (public, "not an unencrypted")]:
        with pytest.raises(SigningKeyError, match=message):
            load_signing_key(bad)


def test_entry_and_writer_ids() -> None:
    assert parse_entry_id("gw-1.a_b:42") == ("gw-1.a_b", 42)
    for bad in ["gw-1", "gw-1:", ":3", "gw 1:3", "gw-1:x"]:
        with pytest.raises(ValueError):
            parse_entry_id(bad)
    assert check_writer_id(default_writer_id()) and check_writer_id(default_writer_id("a b/c"))
    with pytest.raises(ValueError):
        check_writer_id("a:b")


def test_bad_records_are_refused_up_front() -> None:
    prepared = prepare(AuditRecord(subject_id="s", payload={"b": 1, "a": "x"}, detail={"n": 1}))
    assert prepared.owner == "subject:s" and prepared.plaintext == b'{"a":"x","b":1}'
    assert prepare(AuditRecord(key_id="k", payload={})).owner == "key:k"
    assert prepare(AuditRecord(payload={})).owner == "anonymous"
    assert prepare(AuditRecord(key_id="k")).owner is None
    bad = [
        ({"request_id": "x" * 129}, ValueError),
        ({"model": "a\x00b"}, ValueError),
        ({"route": "\ud800"}, ValueError),
        ({"status": "200"}, TypeError),
        ({"status": True}, TypeError),
        ({"latency_us": 2**60}, ValueError),
        ({"kind": ""}, ValueError),
        ({"payload": {"x": object()}}, ValueError),
    ]
    for changes, error in bad:
        with pytest.raises(error):
            prepare(AuditRecord(**changes))  # type: ignore[arg-type]

"""Export bundles: selection, payloads, links to signed checkpoints, offline verification."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select

from compliance import export_format as fmt
from compliance.audit_schema import checkpoints, entries
from compliance.chain import link_hash
from compliance.export_bundle import (
    ExportError,
    ExportQuery,
    build_export,
    export_records,
    privacy_store_do_not_sell,
)
from compliance.export_verify import verify_export
from compliance.keyring import KeyRing
from compliance.verify import LogVerifier
from tests.compliance.bundles import read_bundle, resign, write_bundle
from tests.compliance.conftest import AppenderFactory
from tests.compliance.records import request_record

FAR = int(time.time() * 1e6) + 3_600_000_000


def query(**changes: Any) -> ExportQuery:
    fields: dict[str, Any] = {"since_us": 0, "until_us": FAR} | changes
    return ExportQuery(**fields)


def lines(files: dict[str, bytes], name: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in files[name].splitlines()]


def fill(make_appender: AppenderFactory, count: int = 25) -> None:
    appender = make_appender("w1", every_entries=10)
    for n in range(count):
        appender.append(request_record(n, subject="alice" if n % 3 else "bob"))


def test_subject_export_links_every_entry_to_a_signed_head(
    engine: Engine,
    keyring: KeyRing,
    signing_key: Ed25519PrivateKey,
    make_appender: AppenderFactory,
    tmp_path: Path,
) -> None:
    fill(make_appender)
    asked = query(subjects=("alice",), payloads=True, reason="ticket 42")
    result = build_export(engine, keyring, signing_key, asked, tmp_path)
    files = read_bundle(result.path)
    exported = lines(files, "entries.jsonl")
    assert result.entries == len(exported) == 16  # n % 3 != 0 among 0..24
    assert {e["payload"]["response"] for e in exported} == {
        f"answer {n}" for n in range(25) if n % 3
    }
    leaves = [c for c in lines(files, "chain.jsonl") if c["type"] == "leaf"]
    assert leaves and all(set(c) == {"type", "writer_id", "seq", "leaf"} for c in leaves)
    assert {c["seq"] for c in leaves} <= {n + 1 for n in range(25) if n % 3 == 0}  # bob's
    # Entries 21..24 had no checkpoint yet: the export signed that head, in the log too.
    assert result.signed_heads == ["w1:24"]
    with engine.connect() as connection:
        kinds = connection.scalars(select(checkpoints.c.kind)).all()
    assert "export" in kinds
    assert LogVerifier(engine, [signing_key.public_key()]).verify().ok
    check = verify_export(result.path, signing_key.public_key())
    assert check.ok, check.problem
    assert (check.entries, check.checkpoints) == (16, 3)


def test_filters_by_key_and_time(
    engine: Engine,
    keyring: KeyRing,
    signing_key: Ed25519PrivateKey,
    make_appender: AppenderFactory,
    tmp_path: Path,
) -> None:
    appender = make_appender("w1")
    for n in range(6):
        appender.append(request_record(n, key_id="k-even" if n % 2 == 0 else "k-odd", time_us=n))
    result = build_export(engine, keyring, signing_key, query(keys=("k-odd",)), tmp_path)
    assert [e["seq"] for e in lines(read_bundle(result.path), "entries.jsonl")] == [2, 4, 6]
    result = build_export(engine, keyring, signing_key, query(since_us=2, until_us=4), tmp_path)
    assert [e["time_us"] for e in lines(read_bundle(result.path), "entries.jsonl")] == [2, 3]
    assert "payload" not in lines(read_bundle(result.path), "entries.jsonl")[0]
    assert verify_export(result.path, signing_key.public_key()).ok


def test_third_party_exports_leave_out_do_not_sell_subjects(
    engine: Engine,
    keyring: KeyRing,
    signing_key: Ed25519PrivateKey,
    make_appender: AppenderFactory,
    tmp_path: Path,
) -> None:
    fill(make_appender, 9)
    result = build_export(
        engine,
        keyring,
        signing_key,
        query(third_party=True),
        tmp_path,
        do_not_sell=lambda _engine: {"bob"},
    )
    exported = lines(read_bundle(result.path), "entries.jsonl")
    assert len(exported) == 6  # bob's three entries are out
    bob = set(keyring.ids_for("subject:bob"))
    assert not any(e["data_key_id"] in bob for e in exported)
    assert verify_export(result.path, signing_key.public_key()).ok
    # Without third_party, the flag does not apply.
    everyone = build_export(
        engine, keyring, signing_key, query(), tmp_path, do_not_sell=lambda _engine: {"bob"}
    )
    assert everyone.entries == 9


def test_the_privacy_store_is_used_by_default(engine: Engine) -> None:
    try:
        flagged = privacy_store_do_not_sell(engine)
    except ExportError as exc:  # the store's tables are another migration's
        pytest.skip(str(exc))
    assert isinstance(flagged, set)


def test_payloads_need_a_reason() -> None:
    with pytest.raises(ExportError, match="reason"):
        query(payloads=True)
    with pytest.raises(ExportError, match="later"):
        query(since_us=5, until_us=5)


def test_an_entry_altered_under_a_re_signed_manifest_is_caught(
    engine: Engine,
    keyring: KeyRing,
    signing_key: Ed25519PrivateKey,
    make_appender: AppenderFactory,
    tmp_path: Path,
) -> None:
    """Someone holding the signing key may re-sign a manifest; still the entries must lead
    to the checkpoints, which were signed when the log was written."""
    fill(make_appender, 12)
    result = build_export(engine, keyring, signing_key, query(), tmp_path)
    files = read_bundle(result.path)
    changed = files["entries.jsonl"].replace(b'"status":200', b'"status":201', 1)
    files["entries.jsonl"] = changed
    check = verify_export(
        write_bundle(tmp_path / "forged.tar", resign(files, signing_key)), signing_key.public_key()
    )
    assert not check.ok
    assert check.problem == "entry w1:1: altered: its content does not match its hash"


def test_a_third_party_export_carries_no_metadata_of_the_entries_left_out(
    engine: Engine,
    keyring: KeyRing,
    signing_key: Ed25519PrivateKey,
    make_appender: AppenderFactory,
    tmp_path: Path,
) -> None:
    """chain.jsonl links exported entries to signed heads through the others' leaves
    alone: nothing of a do-not-sell subject's entries but their sequence numbers."""
    appender = make_appender("w1", every_entries=10)
    for n in range(14):
        if n % 3 == 1:  # bob's, between alice's entries and the checkpoints
            bob = {
                "request_id": f"bob-request-{n}",
                "key_id": "b0b0b0b0b0b0b0b0",
                "model": "bob-model",
                "route": "/bob/route",
                "guard": "bob-guard",
                "watermark": "bob-watermark",
            }
            appender.append(request_record(n, subject="bob", **bob))
        else:
            appender.append(request_record(n))
    asked = query(third_party=True)
    result = build_export(
        engine, keyring, signing_key, asked, tmp_path, do_not_sell=lambda _engine: {"bob"}
    )
    assert verify_export(result.path, signing_key.public_key()).ok
    files = read_bundle(result.path)
    chain = files["chain.jsonl"]
    with engine.connect() as connection:
        left_out = connection.execute(
            select(entries).where(entries.c.data_key_id.in_(keyring.ids_for("subject:bob")))
        ).all()
    assert len(left_out) == 5 and result.entries == 9
    leaves = [line for line in lines(files, "chain.jsonl") if line["type"] == "leaf"]
    # 11 is only the hash the next segment starts from; 14 follows the last exported entry.
    assert [e.seq for e in left_out] == [2, 5, 8, 11, 14]
    assert [line["seq"] for line in leaves] == [2, 5, 8]
    assert all(set(line) == {"type", "writer_id", "seq", "leaf"} for line in leaves)
    for entry in left_out:
        clear = [
            entry.request_id,
            entry.key_id,
            entry.data_key_id,
            entry.model,
            entry.route,
            entry.guard,
            entry.watermark,
            str(entry.time_us),
            entry.payload[:24].hex(),
            base64.b64encode(entry.payload).decode()[:32],
        ]
        for value in clear:
            assert value.encode() not in chain, value
            assert value.encode() not in files["entries.jsonl"], value
    for name in ["bob-model", "/bob/route", "b0b0b0b0b0b0b0b0", "bob-request"]:
        assert name.encode() not in b"".join(files.values())


def test_a_forged_leaf_is_caught(
    engine: Engine,
    keyring: KeyRing,
    signing_key: Ed25519PrivateKey,
    make_appender: AppenderFactory,
    tmp_path: Path,
) -> None:
    """Under a re-signed manifest: a changed leaf, an exported entry changed together with
    its hash, and a bare leaf put in for an exported entry whose bytes were changed."""
    fill(make_appender, 12)  # bob: seq 1, 4, 7, 10; alice exported; checkpoints 10, 12
    result = build_export(engine, keyring, signing_key, query(subjects=("alice",)), tmp_path)
    original = read_bundle(result.path)
    key = signing_key.public_key()

    def check(files: dict[str, bytes]) -> str | None:
        bundle = write_bundle(tmp_path / "forged.tar", resign(files, signing_key))
        done = verify_export(bundle, key)
        assert not done.ok
        return done.problem

    def jsonl(rows: list[dict[str, Any]]) -> bytes:
        return b"".join(orjson.dumps(row) + b"\n" for row in rows)

    chain = lines(original, "chain.jsonl")
    assert [c["seq"] for c in chain if c["type"] == "leaf"] == [4, 7, 10]
    for at, expected in [
        (1, "entry w1:5: its hash does not follow from the leaf before it"),
        (3, "chain w1: entries 2..10 do not lead to the signed head at 10"),
    ]:
        forged = [dict(c) for c in chain]
        assert forged[at]["type"] == "leaf"
        flipped = bytearray.fromhex(forged[at]["leaf"])
        flipped[0] ^= 0x01
        forged[at]["leaf"] = flipped.hex()
        problem = check(original | {"chain.jsonl": jsonl(forged)})
        assert problem is not None and problem.startswith(expected), problem

    exported = lines(original, "entries.jsonl")
    assert exported[0]["id"] == "w1:2"
    with engine.connect() as connection:
        before = connection.execute(
            select(entries.c.entry_hash).where(entries.c.writer_id == "w1", entries.c.seq == 1)
        ).scalar_one()
    altered = [dict(e) for e in exported]
    altered[0]["model"] = "a-cheaper-model"
    altered[0]["entry_hash"] = link_hash(before, fmt.entry_leaf(altered[0])).hex()
    problem = check(original | {"entries.jsonl": jsonl(altered)})
    assert problem == "entry w1:3: altered: its content does not match its hash"

    bare = {"type": "leaf", "writer_id": "w1", "seq": 2}
    bare["leaf"] = fmt.entry_leaf(exported[0]).hex()
    altered[0]["entry_hash"] = exported[0]["entry_hash"]
    problem = check(
        original
        | {"entries.jsonl": jsonl(altered), "chain.jsonl": jsonl([chain[0], bare, *chain[1:]])}
    )
    assert problem == (
        "chain.jsonl line 2: a bare leaf for the exported entry w1:2 "
        "(exported entries are checked from their own bytes)"
    )


def test_export_records_keep_subjects_out_of_the_clear(
    engine: Engine,
    keyring: KeyRing,
    signing_key: Ed25519PrivateKey,
    make_appender: AppenderFactory,
    tmp_path: Path,
) -> None:
    fill(make_appender, 3)
    asked = query(subjects=("alice",), payloads=True, reason="ticket 7")
    result = build_export(engine, keyring, signing_key, asked, tmp_path)
    viewed, made = export_records(asked, result, key_id="k1", request_id="r1", route="/x")
    assert viewed.kind == "audit.content_viewed" and viewed.detail is not None
    assert viewed.detail["reason"] == "ticket 7"
    assert made.kind == "export.made" and made.detail is not None
    assert "alice" not in orjson.dumps(made.detail).decode()
    assert made.payload == {"subjects": ["alice"]}
    assert made.detail["manifest_sha256"] == result.manifest_sha256

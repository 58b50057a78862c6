"""Crypto-shredding: a destroyed data key leaves unreadable payloads and a valid chain."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select

from compliance.appender import ChainAppender
from compliance.audit_schema import data_keys
from compliance.keyring import KeyRing
from compliance.reader import AuditReader, PayloadUnavailable
from compliance.verify import LogVerifier
from gateway.store import make_engine, migrate
from tests.compliance.conftest import MASTER_KEY
from tests.compliance.records import request_record
from tests.databases import database

CANARY_SUBJECT = "canary-subject-7f3a9c"
CANARY_PROMPT = "canary-prompt-b41d2e: my account number is 0042"


def shred_scenario(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> tuple[KeyRing, AuditReader, list[str], bytes]:
    keyring = KeyRing(engine, MASTER_KEY)
    appender = ChainAppender(engine, keyring, signing_key, "w1")
    refs = []
    for n in range(20):
        subject = CANARY_SUBJECT if n % 2 else "someone-else"
        payload = {"request": CANARY_PROMPT if n % 2 else "hello", "response": f"answer {n}"}
        refs.append(appender.append(request_record(n, subject=subject, payload=payload)).id)
    appender.close()
    with engine.connect() as connection:
        wrapped = connection.execute(
            select(data_keys.c.wrapped).where(data_keys.c.owner == f"subject:{CANARY_SUBJECT}")
        ).scalar_one()
    return keyring, AuditReader(engine, keyring), refs, wrapped


def assert_shredded(
    reader: AuditReader, refs: list[str], engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    for n, entry_id in enumerate(refs):
        entry = reader.entry(entry_id)
        assert entry is not None
        if n % 2:
            with pytest.raises(PayloadUnavailable, match="shredded"):
                reader.payload(entry)
        else:
            assert reader.payload(entry)["response"] == f"answer {n}"  # others untouched
    assert reader.entries(subject_id=CANARY_SUBJECT) == []  # the pseudonym is unlinked
    report = LogVerifier(engine, [signing_key.public_key()]).verify()
    assert report.ok and report.entries == 20


def test_shredded_payloads_are_unreadable_and_the_chain_verifies(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    keyring, reader, refs, _ = shred_scenario(engine, signing_key)
    assert len(reader.entries(subject_id=CANARY_SUBJECT)) == 10
    result = keyring.destroy_subject(CANARY_SUBJECT)
    assert result.keys == 1
    assert_shredded(reader, refs, engine, signing_key)
    # Another process's cached key does not bring the payloads back: reads look it up.
    assert_shredded(AuditReader(engine, KeyRing(engine, MASTER_KEY)), refs, engine, signing_key)


def test_no_trace_of_a_shredded_subject_in_the_sqlite_files(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    with database("sqlite", tmp_path) as url:
        engine = make_engine(url)
        migrate(engine)
        keyring, reader, refs, wrapped = shred_scenario(engine, signing_key)
        files = [tmp_path / "bastion.db", tmp_path / "bastion.db-wal"]

        def raw() -> bytes:
            return b"".join(f.read_bytes() for f in files if f.exists())

        # The scan can see: before erasure, the wrapped key and the subject id are there.
        before = raw()
        assert wrapped in before and CANARY_SUBJECT.encode() in before
        assert CANARY_PROMPT.encode() not in before  # payloads are only ever ciphertext
        result = keyring.destroy_subject(CANARY_SUBJECT)
        assert result.keys == 1 and result.storage_scrubbed
        after = raw()
        for secret in (wrapped, CANARY_SUBJECT.encode(), CANARY_PROMPT.encode()):
            assert secret not in after
        assert_shredded(reader, refs, engine, signing_key)
        engine.dispose()

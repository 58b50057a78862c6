"""Data keys: one per owner across processes, master-key rotation, reading payloads."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, select, update

from compliance.audit_schema import data_keys, entries
from compliance.envelope import EnvelopeError
from compliance.keyring import KeyRing, rotate_master_key
from compliance.reader import AuditReader, PayloadUnavailable
from tests.compliance.conftest import MASTER_KEY, AppenderFactory
from tests.compliance.records import request_record

NEW_MASTER_KEY = bytes(range(100, 132))


def entries_digest(engine: Engine) -> str:
    digest = hashlib.sha256()
    with engine.connect() as connection:
        for row in connection.execute(select(entries).order_by(entries.c.writer_id, entries.c.seq)):
            digest.update(repr(tuple(row)).encode())
    return digest.hexdigest()


def test_one_data_key_per_owner_even_when_processes_race(engine: Engine) -> None:
    rings = [KeyRing(engine, MASTER_KEY) for _ in range(4)]  # as four gateway processes
    with ThreadPoolExecutor(4) as pool:
        keys = list(pool.map(lambda ring: ring.for_owner("subject:alice"), rings))
    assert len({k.id for k in keys}) == 1
    assert rings[0].for_owner("subject:bob").id != keys[0].id
    assert rings[1].ids_for("subject:alice") == [keys[0].id]
    with engine.connect() as connection:
        stored = connection.execute(select(data_keys.c.wrapped)).scalars().all()
    assert len(stored) == 2 and all(len(w) == 60 for w in stored)


def test_payloads_read_back_and_not_across_entries(
    engine: Engine, keyring: KeyRing, make_appender: AppenderFactory
) -> None:
    appender = make_appender()
    refs = appender.append_batch(
        [
            request_record(1),
            request_record(2, subject=None),
            request_record(3, key_id=None, subject=None),
        ]
    )
    reader = AuditReader(engine, keyring)
    read = [reader.entry(ref.id) for ref in refs]
    assert [reader.payload(e)["response"] for e in read if e] == [
        "answer 1",
        "answer 2",
        "answer 3",
    ]
    assert [e.as_json()["data_key_id"] for e in read if e] == [
        keyring.for_owner("subject:alice").id,
        keyring.for_owner("key:0123456789abcdef").id,
        keyring.for_owner("anonymous").id,
    ]
    assert [e.id for e in reader.entries(subject_id="alice")] == [refs[0].id]
    assert reader.entries(subject_id="nobody") == []
    assert len(reader.entries(key_id="0123456789abcdef")) == 2
    assert reader.entry("w1:99") is None
    with engine.begin() as connection:
        stolen = connection.execute(
            select(entries.c.payload).where(entries.c.seq == 1)
        ).scalar_one()
        connection.execute(update(entries).where(entries.c.seq == 3).values(payload=stolen))
    moved = reader.entry(refs[2].id)
    assert moved is not None
    with pytest.raises(PayloadUnavailable, match="does not open"):
        reader.payload(moved)


def test_rotation_rewraps_data_keys_and_leaves_entries_alone(
    engine: Engine, make_appender: AppenderFactory
) -> None:
    appender = make_appender()
    refs = appender.append_batch([request_record(n, subject=f"s{n}") for n in range(5)])
    before = entries_digest(engine)
    result = rotate_master_key(engine, MASTER_KEY, NEW_MASTER_KEY, batch=2)
    assert (result.rewrapped, result.foreign) == (5, 0)
    assert entries_digest(engine) == before
    assert rotate_master_key(engine, MASTER_KEY, NEW_MASTER_KEY).rewrapped == 0  # idempotent
    new_reader = AuditReader(engine, KeyRing(engine, NEW_MASTER_KEY))
    for ref in refs:
        entry = new_reader.entry(ref.id)
        assert entry is not None and new_reader.payload(entry)["response"].startswith("answer")
    old_reader = AuditReader(engine, KeyRing(engine, MASTER_KEY))
    entry = old_reader.entry(refs[0].id)
    assert entry is not None
    with pytest.raises(EnvelopeError, match="unknown master key"):
        old_reader.payload(entry)
    # During a rolling rotation a process can know both keys.
    both = AuditReader(engine, KeyRing(engine, NEW_MASTER_KEY, previous_master_keys=[MASTER_KEY]))
    assert both.payload(entry)["response"] == "answer 0"
    third = bytes(32)
    assert rotate_master_key(engine, third, bytes(range(1, 33))).foreign == 5


def test_a_batch_of_owners_gets_cached_and_new_keys(engine: Engine) -> None:
    now = [0.0]
    ring = KeyRing(engine, MASTER_KEY, cache_ttl_s=10, clock=lambda: now[0])
    alice = ring.for_owner("subject:alice")
    keys = ring.for_owners({"subject:alice", "subject:bob"})
    assert keys["subject:alice"] is alice and keys["subject:bob"].id != alice.id
    KeyRing(engine, MASTER_KEY).destroy_subject("bob")  # by another process
    assert ring.for_owners(["subject:bob"])["subject:bob"] is keys["subject:bob"]  # cached
    now[0] = 11.0  # the cache expired: the destruction is seen, bob gets a new key
    assert ring.for_owners(["subject:bob"])["subject:bob"].id not in (
        keys["subject:bob"].id,
        alice.id,
    )

"""The verifier catches every single-byte change, deletion, reordering and forgery."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, delete, insert, select, update

from compliance.appender import ChainAppender
from compliance.audit_schema import checkpoints, entries
from compliance.chain import entry_hash
from compliance.records import KEY_CREATED, AuditRecord
from compliance.signing import sign_checkpoint
from compliance.verify import Start, VerifyReport
from tests.compliance.conftest import AppenderFactory
from tests.compliance.records import request_record

Verify = Callable[..., VerifyReport]
TARGET = 15


def build_log(make_appender: AppenderFactory, writer_id: str = "w1") -> ChainAppender:
    """30 entries: checkpoints at 12 (end of the first batch), 22, and final at 30."""
    appender = make_appender(writer_id, every_entries=10)
    appender.append_batch([request_record(i) for i in range(1, 13)])
    for i in range(13, 31):
        if i == TARGET:
            record = request_record(i, subject=None, detail={"note": "target"})
        elif i % 7 == 0:
            record = AuditRecord(
                kind=KEY_CREATED, key_id="fedcba9876543210", detail={"roles": ["app"]}
            )
        else:
            record = request_record(i, subject="bob" if i % 2 else "alice")
        appender.append(record)
    appender.close()
    return appender


def problems(report: VerifyReport) -> list[tuple[str, int | None]]:
    return [(p.writer_id, p.seq) for p in report.problems]


def row(engine: Engine, seq: int, writer_id: str = "w1") -> Any:
    with engine.connect() as connection:
        return connection.execute(
            select(entries).where(entries.c.writer_id == writer_id, entries.c.seq == seq)
        ).one()


def change(engine: Engine, at: int, /, **values: Any) -> None:
    with engine.begin() as connection:
        result = connection.execute(
            update(entries).where(entries.c.writer_id == "w1", entries.c.seq == at).values(**values)
        )
        assert result.rowcount == 1


def flipped(value: Any) -> Any:
    """The value with one bit changed (a NULL becomes a value)."""
    if value is None:
        return "x"
    if isinstance(value, bytes):
        middle = len(value) // 2
        return value[:middle] + bytes([value[middle] ^ 0x01]) + value[middle + 1 :]
    if isinstance(value, int):
        return value ^ 0x100  # seq 15 -> 271: no collision with another entry
    return value[:-1] + chr(ord(value[-1]) ^ 0x01)


def test_an_intact_log_verifies(make_appender: AppenderFactory, verify: Verify) -> None:
    build_log(make_appender)
    build_log(make_appender, "w2")
    report = verify()
    assert report.ok, report.problems
    assert report.entries == 60 and report.checkpoints == 6
    assert [(c.writer_id, c.last_seq, c.signed_seq, c.closed) for c in report.chains] == [
        ("w1", 30, 30, True),
        ("w2", 30, 30, True),
    ]
    assert report.unsigned == 0


@pytest.mark.parametrize("column", [c.name for c in entries.columns])
def test_one_changed_bit_in_any_column_is_caught(
    column: str, engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    build_log(make_appender)
    value = getattr(row(engine, TARGET), column)
    change(engine, TARGET, **{column: flipped(value)})
    report = verify()
    assert not report.ok
    assert ("w1", TARGET) in problems(report), report.problems


def test_a_deleted_entry_is_caught(
    engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    build_log(make_appender)
    with engine.begin() as connection:
        connection.execute(delete(entries).where(entries.c.seq == TARGET))
    report = verify()
    assert problems(report) == [("w1", TARGET)]
    assert "missing" in str(report.problems[0])


def test_deleting_the_oldest_or_the_newest_entries_is_caught(
    engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    build_log(make_appender)
    with engine.begin() as connection:
        connection.execute(delete(entries).where(entries.c.seq.in_([1, 2])))
    assert problems(verify()) == [("w1", 1)]
    with engine.begin() as connection:
        connection.execute(delete(entries))
    build_log(make_appender, "w2")
    with engine.begin() as connection:
        connection.execute(
            delete(entries).where(entries.c.seq > 27)
        )  # the final checkpoint is at 30
    report = verify()
    assert ("w2", 28) in problems(report)
    assert "28..30" in str(report.problems[-1])


def test_two_swapped_entries_are_caught(
    engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    build_log(make_appender)
    change(engine, TARGET, seq=-1)
    change(engine, TARGET + 1, seq=TARGET)
    change(engine, -1, seq=TARGET + 1)
    assert problems(verify()) == [("w1", TARGET)]


def test_a_payload_moved_to_another_entry_is_caught(
    engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    build_log(make_appender)
    change(engine, 17, payload=row(engine, 19).payload)
    assert problems(verify()) == [("w1", 17)]


def test_altered_and_rehashed_entries_are_caught_at_the_next_checkpoint(
    engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    """An attacker who knows the algorithm but not the signing key re-hashes the rest."""
    build_log(make_appender)
    change(engine, TARGET, model="a-cheaper-model")
    prev = row(engine, TARGET - 1).entry_hash
    for seq in range(TARGET, 31):
        fields = [getattr(row(engine, seq), c) for c in entries.columns.keys()[1:-1]]
        prev = entry_hash(prev, "w1", fields)
        change(engine, seq, entry_hash=prev)
    report = verify()
    assert problems(report) == [("w1", 22)]
    assert "13..22 were altered and re-hashed" in str(report.problems[0])


def test_forged_checkpoints_are_caught(
    engine: Engine, make_appender: AppenderFactory, verify: Verify, signing_key: Ed25519PrivateKey
) -> None:
    build_log(make_appender)
    genuine = sign_checkpoint(signing_key, "periodic", "w1", 25, row(engine, 25).entry_hash, 1)
    forgeries = [
        {**genuine.as_row(), "signature": bytes(64)},
        {**genuine.as_row(), "seq": 26},
        {**genuine.as_row(), "writer_id": "w9"},
        sign_checkpoint(
            Ed25519PrivateKey.generate(), "periodic", "w1", 25, genuine.head_hash, 1
        ).as_row(),
    ]
    with engine.begin() as connection:
        connection.execute(insert(checkpoints), genuine.as_row())
    assert verify().ok
    for forged in forgeries:
        with engine.begin() as connection:
            forged_id = connection.execute(
                insert(checkpoints).returning(checkpoints.c.id), forged
            ).scalar()
        report = verify()
        assert [p.checkpoint_id for p in report.problems] == [forged_id], report.problems
        with engine.begin() as connection:
            connection.execute(delete(checkpoints).where(checkpoints.c.id == forged_id))
    with engine.begin() as connection:
        connection.execute(
            update(checkpoints).where(checkpoints.c.seq == 22).values(head_hash=b"\x00" * 32)
        )
    report = verify()
    assert report.problems and report.problems[0].checkpoint_id is not None
    assert "forged or altered" in str(report.problems[0])


def test_verification_can_start_at_an_entry_or_a_time(
    engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    build_log(make_appender)
    with engine.connect() as connection:
        signed_at = connection.execute(
            select(checkpoints.c.time_us).where(checkpoints.c.seq == 12)
        ).scalar_one()
    assert verify(start=Start(writer_id="w1", seq=20)).entries == 18  # from the checkpoint at 12
    assert verify(start=Start(time_us=signed_at)).entries == 18
    assert verify(start=Start(time_us=signed_at - 1)).entries == 30
    change(engine, 5, model="x")  # before the start: not looked at
    assert verify(start=Start(writer_id="w1", seq=20)).ok
    change(engine, 25, model="x")
    assert problems(verify(start=Start(writer_id="w1", seq=20))) == [("w1", 25)]
    assert problems(verify()) == [("w1", 5)]
    assert problems(verify(start=Start(writer_id="w9", seq=1))) == [("w9", None)]


def test_unsigned_entries_are_reported(make_appender: AppenderFactory, verify: Verify) -> None:
    appender = make_appender(every_entries=10)
    for i in range(13):
        appender.append(request_record(i))
    report = verify()
    assert report.ok and report.unsigned == 3 and not report.chains[0].closed


def test_parallel_verification_checks_the_same(
    engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    build_log(make_appender)
    build_log(make_appender, "w2")
    with engine.begin() as connection:  # the middle of w2 goes missing
        connection.execute(delete(entries).where(entries.c.writer_id == "w2", entries.c.seq == 17))
    change(engine, 25, model="x")  # w1's segment from the checkpoint at 22 is altered
    parallel = verify(jobs=2, segment_entries=5)  # w1 in three segments: 12, 22, tail
    serial = verify()
    assert problems(parallel) == problems(serial) == [("w1", 25), ("w2", 17)]
    assert [(c.writer_id, c.verified_from, c.last_seq) for c in parallel.chains] == [
        ("w1", 1, 30),
        ("w2", 1, 30),
    ]
    # A walk stops at its chain's first problem; segments after it are still walked.
    assert (serial.entries, parallel.entries) == (24 + 16, 24 + 16 + 8)

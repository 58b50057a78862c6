"""The batching writer: group commit, durability on return, backpressure, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from compliance.appender import ChainAppender
from compliance.audit_schema import checkpoints, entries
from compliance.audit_writer import AuditQueueFull, AuditWriteError, AuditWriter, AuditWriterClosed
from compliance.records import AuditRecord, EntryRef, prepare
from compliance.verify import VerifyReport
from gateway.store import make_engine
from tests.compliance.conftest import AppenderFactory
from tests.compliance.records import request_record

Verify = Callable[..., VerifyReport]


def count(engine: Engine, table: Any = entries) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


async def test_concurrent_appends_share_commits_and_are_durable_on_return(
    engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    other_process = make_engine(str(engine.url.render_as_string(hide_password=False)))
    seen_on_return: list[int] = []

    async with AuditWriter(make_appender(every_entries=100)) as writer:

        async def request(n: int) -> int:
            ref = await writer.append(request_record(n, subject=f"s{n % 5}"))
            with other_process.connect() as connection:  # a fresh connection sees it at once
                seen_on_return.append(
                    connection.execute(
                        select(func.count()).where(entries.c.seq == ref.seq)
                    ).scalar_one()
                )
            return ref.seq

        seqs = await asyncio.gather(*(request(n) for n in range(300)))
        stats = writer.stats
    other_process.dispose()
    assert sorted(seqs) == list(range(1, 301))
    assert seen_on_return == [1] * 300
    assert stats.entries == 300
    assert stats.batches <= 60, stats  # group commit: ~300 requests, far fewer transactions
    assert stats.largest_batch > 1
    report = verify()
    assert report.ok and report.entries == 300 and report.chains[0].closed


async def test_backpressure_when_the_database_is_slow(
    engine: Engine, make_appender: AppenderFactory
) -> None:
    appender = make_appender()
    release = threading.Event()
    started = threading.Event()
    real = appender.append_prepared

    def slow(batch: Any) -> Any:
        started.set()
        release.wait(10)
        return real(batch)

    appender.append_prepared = slow  # type: ignore[method-assign]
    writer = AuditWriter(appender, queue_size=3, max_batch=2).start()
    first = writer.append_nowait(request_record(0))
    await asyncio.to_thread(started.wait, 5)  # the first batch is in the (stuck) database
    queued = [writer.append_nowait(request_record(n)) for n in (1, 2, 3)]
    with pytest.raises(AuditQueueFull):
        writer.append_nowait(request_record(4))
    with pytest.raises(AuditQueueFull):
        writer.submit(request_record(4), timeout=0.05)
    waiting = asyncio.ensure_future(writer.append(request_record(5)))
    await asyncio.sleep(0.1)
    assert not waiting.done() and not first.done()
    release.set()
    refs = await asyncio.gather(first, *queued, waiting)
    assert [r.seq for r in refs] == [1, 2, 3, 4, 5]
    await writer.aclose()
    with pytest.raises(AuditWriterClosed):
        writer.append_nowait(request_record(6))


async def test_a_failed_batch_fails_its_records_and_the_writer_recovers(
    engine: Engine, make_appender: AppenderFactory, verify: Verify, monkeypatch: pytest.MonkeyPatch
) -> None:
    import compliance.appender as appender_module

    real = appender_module.insert_entries
    calls = {"n": 0}

    def flaky(connection: Any, rows: Any) -> None:
        calls["n"] += 1
        real(connection, rows)  # written, then the transaction fails: nothing may remain
        if calls["n"] == 2:
            raise OperationalError("INSERT", {}, Exception("database went away"))

    monkeypatch.setattr(appender_module, "insert_entries", flaky)
    async with AuditWriter(make_appender()) as writer:
        assert (await writer.append(request_record(1))).seq == 1
        with pytest.raises(AuditWriteError, match="database went away"):
            await writer.append(request_record(2))
        assert writer.stats.failed_batches == 1
        assert (await writer.append(request_record(3))).seq == 2
    assert count(engine) == 2
    assert verify().ok


def test_bad_records_fail_alone(make_appender: AppenderFactory, verify: Verify) -> None:
    with AuditWriter(make_appender()) as writer:
        with pytest.raises(ValueError):
            writer.submit(AuditRecord(model="a\x00b"))
        assert writer.write(request_record(1)).seq == 1
    assert verify().entries == 1


def test_threads_can_write_synchronously(make_appender: AppenderFactory, verify: Verify) -> None:
    with AuditWriter(make_appender(every_entries=1000)) as writer:
        results: list[int] = []

        def worker(base: int) -> None:
            for n in range(base, base + 20):
                results.append(writer.write(request_record(n), timeout=30).seq)

        threads = [threading.Thread(target=worker, args=(i * 100,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(results) == list(range(1, 81))
    assert verify().ok


def test_time_based_checkpoints_when_idle(engine: Engine, make_appender: AppenderFactory) -> None:
    with AuditWriter(make_appender(every_entries=1000, every_seconds=0.1)) as writer:
        writer.write(request_record(1))
        deadline = time.monotonic() + 5
        while count(engine, checkpoints) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count(engine, checkpoints) == 1  # signed without another append
    assert count(engine, checkpoints) == 2  # and the final one on close


def test_a_restarted_writer_continues_its_chain(
    engine: Engine, make_appender: AppenderFactory, verify: Verify
) -> None:
    first: ChainAppender = make_appender("gw-a")
    first.append_batch([request_record(n) for n in range(3)])  # crash: no final checkpoint
    second = make_appender("gw-a")
    assert second.append(request_record(9)).seq == 4
    second.close()
    report = verify()
    assert report.ok and report.entries == 4 and report.chains[0].closed


@pytest.mark.parametrize("sizes", [[1, 3, 17], [64, 257, 300], [2 * 256 + 64 + 16 + 4 + 3]])
def test_batches_of_any_size_are_stored_exactly(
    engine: Engine, make_appender: AppenderFactory, verify: Verify, sizes: list[int]
) -> None:
    appender = make_appender(every_entries=100)
    n = 0
    for size in sizes:  # the driver gets rows in several statement sizes or one COPY
        batch = [
            request_record(n + i, subject=None if i % 3 else f"s{i % 4}", detail={"i": i})
            for i in range(size - 1)
        ]
        batch.append(AuditRecord(request_id="r\u00e9\U0001f600", model="m", guard=None))
        refs = appender.append_batch(batch)
        n += size
        assert [r.seq for r in refs] == list(range(n - size + 1, n + 1))
    with engine.connect() as connection:
        stored = connection.execute(
            select(
                entries.c.seq, entries.c.request_id, entries.c.detail, entries.c.entry_hash
            ).order_by(entries.c.seq)
        ).all()
    assert [row.seq for row in stored] == list(range(1, n + 1))
    assert stored[-1].request_id == "r\u00e9\U0001f600" and stored[-1].detail is None
    assert {'{"i":0}', '{"i":1}'} <= {row.detail for row in stored}
    assert stored[-1].entry_hash == refs[-1].entry_hash
    report = verify()
    assert report.ok and report.entries == n


def test_record_checks_take_the_exact_path_only_when_needed() -> None:
    class Name(str):
        pass

    for fine in ["a\\u0000b", Name("subclassed"), "\u00e9t\u00e9"]:  # no NUL, no surrogate
        assert prepare(AuditRecord(model=fine)).columns[4] == fine
    for changes, error in [
        ({"guard": "\x00"}, ValueError),
        ({"watermark": "ok\ud800"}, ValueError),
        ({"route": 3}, TypeError),
        ({"status": 2.0}, TypeError),
        ({"time_us": -(2**53)}, ValueError),
    ]:
        with pytest.raises(error):
            prepare(AuditRecord(**changes))  # type: ignore[arg-type]
    ref = EntryRef("w", 3, b"h")
    assert ref.id == str(ref) == "w:3" and ref == EntryRef("w", 3, b"h")


@pytest.mark.parametrize("retry_s", [5.0, 0.0])
def test_the_first_call_rides_out_another_writer_holding_the_store(
    tmp_path: Any, retry_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 item 22: a healthy SQLite store failed a gateway's first call once, while
    another writer (a migration, the retention job's lease) held it at start-up. Here that
    writer holds the write lock longer than the writer's busy timeout: the first record
    still becomes durable, after the lock is released, and no call fails."""
    import sqlite3

    from compliance.keyring import KeyRing
    from gateway.store import migrate
    from tests.compliance.conftest import MASTER_KEY

    path = tmp_path / "audit.db"
    setup = make_engine(f"sqlite:///{path}")
    migrate(setup)
    setup.dispose()
    # A short busy timeout makes the conflict certain; production's 30 s only makes it rarer.
    engine = make_engine(f"sqlite:///{path}", busy_timeout_s=0.05)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    appender = ChainAppender(engine, KeyRing(engine, MASTER_KEY), Ed25519PrivateKey.generate())
    held, release = threading.Event(), threading.Event()

    def other_writer() -> None:
        connection = sqlite3.connect(path, isolation_level=None, timeout=0)
        connection.execute("BEGIN IMMEDIATE")  # the write lock, as a migration holds it
        connection.execute("UPDATE audit_entries SET kind = kind WHERE 0")
        held.set()
        release.wait(5)
        connection.execute("COMMIT")
        connection.close()

    import compliance.audit_writer

    monkeypatch.setattr(compliance.audit_writer, "LOCK_RETRY_S", retry_s)
    thread = threading.Thread(target=other_writer)
    thread.start()
    held.wait(5)
    try:
        with AuditWriter(appender) as writer:
            threading.Timer(0.4, release.set).start()
            if retry_s == 0:  # without trying again, the call fails: the race is real
                with pytest.raises(AuditWriteError, match="database is locked"):
                    writer.write(request_record(1), timeout=10)
                return
            ref = writer.write(request_record(1), timeout=10)
            assert ref.seq == 1
            assert writer.stats.lock_retries >= 1 and writer.stats.failed_batches == 0
    finally:
        release.set()
        thread.join()
        engine.dispose()
    assert count(make_engine(f"sqlite:///{path}")) == 1

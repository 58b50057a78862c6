"""AuditWriter: a bounded queue in front of a ChainAppender, drained by one thread.

The gateway awaits ``await writer.append(record)`` before it completes a response: the
call returns once the entry is committed (durable), so nothing a client saw completed
can be lost. That is made cheap by group commit: while one batch commits, new records
queue up, and the next transaction takes all of them (up to ``max_batch``), so many
concurrent requests share one commit and one fsync.

Why a thread rather than an asyncio task: the database drivers are blocking, the writer
must also serve synchronous callers (CLI, admin jobs, other threads), and one thread per
process keeps the chain's single-writer rule without locks around the appender. Results
go back to each event loop in one ``call_soon_threadsafe`` per batch, not per entry.

Backpressure: the queue holds at most ``queue_size`` records. ``append`` waits for room
(without blocking the loop), ``append_nowait`` raises :class:`AuditQueueFull`, and
``submit`` blocks its thread up to ``timeout``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine

from compliance.appender import ChainAppender, CheckpointPolicy
from compliance.keyring import KeyRing
from compliance.records import AuditRecord, EntryRef, PreparedRecord, prepare

log = logging.getLogger("bastion.audit")

Waiter = asyncio.Future[EntryRef] | concurrent.futures.Future[EntryRef]
_FAILURE_PAUSE_S = 0.05
LOCK_RETRY_S = 5.0
"""How long a batch that met a lock conflict is tried again before its calls fail."""
# SQLite's primary result codes for a busy or locked database; PostgreSQL's SQLSTATEs for
# a serialization failure, a deadlock victim and a lock not available.
_SQLITE_LOCK_CODES = frozenset({5, 6})
_POSTGRES_LOCK_STATES = frozenset({"40001", "40P01", "55P03"})


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` (a SQLAlchemy error, or the driver's) says another transaction
    held what this one needed: worth trying again, unlike a store that is down."""
    cause = getattr(exc, "orig", None) or exc
    code = getattr(cause, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_LOCK_CODES
    return getattr(cause, "sqlstate", None) in _POSTGRES_LOCK_STATES


class AuditQueueFull(Exception):
    """The writer's queue is full: the database is not keeping up."""


class AuditWriterClosed(Exception):
    """The writer was closed; nothing more is accepted."""


class AuditWriteError(Exception):
    """The batch holding this record could not be committed; see ``__cause__``."""


@dataclass(slots=True)
class WriterStats:
    entries: int = 0
    batches: int = 0
    """Transactions committed with entries: entries / batches is the group-commit factor."""
    failed_batches: int = 0
    largest_batch: int = 0
    lock_retries: int = 0
    """Batches tried again after a lock conflict (:func:`is_lock_conflict`)."""


class WriterObserver(Protocol):
    """What the writer reports (gateway: monitors.metrics_sink.AuditMetrics)."""

    def queue_depth(self, depth: int) -> None: ...

    def write(self, seconds: float) -> None: ...

    def failure(self) -> None: ...


class AuditWriter:
    """Queue + background thread + group commit over one :class:`ChainAppender`.

    ``start()`` (or ``with``/``async with``) starts the thread; ``close()`` writes what is
    queued, signs a final checkpoint and stops it.
    """

    def __init__(
        self,
        appender: ChainAppender,
        *,
        queue_size: int = 10_000,
        max_batch: int = 1_000,
        observer: WriterObserver | None = None,
    ) -> None:
        """``observer``: told of each batch's commit time, each failure and the queue's
        depth, from the writer thread (the gateway's metrics)."""
        if queue_size < 1 or max_batch < 1:
            raise ValueError("queue_size and max_batch must be at least 1")
        self.appender = appender
        self._observer = observer
        self.stats = WriterStats()
        self._queue_size = queue_size
        self._max_batch = max_batch
        self._queue: deque[tuple[PreparedRecord, Waiter]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._room_waiters: list[asyncio.Future[None]] = []
        self._idle = False  # the writer thread waits on _wake (so a record must wake it)
        self._closing = False
        self._thread = threading.Thread(
            target=self._run, name=f"audit-writer-{appender.writer_id}", daemon=True
        )

    @classmethod
    def open(
        cls,
        engine: Engine,
        master_key: bytes,
        signing_key: Ed25519PrivateKey,
        *,
        writer_id: str | None = None,
        policy: CheckpointPolicy | None = None,
        queue_size: int = 10_000,
        max_batch: int = 1_000,
        observer: WriterObserver | None = None,
    ) -> AuditWriter:
        """A started writer for this process: its own chain, data keys from ``master_key``."""
        keyring = KeyRing(engine, master_key)
        appender = ChainAppender(engine, keyring, signing_key, writer_id, policy=policy)
        writer = cls(appender, queue_size=queue_size, max_batch=max_batch, observer=observer)
        return writer.start()

    @property
    def keyring(self) -> KeyRing:
        return self.appender.keyring

    @property
    def writer_id(self) -> str:
        return self.appender.writer_id

    def start(self) -> Self:
        self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        """Whether records are taken (the writer is open)."""
        return not self._closing

    # --- producers -------------------------------------------------------------------

    async def append(self, record: AuditRecord) -> EntryRef:
        """Queue ``record`` (waiting for room) and return once its entry is durable."""
        prepared = prepare(record)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[EntryRef] = loop.create_future()
        while not self._put(prepared, done):
            room: asyncio.Future[None] = loop.create_future()
            with self._lock:
                if len(self._queue) < self._queue_size:
                    continue  # room was made meanwhile
                self._room_waiters.append(room)
            await room
        return await done

    def append_nowait(self, record: AuditRecord) -> asyncio.Future[EntryRef]:
        """Queue ``record`` or raise AuditQueueFull; the future resolves when durable."""
        prepared = prepare(record)
        done: asyncio.Future[EntryRef] = asyncio.get_running_loop().create_future()
        if not self._put(prepared, done):
            raise AuditQueueFull(f"audit queue full ({self._queue_size} records)")
        return done

    def submit(
        self, record: AuditRecord, *, timeout: float | None = None
    ) -> concurrent.futures.Future[EntryRef]:
        """From any thread: queue ``record``, blocking up to ``timeout`` s for room."""
        prepared = prepare(record)
        done: concurrent.futures.Future[EntryRef] = concurrent.futures.Future()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while len(self._queue) >= self._queue_size:
                self._check_open()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AuditQueueFull(f"audit queue full ({self._queue_size} records)")
                self._room.wait(left)
            self._check_open()
            self._queue.append((prepared, done))
            self._wake.notify()
        return done

    def write(self, record: AuditRecord, *, timeout: float | None = None) -> EntryRef:
        """Synchronous: queue ``record`` and wait until it is durable."""
        return self.submit(record, timeout=timeout).result(timeout)

    def _put(self, prepared: PreparedRecord, done: Waiter) -> bool:
        """Queue it, or return False if the queue is full."""
        with self._lock:
            self._check_open()
            if len(self._queue) >= self._queue_size:
                return False
            self._queue.append((prepared, done))
            if self._idle:  # a busy writer takes the queue when its batch is done
                self._wake.notify()
            return True

    def _check_open(self) -> None:
        if self._closing:
            raise AuditWriterClosed("the audit writer is closed")

    # --- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    wait = self.appender.seconds_until_checkpoint()
                    if wait is not None and wait <= 0:
                        break
                    self._idle = True
                    self._wake.wait(wait)
                    self._idle = False
                take = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(take)]
                finished = self._closing and not self._queue and not batch
                if batch:
                    self._room.notify_all()
                    room, self._room_waiters = self._room_waiters, []
            if batch:
                _settle_all([(w, None, None) for w in room])
                self._write(batch)
            elif finished:
                break
            else:
                self._checkpoint()
        try:
            self.appender.close()
        except Exception:
            log.exception("audit writer %s: the final checkpoint failed", self.writer_id)

    def _write(self, batch: list[tuple[PreparedRecord, Waiter]]) -> None:
        records = [prepared for prepared, _ in batch]
        observer = self._observer
        started = time.perf_counter()
        try:
            refs = self._append_riding_out_locks(records)
        except Exception as exc:
            self.stats.failed_batches += 1
            if observer is not None:
                observer.failure()
            log.error("audit writer %s: a batch of %d failed: %s", self.writer_id, len(batch), exc)
            error = AuditWriteError(f"the audit entry could not be written: {exc}")
            error.__cause__ = exc
            _settle_all([(waiter, None, error) for _, waiter in batch])
            time.sleep(_FAILURE_PAUSE_S)  # a database that is down is not hammered
            return
        if observer is not None:
            observer.write(time.perf_counter() - started)
            observer.queue_depth(len(self._queue))
        self.stats.entries += len(batch)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        _resolve_all([waiter for _, waiter in batch], refs)

    def _append_riding_out_locks(self, records: list[PreparedRecord]) -> list[EntryRef]:
        """The batch, committed; a lock conflict is tried again for up to LOCK_RETRY_S.

        A store that is up must not fail a call because another writer held it a moment:
        SQLite waits out a held lock (its busy timeout) but answers some conflicts at once
        (a snapshot gone stale, WAL recovery by another process at start-up), PostgreSQL
        may pick this transaction as a deadlock's victim. The batch is all or nothing and
        the appender re-reads its head after a failure, so trying again is safe."""
        deadline = time.monotonic() + LOCK_RETRY_S
        pause = _FAILURE_PAUSE_S / 5
        while True:
            try:
                return self.appender.append_prepared(records)
            except Exception as exc:
                if not is_lock_conflict(exc) or time.monotonic() + pause > deadline:
                    raise
                self.stats.lock_retries += 1
                log.warning(
                    "audit writer %s: the store was locked (%s); trying again",
                    self.writer_id,
                    type(exc).__name__,
                )
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _checkpoint(self) -> None:
        try:
            self.appender.checkpoint_if_due()
        except Exception as exc:
            log.error("audit writer %s: checkpoint failed: %s", self.writer_id, exc)
            time.sleep(_FAILURE_PAUSE_S * 20)

    # --- shutdown --------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued, sign the final checkpoint, stop the thread."""
        with self._lock:
            self._closing = True
            self._wake.notify()
            self._room.notify_all()
            room, self._room_waiters = self._room_waiters, []
        _settle_all([(w, None, AuditWriterClosed("the audit writer is closed")) for w in room])
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


Settlement = tuple[
    asyncio.Future[EntryRef] | asyncio.Future[None] | concurrent.futures.Future[EntryRef],
    object,
    BaseException | None,
]


def _settle_all(settlements: list[Settlement]) -> None:
    """Resolve futures: thread futures directly, loop futures in one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]] = {}
    for item in settlements:
        future = item[0]
        if isinstance(future, concurrent.futures.Future):
            _settle(item)
        else:
            by_loop.setdefault(future.get_loop(), []).append(item)
    for loop, items in by_loop.items():
        # A closed loop raises RuntimeError: nobody is waiting there any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_each, items)


def _resolve_all(waiters: list[Waiter], refs: list[EntryRef]) -> None:
    """:func:`_settle_all` for a committed batch, the per-entry path kept short."""
    by_loop: dict[
        asyncio.AbstractEventLoop, tuple[list[asyncio.Future[EntryRef]], list[EntryRef]]
    ] = {}
    for waiter, ref in zip(waiters, refs, strict=True):
        if isinstance(waiter, concurrent.futures.Future):
            _settle((waiter, ref, None))
            continue
        loop = waiter.get_loop()
        pending = by_loop.get(loop)
        if pending is None:
            pending = by_loop[loop] = ([], [])
        pending[0].append(waiter)
        pending[1].append(ref)
    for loop, (futures, results) in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there
            loop.call_soon_threadsafe(_resolve_each, futures, results)


def _resolve_each(futures: list[asyncio.Future[EntryRef]], refs: list[EntryRef]) -> None:
    for future, ref in zip(futures, refs, strict=True):
        if not future.done():  # else cancelled by its waiter
            future.set_result(ref)


def _settle_each(items: list[Settlement]) -> None:
    for item in items:
        _settle(item)


def _settle(item: Settlement) -> None:
    future, result, error = item
    if future.done():  # cancelled by its waiter
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except (asyncio.InvalidStateError, concurrent.futures.InvalidStateError):
        pass  # cancelled meanwhile (a thread's future)

"""A bounded, crash-safe on-disk spool of event documents: one per writer process.

Layout of one spool directory (0700; every file 0600)::

    owner.lock                 flock'd by the process that owns the spool, for its life
    io.lock                    flock'd around every read and write of the segments
    00000000000000000001.seg   append-only segments of records, oldest first
    cursor                     "<segment> <offset>": where replay resumes

Records (:mod:`.spool_records`) carry a length and a CRC: a torn record (a crash in the
middle of a write) fails the check; reading stops there and skips the rest of that
segment, so nothing after it is mistaken for data and nothing before it is lost.
``append(..., sync=True)`` returns after ``fsync``: that is the moment a record is
acknowledged, and from then on a SIGKILL or power loss does not lose it. A new
segment's directory entry is fsync'd too.

The cursor is written without fsync: losing it means replaying documents the cluster
already has, which their ``_id`` turns into harmless duplicates.

Bounded: when an append would take the segments over ``max_bytes``, the oldest segment is
dropped whole and its unreplayed records counted in ``dropped``; never before.

Several processes: each gateway worker writes its own directory; ``owner.lock`` is held
while its process lives (the kernel releases it on any death, SIGKILL included), so a
live process that can take it knows the spool is an orphan and may adopt and replay it.
Erasure may rewrite records of any spool in place (a tombstone of the same length), under
``io.lock``, so no owner ever sees a file change under its feet.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from monitors.events.spool_records import MAX_PAYLOAD, Record, encode, scan, tombstone

_SUFFIX = ".seg"


@dataclass(slots=True)
class SpoolBatch:
    """Records read from the head of the spool, and where consuming them leaves the cursor."""

    payloads: list[bytes] = field(default_factory=list)
    times_us: list[int] = field(default_factory=list)
    passed: dict[int, int] = field(default_factory=dict)
    """Records passed over per segment, tombstones included (what ``consume`` subtracts)."""
    end: tuple[int, int] = (0, 0)


@dataclass(slots=True)
class _Segment:
    size: int
    pending: int  # records not yet consumed


def _seg_name(number: int) -> str:
    return f"{number:020d}{_SUFFIX}"


def _flock(path: Path, flags: int) -> int | None:
    """Open ``path`` (0600) and flock it; None when LOCK_NB and someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """One spool directory. Thread-safe; every method blocks on disk (call it off the loop).

    An owner (``owner_fd``: its ``owner.lock``, flock'd) may append and replay; a visitor
    (no ``owner_fd``) may only :meth:`purge` (erasure in another live process's spool).
    """

    def __init__(self, directory: Path, max_bytes: int, *, owner_fd: int | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = max(8 * 1024, min(16 * 1024 * 1024, max_bytes // 8))
        self.dropped = 0
        """Records lost because the spool was full (oldest segment dropped)."""
        self._torn: set[int] = set()
        self._owner_fd = owner_fd
        self._lock = threading.Lock()
        if owner_fd is not None:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        self._io_fd = os.open(directory / "io.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._active_fd: int | None = None
        self._segments: dict[int, _Segment] = {}
        self._cursor = (0, 0)
        self._next = 1
        self.oldest_time_us: int | None = None
        self.events = 0
        """Records waiting for replay (tombstones included until passed over)."""
        self.bytes = 0
        """Bytes on disk in segments."""
        if owner_fd is not None:
            with self._locked():
                self._load()

    # construction ---------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, max_bytes: int) -> Spool:
        """A new spool for this process under ``root`` (``<pid>-<random>``)."""
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = root / f"{os.getpid()}-{secrets.token_hex(4)}"
        directory.mkdir(mode=0o700)
        fd = _flock(directory / "owner.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert fd is not None  # a directory nobody else knows yet
        return cls(directory, max_bytes, owner_fd=fd)

    @classmethod
    def adopt(cls, directory: Path, max_bytes: int) -> Spool | None:
        """Take over the spool of a process that died; None while its owner lives."""
        try:
            fd = _flock(directory / "owner.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if fd is None:
            return None
        return cls(directory, max_bytes, owner_fd=fd)

    @staticmethod
    def directories(root: Path) -> list[Path]:
        """Every spool directory under ``root`` (live, orphaned or being removed)."""
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and (p / "owner.lock").exists())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._io_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._io_fd, fcntl.LOCK_UN)

    # state ----------------------------------------------------------------------------

    @property
    def corrupt(self) -> int:
        """Segments whose tail held a torn or corrupt record (skipped from there on)."""
        return len(self._torn)

    def _recount(self) -> int:
        """Refresh ``events`` and ``bytes`` (read without the lock by metrics)."""
        self.events = sum(s.pending for s in self._segments.values())
        self.bytes = sum(s.size for s in self._segments.values())
        return self.events

    def _load(self) -> None:
        numbers = sorted(
            int(p.name[: -len(_SUFFIX)])
            for p in self.directory.iterdir()
            if p.name.endswith(_SUFFIX) and p.name[: -len(_SUFFIX)].isdigit()
        )
        cursor = (numbers[0], 0) if numbers else (0, 0)
        try:
            seg, off = (self.directory / "cursor").read_text().split()
            if int(seg) in numbers:
                cursor = (int(seg), int(off))
        except (FileNotFoundError, ValueError):
            pass
        for number in numbers:
            if number < cursor[0]:  # consumed, not yet deleted
                (self.directory / _seg_name(number)).unlink(missing_ok=True)
                continue
            start = cursor[1] if number == cursor[0] else 0
            count = sum(1 for _ in self._scan(number, start))
            if count == 0:  # delivered, or nothing intact in it: a previous life's leftover
                (self.directory / _seg_name(number)).unlink(missing_ok=True)
                continue
            size = (self.directory / _seg_name(number)).stat().st_size
            self._segments[number] = _Segment(size, count)
        if not self._segments:
            cursor = (0, 0)
        elif cursor[0] not in self._segments:
            cursor = (min(self._segments), 0)
        self._cursor = cursor
        self._next = (numbers[-1] + 1) if numbers else 1
        self._recount()
        self._update_oldest()

    def _scan(self, number: int, start: int) -> Iterator[Record]:
        """Each intact record of a segment from ``start``; remembers a torn tail."""
        for record in scan(self.directory / _seg_name(number), start):
            if record is None:
                self._torn.add(number)
                return
            yield record

    def _update_oldest(self) -> None:
        self.oldest_time_us = None
        for number in sorted(self._segments):
            start = self._cursor[1] if number == self._cursor[0] else 0
            for record in self._scan(number, start):
                if not record.erased:
                    self.oldest_time_us = record.time_us
                    return

    # writing --------------------------------------------------------------------------

    def append(self, records: list[tuple[int, bytes]], *, sync: bool = True) -> int:
        """Append ``(time_us, payload)`` records in order; returns how many were dropped
        (oldest first) to make room. With ``sync`` the records are durable on return."""
        if self._owner_fd is None:
            raise RuntimeError("only the spool's owner appends")
        before = self.dropped
        with self._locked():
            chunk: list[bytes] = []
            chunk_size = 0
            for time_us, payload in records:
                if len(payload) > MAX_PAYLOAD:
                    self.dropped += 1
                    continue
                record = encode(time_us, payload)
                active = self._segments.get(self._next - 1) if self._active_fd is not None else None
                if active is None or active.size + chunk_size + len(record) > self.segment_bytes:
                    self._write(chunk)
                    chunk, chunk_size = [], 0
                    self._rotate()
                self._make_room(chunk_size + len(record))
                chunk.append(record)
                chunk_size += len(record)
                self._segments[self._next - 1].pending += 1
                if self.oldest_time_us is None:
                    self.oldest_time_us = time_us
            self._write(chunk)
            self._recount()
            fd = os.dup(self._active_fd) if sync and self._active_fd is not None else None
        if fd is not None:  # outside the lock: a concurrent append need not wait for it
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.dropped - before

    def sync(self) -> None:
        """Make every record appended so far durable (after ``append(..., sync=False)``)."""
        with self._locked():
            fd = os.dup(self._active_fd) if self._active_fd is not None else None
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write(self, chunk: list[bytes]) -> None:
        if not chunk or self._active_fd is None:
            return
        data = b"".join(chunk)
        segment = self._segments[self._next - 1]
        try:
            written = os.write(self._active_fd, data)
            if written != len(data):
                raise OSError("short write to the spool")
        except OSError:
            os.ftruncate(self._active_fd, segment.size)  # no torn record of our own
            segment.pending -= len(chunk)
            raise
        segment.size += len(data)

    def _rotate(self) -> None:
        if self._active_fd is not None:
            os.fsync(self._active_fd)  # records appended without sync become durable here
            os.close(self._active_fd)
        number = self._next
        self._next += 1
        path = self.directory / _seg_name(number)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        self._active_fd = os.open(path, flags, 0o600)
        self._segments[number] = _Segment(0, 0)
        if not self._cursor[0]:
            self._cursor = (number, 0)
        _fsync_dir(self.directory)

    def _make_room(self, needed: int) -> None:
        while len(self._segments) > 1:
            if sum(s.size for s in self._segments.values()) + needed <= self.max_bytes:
                return
            oldest = min(self._segments)
            segment = self._segments.pop(oldest)
            self.dropped += segment.pending
            (self.directory / _seg_name(oldest)).unlink(missing_ok=True)
            self._cursor = (min(self._segments), 0)
            self._write_cursor()
            self._update_oldest()

    def _write_cursor(self) -> None:
        tmp = self.directory / "cursor.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{self._cursor[0]} {self._cursor[1]}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / "cursor")

    # reading and consuming ------------------------------------------------------------

    def read(self, max_records: int, max_bytes: int = 8 * 1024 * 1024) -> SpoolBatch:
        """Up to ``max_records`` payloads from the head, in order, tombstones skipped."""
        batch = SpoolBatch(end=self._cursor)
        size = 0
        with self._locked():
            for number in sorted(self._segments):
                start = self._cursor[1] if number == self._cursor[0] else 0
                for record in self._scan(number, start):
                    full = len(batch.payloads) >= max_records
                    if full or (size and size + len(record.payload) > max_bytes):
                        return batch
                    batch.passed[number] = batch.passed.get(number, 0) + 1
                    batch.end = (number, record.end)
                    if not record.erased:
                        batch.payloads.append(record.payload)
                        batch.times_us.append(record.time_us)
                        size += len(record.payload)
            if not batch.passed and self.events:
                self._forget_unreadable()
        return batch

    def _forget_unreadable(self) -> None:
        """Counted records that cannot be read (a corrupt segment): stop counting them,
        so replay does not spin on them, and drop the segments no one appends to."""
        for number in list(self._segments):
            self._segments[number].pending = 0
            if not self._is_active(number):
                self._segments.pop(number)
                (self.directory / _seg_name(number)).unlink(missing_ok=True)
        self._recount()

    def consume(self, batch: SpoolBatch) -> None:
        """Mark a batch as delivered: move the cursor, delete segments left behind."""
        with self._locked():
            for number, passed in batch.passed.items():
                segment = self._segments.get(number)
                if segment is None:  # dropped meanwhile to make room
                    continue
                segment.pending = max(segment.pending - passed, 0)
                if segment.pending == 0 and not self._is_active(number):
                    self._segments.pop(number)
                    (self.directory / _seg_name(number)).unlink(missing_ok=True)
            if self._recount() == 0:
                self._reset()
            else:
                first = min(self._segments)
                self._cursor = batch.end if batch.end[0] == first else (first, 0)
                self._write_cursor()
            self._update_oldest()

    def _is_active(self, number: int) -> bool:
        return self._active_fd is not None and number == self._next - 1

    def _reset(self) -> None:
        """Everything delivered: remove the segments so an empty spool costs nothing."""
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        for number in list(self._segments):
            (self.directory / _seg_name(number)).unlink(missing_ok=True)
        self._segments.clear()
        self._recount()
        self._cursor = (0, 0)
        (self.directory / "cursor").unlink(missing_ok=True)

    # erasure ----------------------------------------------------------------------------

    def purge(self, matches: Callable[[bytes], bool]) -> int:
        """Overwrite every record whose payload ``matches`` with a tombstone of the same
        length (payload zeroed), fsync'd; returns how many. Works on any spool."""
        erased = 0
        with self._locked():
            numbers = sorted(
                int(p.name[: -len(_SUFFIX)])
                for p in self.directory.iterdir()
                if p.name.endswith(_SUFFIX) and p.name[: -len(_SUFFIX)].isdigit()
            )
            for number in numbers:
                hits = [
                    record
                    for record in self._scan(number, 0)
                    if not record.erased and matches(record.payload)
                ]
                if not hits:
                    continue
                fd = os.open(self.directory / _seg_name(number), os.O_WRONLY)
                try:
                    for record in hits:
                        os.pwrite(fd, tombstone(record), record.offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                erased += len(hits)
            if self._owner_fd is not None:
                self._update_oldest()
        return erased

    # closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Release the spool; an empty one is removed, a non-empty one waits for adoption."""
        with self._lock:
            if self._active_fd is not None:
                os.fsync(self._active_fd)
                os.close(self._active_fd)
                self._active_fd = None
            if self._owner_fd is not None and not self._segments:
                for name in ("cursor", "cursor.tmp", "io.lock", "owner.lock"):
                    (self.directory / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.directory.rmdir()
            os.close(self._io_fd)
            if self._owner_fd is not None:
                os.close(self._owner_fd)
                self._owner_fd = None

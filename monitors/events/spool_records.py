"""The spool's record format: length, CRC, flags, time, payload; and reading it back.

A record is ``<u32 body length><u32 crc32(body)>`` then the body ``<u8 flags><i64 time_us>
<payload>`` (little-endian). A crash in the middle of a write leaves a torn record whose
length or CRC does not check out; :func:`scan` stops there and says so, and nothing after
it in that segment is trusted. An erased record keeps its length (a tombstone: flag set,
payload zeroed), so erasure rewrites bytes in place and never moves a record.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

_HEAD = struct.Struct("<II")  # body length, crc32(body)
_BODY = struct.Struct("<Bq")  # flags, time_us
ERASED = 1
MAX_PAYLOAD = 16 * 1024 * 1024


class Record(NamedTuple):
    offset: int
    end: int
    flags: int
    time_us: int
    payload: bytes

    @property
    def erased(self) -> bool:
        return bool(self.flags & ERASED)


def encode(time_us: int, payload: bytes, flags: int = 0) -> bytes:
    body = _BODY.pack(flags, time_us) + payload
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def tombstone(record: Record) -> bytes:
    """The same number of bytes as ``record``, erased: its payload is gone from disk."""
    return encode(record.time_us, bytes(len(record.payload)), ERASED)


def scan(path: Path, start: int) -> Iterator[Record | None]:
    """Each intact record from ``start``; ``None`` once, then stop, at a torn record.
    A missing file yields nothing."""
    try:
        handle = open(path, "rb", buffering=1 << 16)  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return
    with handle:
        handle.seek(start)
        offset = start
        while head := handle.read(_HEAD.size):
            if len(head) < _HEAD.size:
                yield None
                return
            length, crc = _HEAD.unpack(head)
            sane = _BODY.size <= length <= MAX_PAYLOAD + _BODY.size
            body = handle.read(length) if sane else b""
            if not body or len(body) != length or zlib.crc32(body) != crc:
                yield None
                return
            flags, time_us = _BODY.unpack_from(body)
            end = offset + _HEAD.size + length
            yield Record(offset, end, flags, time_us, body[_BODY.size :])
            offset = end

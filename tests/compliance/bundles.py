"""Reading and rewriting export bundles in tests (to tamper with them)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def read_bundle(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:") as tar:
        out = {}
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            assert handle is not None
            out[member.name] = handle.read()
        return out


def write_bundle(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def flip_byte(data: bytes, marker: bytes) -> bytes:
    """``data`` with the first byte after ``marker`` changed."""
    at = data.index(marker) + len(marker)
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]

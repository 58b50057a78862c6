"""Reading and rewriting export bundles in tests (to tamper with them)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


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


def resign(files: dict[str, bytes], key: Ed25519PrivateKey) -> dict[str, bytes]:
    """What someone holding the signing key could do: update the manifest's file hashes
    after changing the files, and sign it again."""
    manifest = orjson.loads(files["manifest.json"])
    for name, listed in manifest["files"].items():
        data = files[name]
        listed |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        listed["lines"] = data.count(b"\n")
    files["manifest.json"] = orjson.dumps(manifest)
    files["manifest.sig"] = key.sign(files["manifest.json"])
    return files

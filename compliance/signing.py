"""Ed25519 keys for checkpoints: the PEM file, fingerprints, signing and checking.

The private key lives in ``BASTION_SIGNING_KEY_FILE`` (PKCS#8 PEM, unencrypted, mode
0600); the caller loads it and passes the key object in. Verifiers need only the public
key (``bastion audit public-key`` prints it), so an auditor can check a log, or an
export, without being able to sign.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compliance.chain import CHECKPOINT_KINDS, Checkpoint, checkpoint_message
from compliance.private_files import make_private_directory


class SigningKeyError(Exception):
    """The key file is missing, unreadable or not an Ed25519 key."""


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """16 hex digits naming a public key (SHA-256 of its raw bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def create_signing_key_file(path: Path) -> Ed25519PrivateKey:
    """Write a new Ed25519 private key (PEM, mode 0600); FileExistsError if there is one."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    make_private_directory(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key {path} ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key in ``path``, created first if the file does not exist (dev setups)."""
    try:
        return create_signing_key_file(path)
    except FileExistsError:
        return load_signing_key(path)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The public key in a PEM file holding either the public or the private key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read {path} ({exc.strerror})") from exc
    if b"PRIVATE KEY" in data:
        return load_signing_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SigningKeyError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def sign_checkpoint(
    key: Ed25519PrivateKey, kind: str, writer_id: str, seq: int, head_hash: bytes, time_us: int
) -> Checkpoint:
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    signature = key.sign(checkpoint_message(kind, writer_id, seq, head_hash, time_us))
    return Checkpoint(
        writer_id, seq, kind, head_hash, time_us, fingerprint(key.public_key()), signature
    )


class CheckpointVerifier:
    """Checks checkpoint signatures against a set of trusted public keys."""

    def __init__(self, public_keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {fingerprint(k): k for k in public_keys}
        if not self._keys:
            raise ValueError("no public key to check checkpoints with")

    def problem(self, checkpoint: Checkpoint) -> str | None:
        """None if the checkpoint is genuine, else why not."""
        key = self._keys.get(checkpoint.signer)
        if key is None:
            return f"signed by an unknown key {checkpoint.signer!r}"
        if checkpoint.kind not in CHECKPOINT_KINDS:
            return f"unknown kind {checkpoint.kind!r}"
        try:
            key.verify(checkpoint.signature, checkpoint.message())
        except InvalidSignature:
            return "the signature does not match (forged or altered)"
        return None

"""Envelope encryption of audit payloads: master key → KEK → data keys → payloads.

- The **key-encryption key** (KEK) is derived from the 32-byte master key with
  HKDF-SHA256 (``info = "bastion/audit-kek/v1"``, the gateway's purpose-key scheme), so
  the master key itself never encrypts anything. Its id is a 64-bit HMAC tag of the KEK,
  stored next to every data key it wraps: rotation knows what it has re-wrapped.
- A **data key** is 32 random bytes, wrapped as ``nonce(12) || AES-256-GCM(KEK)`` with
  the data key's id as associated data, so wrapped keys cannot be swapped between rows.
- A **payload** is sealed as ``nonce(12) || AES-256-GCM(data key)`` with associated data
  naming its entry (writer id, sequence number, data-key id): a ciphertext moved to
  another entry does not open.

Nonces are random (96 bits); a data key should seal fewer than 2**32 payloads (NIST SP
800-38D), far beyond what one subject or API key produces between master-key rotations.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_BYTES = 32
NONCE_BYTES = 12


class EnvelopeError(Exception):
    """A wrapped key or a sealed payload does not open (wrong key, or altered bytes)."""


def derive_kek(master_key: bytes) -> bytes:
    if len(master_key) != MASTER_KEY_BYTES:
        raise ValueError(f"the master key must be {MASTER_KEY_BYTES} bytes, not {len(master_key)}")
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"bastion/audit-kek/v1"
    ).derive(master_key)


class KeyEncryptionKey:
    """Wraps and unwraps data keys; built from the master key."""

    __slots__ = ("_aead", "id")

    def __init__(self, master_key: bytes) -> None:
        kek = derive_kek(master_key)
        self.id = hmac.new(kek, b"bastion/audit-kek-id", hashlib.sha256).hexdigest()[:16]
        self._aead = AESGCM(kek)

    def wrap(self, data_key_id: str, data_key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data_key, _wrap_aad(data_key_id))

    def unwrap(self, data_key_id: str, wrapped: bytes) -> bytes:
        try:
            return self._aead.decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_aad(data_key_id)
            )
        except InvalidTag as exc:
            raise EnvelopeError(
                f"data key {data_key_id} does not unwrap with KEK {self.id}"
            ) from exc


def _wrap_aad(data_key_id: str) -> bytes:
    return b"bastion/audit-data-key/v1|" + data_key_id.encode()


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def payload_aad(writer_id: str, seq: int, data_key_id: str) -> bytes:
    """Associated data binding a sealed payload to its entry."""
    return f"bastion/audit-payload/v1|{writer_id}|{seq}|{data_key_id}".encode()


def seal(aead: AESGCM, aad: bytes, plaintext: bytes, nonce: bytes | None = None) -> bytes:
    """``nonce || AES-GCM(plaintext)``; ``nonce``: 12 fresh random bytes (default: drawn)."""
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    elif len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
    return nonce + aead.encrypt(nonce, plaintext, aad)


def fresh_nonces(count: int) -> list[bytes]:
    """``count`` random nonces from one system call.

    The writer thread draws them per batch: ``os.urandom`` releases the GIL, and a thread
    that releases it once per entry waits for the event loop's thread each time.
    """
    pool = os.urandom(NONCE_BYTES * count)
    return [pool[i : i + NONCE_BYTES] for i in range(0, len(pool), NONCE_BYTES)]


def open_sealed(aead: AESGCM, aad: bytes, sealed: bytes) -> bytes:
    try:
        return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise EnvelopeError("the payload does not open: altered, moved, or another key") from exc

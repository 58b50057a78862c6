"""Envelope encryption: KEK from the master key, wrapped data keys, sealed payloads."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from compliance.envelope import (
    EnvelopeError,
    KeyEncryptionKey,
    derive_kek,
    new_data_key,
    open_sealed,
    payload_aad,
    seal,
)

MASTER = bytes(range(32))


def test_the_kek_is_derived_not_the_master_key() -> None:
    kek = derive_kek(MASTER)
    assert len(kek) == 32 and kek != MASTER
    assert kek == derive_kek(MASTER)
    assert derive_kek(bytes(32)) != kek
    assert KeyEncryptionKey(MASTER).id == KeyEncryptionKey(MASTER).id
    assert KeyEncryptionKey(MASTER).id != KeyEncryptionKey(bytes(32)).id
    with pytest.raises(ValueError, match="32 bytes"):
        derive_kek(b"short")


def test_wrapped_keys_open_only_with_their_id_and_kek() -> None:
    kek = KeyEncryptionKey(MASTER)
    key = new_data_key()
    wrapped = kek.wrap("k1", key)
    assert key not in wrapped and len(wrapped) == 12 + 32 + 16
    assert kek.unwrap("k1", wrapped) == key
    with pytest.raises(EnvelopeError):
        kek.unwrap("k2", wrapped)  # moved to another row
    with pytest.raises(EnvelopeError):
        KeyEncryptionKey(bytes(32)).unwrap("k1", wrapped)
    tampered = bytearray(wrapped)
    tampered[20] ^= 1
    with pytest.raises(EnvelopeError):
        kek.unwrap("k1", bytes(tampered))


def test_a_payload_opens_only_in_its_own_entry() -> None:
    aead = AESGCM(new_data_key())
    sealed = seal(aead, payload_aad("w1", 7, "k1"), b'{"prompt":"secret"}')
    assert b"secret" not in sealed
    assert open_sealed(aead, payload_aad("w1", 7, "k1"), sealed) == b'{"prompt":"secret"}'
    for aad in (payload_aad("w1", 8, "k1"), payload_aad("w2", 7, "k1"), payload_aad("w1", 7, "k2")):
        with pytest.raises(EnvelopeError):
            open_sealed(aead, aad, sealed)
    with pytest.raises(EnvelopeError):
        open_sealed(AESGCM(new_data_key()), payload_aad("w1", 7, "k1"), sealed)
    # Fresh nonces: the same plaintext never seals to the same bytes.
    assert seal(aead, b"a", b"x") != seal(aead, b"a", b"x")

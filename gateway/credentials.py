"""The master key, and the keys derived from it.

The master key (32 random bytes) comes from ``BASTION_MASTER_KEY`` (base64) or the file
named by ``BASTION_MASTER_KEY_FILE``. Purpose keys are derived from it with HKDF-SHA256,
one ``info`` label each, so no key is used for two purposes. A dev setup creates a key
file for itself under ``.bastion/`` and says where.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.config import ConfigError, StoreSettings

log = logging.getLogger("bastion.credentials")

DEV_SECRETS_DIR = Path(".bastion")
MASTER_KEY_BYTES = 32


def _decode(text: str, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{source}: not valid base64") from exc
    if len(key) != MASTER_KEY_BYTES:
        raise ConfigError(f"{source}: must decode to {MASTER_KEY_BYTES} bytes, not {len(key)}")
    return key


def create_key_file(path: Path) -> bytes:
    """Write a new random master key (base64) readable by its owner only."""
    key = os.urandom(MASTER_KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(key).decode() + "\n")
    return key


def load_master_key(settings: StoreSettings) -> bytes:
    """The master key, or a ConfigError saying how to provide one.

    A dev setup without one gets ``.bastion/master.key``, created on first use.
    """
    if settings.master_key is not None:
        return _decode(settings.master_key.get_secret_value(), "master_key")
    path = settings.master_key_file
    if path is None and settings.dev:
        path = DEV_SECRETS_DIR / "master.key"
        if not path.exists():
            create_key_file(path)
            log.warning("dev setup: created a master key in %s", path)
    if path is None:
        raise ConfigError(
            "master_key: no master key; set BASTION_MASTER_KEY (32 random bytes, base64) or "
            "BASTION_MASTER_KEY_FILE (create one with: bastion secrets create-master-key FILE)"
        )
    try:
        return _decode(path.read_text(encoding="utf-8"), "master_key_file")
    except OSError as exc:
        raise ConfigError(f"master_key_file: cannot read {path} ({exc.strerror})") from exc


def derive_key(master_key: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose (e.g. ``"api-key-pepper"``), derived with HKDF."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=f"bastion/{purpose}/v1".encode(),
    ).derive(master_key)


def load_audit_signing_key(settings: StoreSettings) -> Ed25519PrivateKey:
    """The Ed25519 key that signs audit checkpoints, or a ConfigError saying how to get one.

    A dev setup without one gets ``.bastion/signing.key``, created on first use.
    """
    from compliance.signing import SigningKeyError, load_or_create_signing_key, load_signing_key

    path = settings.signing_key_file
    try:
        if path is not None:
            return load_signing_key(path)
        if settings.dev:
            path = DEV_SECRETS_DIR / "signing.key"
            existed = path.exists()
            key = load_or_create_signing_key(path)
            if not existed:
                log.warning("dev setup: created an audit signing key in %s", path)
            return key
    except SigningKeyError as exc:
        raise ConfigError(f"signing_key_file: {exc}") from exc
    raise ConfigError(
        "signing_key_file: no audit signing key; set BASTION_SIGNING_KEY_FILE (an Ed25519 "
        "private key, PEM: bastion secrets create-signing-key FILE)"
    )

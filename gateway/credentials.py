"""The master key, and the keys derived from it.

The master key (32 random bytes) comes from ``BASTION_MASTER_KEY`` (base64) or the file
named by ``BASTION_MASTER_KEY_FILE``. Purpose keys are derived from it with HKDF-SHA256,
one ``info`` label each, so no key is used for two purposes.

Loading never creates a secret: a command that finds none configured stops with a
message. Only the commands that start a dev gateway create them, with
:func:`ensure_dev_secrets`: ``bastion dev`` (under ``.bastion/``, and it writes their
paths into ``.bastion/dev.yaml``) and ``bastion serve`` on a ``dev: true`` configuration
that names none (beside the configuration file), so that every later command run with
the same configuration, from any folder, finds the same keys.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.config import ConfigError, StoreSettings

log = logging.getLogger("bastion.credentials")

DEV_SECRETS_DIR = Path(".bastion")
MASTER_KEY_FILE_NAME = "master.key"
SIGNING_KEY_FILE_NAME = "signing.key"
MASTER_KEY_BYTES = 32
NO_MASTER_KEY = (
    "master_key: no master key; set BASTION_MASTER_KEY (32 random bytes, base64) or "
    "BASTION_MASTER_KEY_FILE (create one with: bastion secrets create-master-key FILE)"
)
NO_SIGNING_KEY = (
    "signing_key_file: no audit signing key; set BASTION_SIGNING_KEY_FILE (an Ed25519 "
    "private key, PEM: bastion secrets create-signing-key FILE)"
)
DEV_HINT = (
    "; a dev setup's keys are made by `bastion dev` and named in its .bastion/dev.yaml "
    "(pass it with --config or BASTION_CONFIG)"
)


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
    """The master key, or a ConfigError saying how to provide one (nothing is created)."""
    if settings.master_key is not None:
        return _decode(settings.master_key.get_secret_value(), "master_key")
    path = settings.master_key_file
    if path is None:
        raise ConfigError(NO_MASTER_KEY + (DEV_HINT if settings.dev else ""))
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

    Nothing is created: a missing key is a configuration error.
    """
    from compliance.signing import SigningKeyError, load_signing_key

    path = settings.signing_key_file
    if path is None:
        raise ConfigError(NO_SIGNING_KEY + (DEV_HINT if settings.dev else ""))
    try:
        return load_signing_key(path)
    except SigningKeyError as exc:
        raise ConfigError(f"signing_key_file: {exc}") from exc


@dataclass(frozen=True)
class DevSecrets:
    """Where a dev setup's secrets are, and which of them were just created."""

    master_key_file: Path
    signing_key_file: Path
    created: tuple[Path, ...]


def ensure_dev_secrets(directory: Path, *, master: bool = True, signing: bool = True) -> DevSecrets:
    """A master key and an audit signing key in ``directory`` (0700), created if missing.

    ``master=False`` or ``signing=False``: that one is configured elsewhere; leave it.

    Only for commands that start a dev gateway (see the module's docstring). Files are
    0600 and appear whole (written aside, then linked into place), so two processes
    starting at once share one key instead of reading half of one.
    """
    from cryptography.hazmat.primitives import serialization

    directory = directory.absolute()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    master_file = directory / MASTER_KEY_FILE_NAME
    signing_file = directory / SIGNING_KEY_FILE_NAME
    created = []
    master_text = base64.b64encode(os.urandom(MASTER_KEY_BYTES)).decode() + "\n"
    if master and _create_private_file(master_file, master_text.encode()):
        created.append(master_file)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if signing and _create_private_file(signing_file, pem):
        created.append(signing_file)
    return DevSecrets(master_file, signing_file, tuple(created))


def _create_private_file(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` (0600) unless it exists; returns whether it was written."""
    if path.exists():
        return False
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:  # mkstemp: 0600 already
            handle.write(data)
        try:
            os.link(temporary, path)  # fails if another process won the race
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(temporary)

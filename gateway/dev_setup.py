"""``bastion dev``: what the embedded default needs on one machine, and its configuration.

Everything lives under ``.bastion/`` in the working directory: the master key and the
audit signing key, a watermark key, the SQLite store, the dev model (built when missing),
the dev admin key and ``dev.yaml``, which names all of them by absolute path, so that
every command given it (``--config`` or ``BASTION_CONFIG``) works from any folder, and
``bastion serve -c .bastion/dev.yaml`` starts the same gateway.

``dev.yaml`` is the user's once written: a later start keeps every value in it and only
adds the keys it lacks (:func:`write_config`). The one exception is ``upstreams``, which
says what ``bastion dev`` was asked to put the gateway in front of (the local tier, or
``--upstream``).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

STATE_DIR = Path(".bastion")
DEV_MODEL_DIR = STATE_DIR / "dev-model"
WATERMARK_KEYS_FILE = STATE_DIR / "watermark.keys"
CONFIG_FILE = STATE_DIR / "dev.yaml"
ADMIN_KEY_FILE = STATE_DIR / "admin.key"
DEV_MODEL_NAME = "dev-model"
ADMIN_KEY_DESCRIPTION = "bastion dev"
ADMIN_KEY_LIFETIME = timedelta(days=30)
# On vLLM's CPU build this is the share of RAM kept for the KV cache: the tiny dev
# model needs little, and the gateway, tests and editors share the machine.
CPU_MEMORY_SHARE = 0.2


def ensure_watermark_keys(path: Path = WATERMARK_KEYS_FILE) -> bool:
    """Create a key file with one fresh random key, readable by its owner only.

    Returns whether a file was created (an existing one is kept, so text generated
    earlier still verifies).
    """
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    key_id = "dev-" + datetime.now(UTC).strftime("%Y%m%d")
    secret = base64.b64encode(os.urandom(32)).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# bastion dev: watermark keys (id: base64 secret); newest last\n")
        handle.write(f"{key_id}: {secret}\n")
    return True


def store_document(state_dir: Path = STATE_DIR) -> dict[str, Any]:
    """The store and secrets of a dev setup (the secrets themselves are made elsewhere)."""
    from gateway.credentials import MASTER_KEY_FILE_NAME, SIGNING_KEY_FILE_NAME

    state = state_dir.absolute()
    return {
        "dev": True,
        "database_url": f"sqlite:///{state / 'dev.db'}",
        "master_key_file": str(state / MASTER_KEY_FILE_NAME),
        "signing_key_file": str(state / SIGNING_KEY_FILE_NAME),
    }


def gateway_only_document(host: str, port: int, upstream: str, models: list[str]) -> dict[str, Any]:
    """A dev gateway in front of an OpenAI-compatible server someone else runs."""
    return {
        **store_document(),
        "server": {"host": host, "port": port},
        "upstreams": [{"name": "dev", "url": upstream, "models": models}],
    }


def embedded_document(
    host: str,
    port: int,
    *,
    python: Path,
    model_dir: Path,
    model_name: str,
    inference_port: int,
    dev_model: bool,
) -> dict[str, Any]:
    """The gateway plus a local vLLM tier with the watermark on both sides."""
    model_dir = model_dir.resolve()
    inference: dict[str, Any] = {
        # absolute(), not resolve(): a venv's python is a symlink to the base interpreter.
        "python": str(python.absolute()),
        "host": "127.0.0.1",
        "port": inference_port,
        "model": str(model_dir),
        "served_model_name": model_name,
        "watermark": True,
    }
    if dev_model:
        inference |= {
            "dtype": "float32",
            "enforce_eager": True,
            "max_model_len": 2048,
            "gpu_memory_utilization": CPU_MEMORY_SHARE,
        }
    return {
        **store_document(),
        "server": {"host": host, "port": port},
        "upstreams": tier_upstreams(inference),
        "inference": inference,
        "watermark": {
            "enabled": True,
            "keys_file": str(WATERMARK_KEYS_FILE.resolve()),
            "tokenizers": {model_name: str(model_dir)},
        },
    }


def tier_upstreams(inference: dict[str, Any]) -> list[dict[str, Any]]:
    """The one upstream of the embedded default: the local tier as ``inference`` says."""
    name = inference.get("served_model_name") or Path(str(inference["model"])).name
    port = inference.get("port", 8000)
    return [{"name": "inference", "url": f"http://127.0.0.1:{port}", "models": [name]}]


@dataclass(frozen=True)
class ConfigWrite:
    """What :func:`write_config` did to the file."""

    path: Path
    created: bool
    added: tuple[str, ...]
    """Dotted keys the file lacked and now has (all of them when ``created``)."""
    document: dict[str, Any]
    """The configuration as now written."""


def write_config(
    generated: dict[str, Any], path: Path = CONFIG_FILE, *, embedded: bool
) -> ConfigWrite:
    """Write ``generated`` to ``path`` once; later, keep the file and add what it lacks.

    ``upstreams`` alone is always set from this start: the local tier as the file's own
    ``inference`` section places it (``embedded``), or ``generated``'s (``--upstream``).
    """
    if not path.exists():
        _write(path, generated)
        return ConfigWrite(path, True, tuple(generated), generated)
    current = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(current, dict):
        raise ValueError(f"{path}: the top level must be a mapping of settings")
    before = yaml.safe_dump(current, sort_keys=False)
    added = _fill_missing(current, generated, "")
    if embedded:
        current["upstreams"] = tier_upstreams(current["inference"])
    else:
        current["upstreams"] = generated["upstreams"]
    if yaml.safe_dump(current, sort_keys=False) != before:
        _write(path, current)
    return ConfigWrite(path, False, tuple(added), current)


def _fill_missing(current: dict[str, Any], generated: dict[str, Any], prefix: str) -> list[str]:
    added = []
    for key, value in generated.items():
        if key not in current:
            current[key] = value
            added.append(prefix + key)
        elif isinstance(value, dict) and isinstance(current[key], dict):
            added += _fill_missing(current[key], value, f"{prefix}{key}.")
    return added


def _write(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# bastion dev's configuration: yours to edit, kept across starts (only missing\n"
        "# keys are added; `upstreams` follows the tier or --upstream). Delete it to start\n"
        "# afresh. Every setting: docs/configuration.md\n"
    )
    path.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


def dev_admin_key(store: Any, hasher: Any, path: Path = ADMIN_KEY_FILE) -> tuple[str, bool]:
    """The dev admin key: the one kept in ``path`` while it is valid, else a new one.

    A new key expires after :data:`ADMIN_KEY_LIFETIME` and replaces the previous dev
    admin keys, which are revoked: restarts do not pile up keys that never expire.
    ``store`` and ``hasher``: a :class:`gateway.keys.KeyStore` and its ``KeyHasher``.
    Returns ``(key, newly minted)``.
    """
    kept = _read_key(path)
    if kept is not None and _valid(store, hasher, kept):
        return kept, False
    key, info = store.create(
        ["admin"], description=ADMIN_KEY_DESCRIPTION, expires_in=ADMIN_KEY_LIFETIME
    )
    for other in store.all():
        if other.id != info.id and other.description == ADMIN_KEY_DESCRIPTION:
            store.revoke(other.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key, True


def _read_key(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _valid(store: Any, hasher: Any, presented: str) -> bool:
    """Whether ``presented`` is a key of ``store``, neither revoked nor about to expire."""
    from gateway.keys import parse_key

    parsed = parse_key(presented)
    if parsed is None:
        return False
    key_id, secret = parsed
    soon = datetime.now(UTC) + timedelta(days=1)
    keys, _ = store.changed_since(None)
    for cached in keys:
        info = cached.info
        if info.id != key_id:
            continue
        alive = info.revoked_at is None and (info.expires_at is None or info.expires_at > soon)
        return alive and bool(hasher.matches(key_id, secret, cached.secret_hash))
    return False

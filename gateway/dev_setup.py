"""``bastion dev``: what the embedded default needs on one machine, and its configuration.

Everything lives under ``.bastion/`` in the working directory: the master key (created
by :mod:`gateway.credentials` on first use), a watermark key, the SQLite store, the
dev model (built when missing) and the generated ``dev.yaml``, which can be read,
copied and started again with ``bastion serve -c .bastion/dev.yaml``.
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STATE_DIR = Path(".bastion")
DEV_MODEL_DIR = STATE_DIR / "dev-model"
WATERMARK_KEYS_FILE = STATE_DIR / "watermark.keys"
CONFIG_FILE = STATE_DIR / "dev.yaml"
DEV_MODEL_NAME = "dev-model"
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


def gateway_only_document(host: str, port: int, upstream: str, models: list[str]) -> dict[str, Any]:
    """A dev gateway in front of an OpenAI-compatible server someone else runs."""
    return {
        "dev": True,
        "server": {"host": host, "port": port},
        "database_url": f"sqlite:///{(STATE_DIR / 'dev.db').resolve()}",
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
        "dev": True,
        "server": {"host": host, "port": port},
        "database_url": f"sqlite:///{(STATE_DIR / 'dev.db').resolve()}",
        "upstreams": [
            {
                "name": "inference",
                "url": f"http://127.0.0.1:{inference_port}",
                "models": [model_name],
            }
        ],
        "inference": inference,
        "watermark": {
            "enabled": True,
            "keys_file": str(WATERMARK_KEYS_FILE.resolve()),
            "tokenizers": {model_name: str(model_dir)},
        },
    }

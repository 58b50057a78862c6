"""The whole gateway in this process (Starlette's TestClient runs its lifespan), with
authentication, audit and a real store: for the tests of input handling and routes that
need no listener and no upstream."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.testclient import TestClient

from gateway.app import BastionApp
from gateway.config import Settings
from gateway.store import make_engine, migrate
from tests.support import deep_merge

MASTER_KEY = bytes(range(32))


def signing_key_file(directory: Path) -> Path:
    path = directory / "signing.key"
    if not path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_bytes(pem)
    return path


def app_settings(database_url: str, directory: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "upstreams": [{"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}],
        "master_key": base64.b64encode(MASTER_KEY).decode(),
        "signing_key_file": str(signing_key_file(directory)),
        "database_url": database_url,
        "health_check": {"enabled": False},
        "rate_limits": {"enabled": False},
        "audit": {"retention_interval_s": 0},
    }
    return Settings(**deep_merge(base, overrides))


@contextmanager
def serving(settings: Settings, roles: dict[str, list[str]]) -> Iterator[tuple[TestClient, dict]]:
    """``(client, {name: key})``: keys minted in the store before the gateway starts."""
    engine = make_engine(settings.database_url)
    migrate(engine)
    engine.dispose()
    app = BastionApp(settings)
    keys = {name: app.key_store.create(r)[0] for name, r in roles.items()}
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, keys


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}

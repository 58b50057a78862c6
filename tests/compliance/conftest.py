"""Fixtures for the audit log: a migrated database of each kind, keys, appenders.

A database of each kind is created (and migrated) once per session and emptied before
each test, so the many small tests here do not each pay for a PostgreSQL database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, delete

from compliance.appender import ChainAppender, CheckpointPolicy
from compliance.audit_schema import checkpoints, data_keys, entries
from compliance.keyring import KeyRing
from compliance.verify import LogVerifier, VerifyReport
from gateway.store import make_engine, migrate
from tests.databases import database

MASTER_KEY = bytes(range(32))


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def migrated_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with database(request.param, tmp_path_factory.mktemp("audit-db")) as url:
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        yield url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    """The session's database of this kind, emptied."""
    engine = make_engine(migrated_url)
    with engine.begin() as connection:
        for table in (entries, checkpoints, data_keys):
            connection.execute(delete(table))
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def keyring(engine: Engine) -> KeyRing:
    return KeyRing(engine, MASTER_KEY)


AppenderFactory = Callable[..., ChainAppender]


@pytest.fixture
def make_appender(
    engine: Engine, keyring: KeyRing, signing_key: Ed25519PrivateKey
) -> AppenderFactory:
    """``make_appender(writer_id="w1", every_entries=10, every_seconds=3600)``."""

    def make(
        writer_id: str = "w1",
        every_entries: int = 10,
        every_seconds: float = 3600.0,
        **options: Any,
    ) -> ChainAppender:
        policy = CheckpointPolicy(every_entries=every_entries, every_seconds=every_seconds)
        return ChainAppender(engine, keyring, signing_key, writer_id, policy=policy, **options)

    return make


@pytest.fixture
def verify(engine: Engine, signing_key: Ed25519PrivateKey) -> Callable[..., VerifyReport]:
    def run(**options: Any) -> VerifyReport:
        return LogVerifier(engine, [signing_key.public_key()]).verify(**options)

    return run

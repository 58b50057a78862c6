"""Retention on a schedule: the lease holder runs it, off the loop; the chain verifies after;
failures are logged and retried; 0 turns it off; the gateway starts and stops it.

On SQLite and PostgreSQL (a fresh, migrated database per test).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient

from compliance.appender import ChainAppender, CheckpointPolicy
from compliance.audit_schema import entries
from compliance.job_lease import job_leases
from compliance.keyring import KeyRing
from compliance.signing import load_or_create_signing_key
from compliance.verify import LogVerifier, VerifyReport
from gateway.app import BastionApp
from gateway.config import AuditSettings, Settings
from gateway.retention_job import LEASE_NAME, RetentionJob
from gateway.store import make_engine, migrate
from tests.compliance.conftest import MASTER_KEY
from tests.compliance.test_retention import aged_log
from tests.gateway.test_access import MASTER_KEY as MASTER_B64
from tests.gateway.test_access import secure_settings
from tests.support import ProcessPool


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()


def seed(store: Engine, key: Ed25519PrivateKey) -> None:
    """25 entries of 100 days ago, 15 of today, in one closed chain (tests/compliance)."""

    def appender(writer_id: str = "w1", every_entries: int = 10, **_: Any) -> ChainAppender:
        policy = CheckpointPolicy(every_entries=every_entries, every_seconds=3600)
        return ChainAppender(store, KeyRing(store, MASTER_KEY), key, writer_id, policy=policy)

    aged_log(appender)


def verified(store: Engine, key: Ed25519PrivateKey) -> VerifyReport:
    return LogVerifier(store, [key.public_key()]).verify()


def count(store: Engine, writer_id: str | None = None) -> int:
    query = select(func.count()).select_from(entries)
    if writer_id is not None:
        query = query.where(entries.c.writer_id == writer_id)
    with store.connect() as connection:
        return int(connection.execute(query).scalar_one())


async def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_run_deletes_expired_entries_and_the_chain_verifies(
    store: Engine,
    signing_key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed(store, signing_key)
    job = RetentionJob(store, signing_key, days=90, interval_s=3600, ttl_s=30)
    with caplog.at_level(logging.INFO, logger="bastion.retention"):
        result = job.run_once()
    assert result is not None and (result.total, result.anchors, result.refused) == (25, 1, [])
    assert count(store) == 15
    report = verified(store, signing_key)
    assert report.ok, report.problems
    (line,) = [r.getMessage() for r in caplog.records]
    assert "deleted 25 entries older than 90 days from 1 chain(s)" in line
    assert "alice" not in line
    assert job.run_once() is None  # not due again for an hour, whoever holds the lease
    assert job.runs == 1 and job.lease.state().held


async def test_of_two_gateways_one_holds_the_lease_and_runs_it(
    store: Engine,
    signing_key: Ed25519PrivateKey,
) -> None:
    seed(store, signing_key)
    jobs = [
        RetentionJob(store, signing_key, days=90, interval_s=0.2, ttl_s=3, holder=f"gw{n}")
        for n in (1, 2)
    ]
    for job in jobs:
        await job.start()
    try:
        await wait_for(lambda: max(job.runs for job in jobs) >= 3)
    finally:
        for job in jobs:
            await job.stop()
    assert sorted(job.runs for job in jobs)[0] == 0, [job.runs for job in jobs]
    assert count(store) == 15 and verified(store, signing_key).ok
    assert not jobs[0].lease.state().held  # given up at stop


async def test_a_failing_run_is_logged_and_tried_again(
    tmp_path: Path,
    signing_key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = make_engine(f"sqlite:///{tmp_path / 'not-migrated.db'}")  # no tables yet
    job = RetentionJob(broken, signing_key, days=90, interval_s=0.1, ttl_s=3)
    await job.start()
    try:
        with caplog.at_level(logging.WARNING, logger="bastion.retention"):
            await wait_for(lambda: len(caplog.records) >= 2)
        assert "audit retention failed (OperationalError" in caplog.records[0].getMessage()
        await asyncio.to_thread(migrate, broken)  # the database comes back
        await wait_for(lambda: job.runs >= 1)
    finally:
        await job.stop()
        broken.dispose()


def test_an_interval_of_zero_turns_it_off(
    store: Engine,
    signing_key: Ed25519PrivateKey,
) -> None:
    assert AuditSettings().retention_interval_s == 3600
    off = AuditSettings(retention_interval_s=0)
    assert RetentionJob.configured(off, store, signing_key) is None
    job = RetentionJob.configured(AuditSettings(retention_days=183), store, signing_key)
    assert job is not None and job.interval_s == 3600


def gateway_settings(url: str, key: Ed25519PrivateKey, tmp_path: Path, **audit: object) -> Settings:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "signing.key").write_bytes(pem)
    return Settings(
        upstreams=[{"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}],
        master_key=base64.b64encode(MASTER_KEY).decode(),
        signing_key_file=tmp_path / "signing.key",
        database_url=url,
        dev=True,
        auth={"enabled": False},
        health_check={"enabled": False},
        audit=audit,
    )


def test_the_gateway_runs_it_while_it_is_up(
    database_url: str,
    store: Engine,
    signing_key: Ed25519PrivateKey,
    tmp_path: Path,
) -> None:
    seed(store, signing_key)
    settings = gateway_settings(database_url, signing_key, tmp_path, retention_interval_s=0.2)
    app = BastionApp(settings)
    assert app.retention is not None
    with TestClient(app):
        deadline = time.monotonic() + 20
        while count(store) != 15:
            assert time.monotonic() < deadline, "retention never ran"
            time.sleep(0.05)
        with store.connect() as connection:
            lease = connection.execute(
                select(job_leases).where(job_leases.c.name == LEASE_NAME)
            ).one()
        assert lease.name == LEASE_NAME and lease.holder == app.retention.lease.holder
    assert not app.retention.lease.state().held  # released at shutdown
    assert verified(store, signing_key).ok
    off = gateway_settings(database_url, signing_key, tmp_path, retention_interval_s=0)
    assert BastionApp(off).retention is None


def test_three_workers_of_a_served_gateway_run_it_one_at_a_time(
    pool: ProcessPool, store: Engine, database_url: str, tmp_path: Path
) -> None:
    """``bastion serve`` with three worker processes: one holder, the log trimmed and sound."""
    settings = secure_settings(tmp_path / "bastion.db", database_url=database_url)
    key = load_or_create_signing_key(Path(settings["signing_key_file"]))
    seed(store, key)
    settings["server"] = {"workers": 3}
    settings["rate_limits"] = {"enabled": False}  # in-memory limits refuse several workers
    settings["audit"] = {"retention_interval_s": 0.3}
    gateway = pool.gateway(
        [pool.upstream("ret-up", ["m1"])], env={"BASTION_MASTER_KEY": MASTER_B64}, **settings
    )
    deadline = time.monotonic() + 30
    while count(store, "w1") != 15:  # the seeded chain; the workers may write their own
        assert time.monotonic() < deadline, gateway.output()
        time.sleep(0.1)
    holders = set()
    for _ in range(15):
        with store.connect() as connection:
            holders.add(
                connection.execute(
                    select(job_leases.c.holder).where(job_leases.c.name == LEASE_NAME)
                ).scalar_one()
            )
        time.sleep(0.1)
    assert len(holders) == 1, holders
    pid = int(holders.pop().rsplit("-", 2)[1])
    assert pid != gateway.pid  # a worker, not the supervisor
    gateway.stop()
    assert verified(store, key).ok

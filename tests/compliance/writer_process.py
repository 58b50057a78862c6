"""A gateway-like process that appends audit entries (run by test_multiprocess)."""

from __future__ import annotations

import asyncio
from multiprocessing.synchronize import Barrier

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from compliance.appender import ChainAppender, CheckpointPolicy
from compliance.audit_writer import AuditWriter
from compliance.keyring import KeyRing
from gateway.store import make_engine
from tests.compliance.conftest import MASTER_KEY
from tests.compliance.records import request_record


def append_entries(
    url: str, signing_pem: bytes, writer_id: str, count: int, ready: Barrier
) -> None:
    engine = make_engine(url)
    key = load_pem_private_key(signing_pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    appender = ChainAppender(
        engine,
        KeyRing(engine, MASTER_KEY),
        key,
        writer_id,
        policy=CheckpointPolicy(every_entries=50),
    )

    async def run() -> None:
        async with AuditWriter(appender, max_batch=64) as writer:

            async def client(first: int) -> None:  # one request after the other
                for n in range(first, count, 8):
                    # Shared subjects: both processes race to create the same data keys too.
                    await writer.append(request_record(n, subject=f"s{n % 7}"))

            await asyncio.gather(*(client(i) for i in range(8)))

    ready.wait(60)  # both processes start writing together
    asyncio.run(run())
    engine.dispose()

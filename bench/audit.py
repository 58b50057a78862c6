"""How fast is the audit log? Entries written per second (durably), and verified per second.

For SQLite (a file in WAL mode, ``synchronous=FULL``: the WAL is fsynced at each commit)
and PostgreSQL (the local server, ``synchronous_commit=on``), with one and with two
writer processes. Each process runs what a gateway worker runs: an asyncio loop with an
``AuditWriter`` (bounded queue, group commit) and ``--clients`` concurrent clients, each
appending one entry after another and awaiting its durability, as the gateway does before
it completes a response. An entry has realistic metadata and a ~1 KB payload (prompt and
answer) sealed with AES-256-GCM under one of 1,000 subjects' data keys; it is hash-chained,
and a checkpoint is signed every 1,000 entries. Then the whole log is verified (every hash
and signature), by one process and by ``--jobs`` processes, as ``bastion audit verify``
does; for that the log is first topped up to ``--verify-entries`` (default 300,000).

Targets: 20,000 entries/s written, 200,000 entries/s verified. On a shared machine, run
it when it is quiet: the load average at the start is printed with the results.

    .venv/bin/python bench/audit.py [--entries 60000] [--clients 512] [--verify-entries N]
        [--databases sqlite,postgresql] [--postgres-admin-url URL]

``--clients`` bounds each process's appends in flight, hence its batches: group commit
needs concurrency (a batch can hold at most the appends waiting for it).

Nothing here is run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from sqlalchemy import Engine, create_engine, insert, text  # noqa: E402

from compliance.appender import ChainAppender, CheckpointPolicy  # noqa: E402
from compliance.audit_schema import data_keys  # noqa: E402
from compliance.audit_writer import AuditWriter  # noqa: E402
from compliance.envelope import KeyEncryptionKey, new_data_key  # noqa: E402
from compliance.keyring import KeyRing  # noqa: E402
from compliance.records import AuditRecord  # noqa: E402
from compliance.verify import LogVerifier  # noqa: E402
from gateway.store import make_engine, migrate  # noqa: E402

WRITE_TARGET = 20_000
VERIFY_TARGET = 200_000
MASTER_KEY = bytes(range(32))
SUBJECTS = 1000
PROMPT = "Summarise the attached quarterly report for the board, in plain words. " * 8
ANSWER = "Revenue grew by four per cent; costs were flat; the outlook is unchanged. " * 5


def record(n: int) -> AuditRecord:
    return AuditRecord(
        request_id=f"req-{os.getpid()}-{n:010d}",
        key_id="0123456789abcdef",
        subject_id=f"subject-{n % SUBJECTS}",
        model="deepseek-r1-distill-qwen-7b",
        route="/v1/chat/completions",
        status=200,
        prompt_tokens=160,
        completion_tokens=75,
        latency_us=812_000,
        ttft_us=95_000,
        guard="pass",
        watermark="watermarked z=6.21",
        payload={
            "request": {"messages": [{"role": "user", "content": PROMPT}]},
            "response": ANSWER,
        },
    )


def writer_process(
    url: str, pem: bytes, writer_id: str, entries: int, clients: int, ready: Barrier, out: Queue
) -> None:
    engine = make_engine(url)
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    keyring = KeyRing(engine, MASTER_KEY)
    for n in range(SUBJECTS):  # made by the parent: only looked up (and cached) here
        keyring.for_owner(f"subject:subject-{n}")
    appender = ChainAppender(
        engine, keyring, key, writer_id, policy=CheckpointPolicy(every_entries=1000)
    )

    async def run() -> tuple[float, float, int, float]:
        async with AuditWriter(appender, queue_size=10_000, max_batch=2_000) as writer:

            async def client(first: int) -> None:
                for n in range(first, entries, clients):
                    await writer.append(record(n))

            ready.wait()
            start, cpu = time.time(), time.process_time()
            await asyncio.gather(*(client(i) for i in range(clients)))
            end, cpu = time.time(), time.process_time() - cpu
            return start, end, writer.stats.batches, cpu

    start, end, batches, cpu = asyncio.run(run())
    out.put((start, end, entries, batches, cpu))
    engine.dispose()


@dataclass
class Measured:
    database: str
    writers: int
    entries: int
    write_s: float
    batches: int
    write_cpu_s: float
    """CPU time of the writer processes (all threads; SQLite's work included, not
    PostgreSQL's server)."""
    verify_s: float
    verify_cpu_s: float
    parallel_s: float
    """Verification with --jobs processes (pool start-up included)."""
    verified: int
    ok: bool


def new_key_row(owner: str) -> dict[str, object]:
    key_id = uuid.uuid4().hex
    kek = KeyEncryptionKey(MASTER_KEY)
    wrapped = kek.wrap(key_id, new_data_key())
    return {"id": key_id, "owner": owner, "wrapped": wrapped, "kek_id": kek.id, "created_us": 0}


def top_up(engine: Engine, key: Ed25519PrivateKey, count: int) -> None:
    """More entries for the verification (another chain, written in big batches)."""
    if count <= 0:
        return
    appender = ChainAppender(
        engine, KeyRing(engine, MASTER_KEY), key, "top-up", policy=CheckpointPolicy(1000)
    )
    for first in range(0, count, 5_000):
        appender.append_batch([record(n) for n in range(first, min(first + 5_000, count))])
    appender.close()


@contextmanager
def fresh_database(kind: str, admin_url: str) -> Iterator[str]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            yield f"sqlite:///{directory}/audit.db"
        return
    name = f"bastion_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def measure(kind: str, writers: int, args: argparse.Namespace) -> Measured:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with fresh_database(kind, args.postgres_admin_url) as url:
        engine = make_engine(url)
        migrate(engine)
        with engine.begin() as connection:  # data keys, as in a gateway that has run a while
            connection.execute(
                insert(data_keys),
                [new_key_row(f"subject:subject-{n}") for n in range(SUBJECTS)],
            )
        context = multiprocessing.get_context("spawn")
        ready, out = context.Barrier(writers), context.Queue()
        per_process = args.entries // writers
        processes = [
            context.Process(
                target=writer_process,
                args=(url, pem, f"bench-{i}", per_process, args.clients, ready, out),
            )
            for i in range(writers)
        ]
        for process in processes:
            process.start()
        results = [out.get(timeout=600) for _ in processes]
        for process in processes:
            process.join()
        write_s = max(r[1] for r in results) - min(r[0] for r in results)
        top_up(engine, key, args.verify_entries - args.entries)
        verifier = LogVerifier(engine, [key.public_key()])
        started, cpu = time.perf_counter(), time.process_time()
        report = verifier.verify()
        verify_s, verify_cpu = time.perf_counter() - started, time.process_time() - cpu
        started = time.perf_counter()
        parallel = verifier.verify(jobs=args.jobs, segment_entries=10_000)
        parallel_s = time.perf_counter() - started
        engine.dispose()
    return Measured(
        kind,
        writers,
        sum(r[2] for r in results),
        write_s,
        sum(r[3] for r in results),
        sum(r[4] for r in results),
        verify_s,
        verify_cpu,
        parallel_s,
        report.entries,
        report.ok and parallel.ok and parallel.entries == report.entries,
    )


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "below"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=60_000, help="per configuration")
    parser.add_argument("--clients", type=int, default=512, help="concurrent clients per process")
    parser.add_argument(
        "--verify-entries",
        type=int,
        default=300_000,
        help="verify a log of at least this many entries (topped up after the write test)",
    )
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="processes for parallel verify"
    )
    parser.add_argument(
        "--postgres-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = [
        measure(kind, writers, args) for kind in args.databases.split(",") for writers in (1, 2)
    ]
    print(
        f"\naudit log: {os.cpu_count()} CPUs, load average {load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end; "
        f"{args.clients} clients per writer process, ~1 KB payloads, durable commits\n"
    )
    header = (
        f"{'database':<11}{'writers':>8}{'entries':>9}{'per batch':>10}"
        f"{'written/s':>11}  {'vs 20,000':<9}{'CPU µs':>7}"
        f"{'verified/s':>12}{'CPU µs':>7}{f'{args.jobs} procs':>10}  {'vs 200,000':<10}"
    )
    print(header)
    print("-" * len(header))
    for m in rows:
        written = m.entries / m.write_s
        verified = m.verified / m.verify_s
        parallel = m.verified / m.parallel_s
        print(
            f"{m.database:<11}{m.writers:>8}{m.entries:>9,}{m.entries / m.batches:>10.0f}"
            f"{written:>11,.0f}  {verdict(written, WRITE_TARGET):<9}"
            f"{m.write_cpu_s / m.entries * 1e6:>7.1f}"
            f"{verified:>12,.0f}{m.verify_cpu_s / m.verified * 1e6:>7.1f}{parallel:>10,.0f}  "
            f"{verdict(max(verified, parallel), VERIFY_TARGET):<10}"
            + ("" if m.ok else "  !!! THE LOG DID NOT VERIFY")
        )
    print(
        "\nCPU µs: CPU time per entry of the writer processes (all their threads, SQLite's "
        "work included,\nPostgreSQL's server not) and of the verifying process (one "
        "process). 1e6 / CPU µs is what one\nfree core would do: compare it with the "
        "rates when the machine is busy. N procs: verification\nin N processes, chains cut "
        "into segments at checkpoints (10,000 entries here), pool start-up included.\n"
        f"Verification reads at least {args.verify_entries:,} entries per database "
        "(the written ones, topped up)."
    )
    return 0 if all(m.ok for m in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

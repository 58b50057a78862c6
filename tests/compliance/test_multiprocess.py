"""Two writer processes append to one database at once; the log verifies afterwards."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, func, select

from compliance.audit_schema import data_keys, entries
from compliance.verify import VerifyReport
from tests.compliance.writer_process import append_entries

COUNT = 400


def test_two_processes_write_concurrently_and_the_log_verifies(
    engine: Engine, signing_key: Ed25519PrivateKey, verify: Callable[..., VerifyReport]
) -> None:
    pem = signing_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(2)
    url = engine.url.render_as_string(hide_password=False)
    workers = [
        context.Process(target=append_entries, args=(url, pem, writer, COUNT, ready))
        for writer in ("gw-a", "gw-b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(90)
    assert [w.exitcode for w in workers] == [0, 0]
    report = verify()
    assert report.ok, report.problems
    assert report.entries == 2 * COUNT
    assert [(c.writer_id, c.last_seq, c.closed) for c in report.chains] == [
        ("gw-a", COUNT, True),
        ("gw-b", COUNT, True),
    ]
    with engine.connect() as connection:
        spans = connection.execute(
            select(entries.c.writer_id, func.min(entries.c.time_us), func.max(entries.c.time_us))
            .group_by(entries.c.writer_id)
            .order_by(entries.c.writer_id)
        ).all()
        owners = connection.execute(select(func.count()).select_from(data_keys)).scalar_one()
    (_, a_first, a_last), (_, b_first, b_last) = spans
    assert a_first < b_last and b_first < a_last  # they really wrote at the same time
    assert owners == 7  # one data key per subject, whichever process made it

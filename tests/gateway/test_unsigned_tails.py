"""A SIGKILLed gateway's unsigned entries are signed by the next one to start, and
``bastion audit verify`` says how many entries no checkpoint covers (issue 14, item 12)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compliance.appender import ChainAppender, CheckpointPolicy
from compliance.keyring import KeyRing
from compliance.records import AuditRecord
from compliance.signing import load_or_create_signing_key
from compliance.unsigned_tails import sign_unsigned_tails
from compliance.verify import LogVerifier
from gateway.store import make_engine, migrate
from tests.gateway.test_audit_trail import MASTER_KEY, audit_cli
from tests.support import ProcessPool, chat_body, wait_until


def uncovered(database_url: str, signing: Path) -> int:
    done = audit_cli(database_url, signing, "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"([\d,]+) entries are covered by no checkpoint", done.stdout)
    assert found, done.stdout
    return int(found.group(1).replace(",", ""))


def test_a_killed_gateways_tail_is_signed_by_the_next_start(
    pool: ProcessPool, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'bastion.db'}"
    signing = tmp_path / "signing.key"
    load_or_create_signing_key(signing)
    upstream = pool.upstream("tails-up", ["dev-model"])
    # Checkpoints only every hour: whatever the first gateway writes stays unsigned.
    settings = {
        "env": {"BASTION_MASTER_KEY": base64.b64encode(MASTER_KEY).decode()},
        "database_url": database_url,
        "signing_key_file": str(signing),
        "audit": {"checkpoint_every_entries": 100_000, "checkpoint_every_s": 3600},
    }
    gateway = pool.gateway([upstream], **settings)  # type: ignore[arg-type]
    for _ in range(12):
        assert gateway.http.post("/v1/chat/completions", json=chat_body()).status_code == 200
    assert gateway.process is not None
    gateway.process.kill()  # SIGKILL: no final checkpoint
    assert uncovered(database_url, signing) >= 12

    restarted = pool.gateway([upstream], **settings)  # type: ignore[arg-type]
    assert restarted.http.get("/healthz").status_code == 200
    wait_until(lambda: uncovered(database_url, signing) == 0, 20, what="the tail signed")


def test_only_tails_that_verify_are_signed(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    migrate(engine)
    key = Ed25519PrivateKey.generate()
    policy = CheckpointPolicy(every_entries=5, every_seconds=3600)
    ring = KeyRing(engine, MASTER_KEY)
    good, bad = (ChainAppender(engine, ring, key, w, policy=policy) for w in ("good", "bad"))
    for appender in (good, bad):
        for i in range(7):  # 5 signed, 2 not
            appender.append(AuditRecord(kind="request", request_id=f"r{i}", status=200))
    with engine.begin() as connection:  # tamper with an unsigned entry of "bad"
        connection.exec_driver_sql(
            "UPDATE audit_entries SET status = 500 WHERE writer_id = 'bad' AND seq = 7"
        )
    result = sign_unsigned_tails(engine, key)
    assert result.signed == {"good": 2}
    assert [(p.writer_id, p.seq) for p in result.refused] == [("bad", 7)]
    report = LogVerifier(engine, [key.public_key()]).verify()
    assert {c.writer_id: c.unsigned for c in report.chains}["good"] == 0
    assert [(p.writer_id, p.seq) for p in report.problems] == [("bad", 7)]
    assert sign_unsigned_tails(engine, key).signed == {}  # nothing left to sign
    engine.dispose()

"""Data-subject rights and the compliance officer's audit routes, end to end.

Real processes: a fixture upstream, ``bastion serve`` with authentication on, keys made
by the CLI; the store is SQLite or PostgreSQL; the database is read back directly.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compliance.erasure_receipt import verify_receipt
from compliance.keyring import KeyRing
from compliance.privacy_store import do_not_sell_subjects
from compliance.reader import AuditReader, PayloadUnavailable
from compliance.signing import load_public_key
from gateway.store import make_engine
from tests.databases import database
from tests.gateway.test_access import MASTER_KEY, bearer, make_key, secure_settings, wait_for_key
from tests.support import ProcessPool, bastion_command, chat_body

CANARY = "canary-privacy-5d21e9-prompt"
PROFILE_CANARY = "canary-privacy-profile-88ab"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


def start(pool: ProcessPool, tmp_path: Path, url: str) -> tuple[Any, dict[str, str], Path]:
    upstream = pool.upstream("privacy-up", ["m1"])
    settings = secure_settings(tmp_path / "bastion.db", database_url=url)
    settings["audit"] = {"checkpoint_every_entries": 20, "checkpoint_every_s": 0.5}
    gateway = pool.gateway([upstream], env={"BASTION_MASTER_KEY": MASTER_KEY}, **settings)
    keys = {
        "auditor": make_key(gateway, "--role", "auditor")["key"],
        "alice": make_key(gateway, "--role", "app", "--subject", "alice")["key"],
        "bob": make_key(gateway, "--role", "app", "--subject", "bob")["key"],
        "app": make_key(gateway, "--role", "app")["key"],
    }
    for key in keys.values():
        wait_for_key(gateway, key)
    return gateway, keys, Path(settings["signing_key_file"])


def audit_verify(url: str, signing: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env |= {"BASTION_DATABASE_URL": url, "BASTION_SIGNING_KEY_FILE": str(signing)}
    return subprocess.run(
        [*bastion_command(), "audit", "verify"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_subject_rights_end_to_end(pool: ProcessPool, tmp_path: Path, store_url: str) -> None:
    gateway, keys, signing = start(pool, tmp_path, store_url)
    http = gateway.http
    alice, auditor = bearer(keys["alice"]), bearer(keys["auditor"])
    said = http.post("/v1/chat/completions", json=chat_body("m1", content=CANARY), headers=alice)
    assert said.status_code == 200, said.text

    # Access: the subject with their own key, payloads decrypted; nobody else's.
    mine = http.get("/privacy/subjects/alice", headers=alice)
    assert mine.status_code == 200, mine.text
    export = mine.json()
    prompts = [
        e["payload"]["request"]["messages"][0]["content"]
        for e in export["audit_entries"]
        if e["kind"] == "request"
    ]
    assert prompts == [CANARY]
    assert [k["id"] for k in export["api_keys"]] == [keys["alice"].split("_")[1]]
    info = export["information"]
    assert info["purposes"] and info["recipients"][0]["name"] and info["source"]
    assert info["retention"]["audit_days"] == 90
    assert http.get("/privacy/subjects/bob", headers=alice).status_code == 403
    assert http.get("/privacy/subjects/alice", headers=bearer(keys["app"])).status_code == 403
    assert http.delete("/privacy/subjects/alice/legal-hold", headers=alice).status_code == 403

    # Rectification keeps the history.
    for name in ("Alice A.", PROFILE_CANARY):
        done = http.patch("/privacy/subjects/alice", json={"display_name": name}, headers=auditor)
        assert done.status_code == 200, done.text
    history = done.json()["history"]
    assert [h["data"]["display_name"] for h in history] == ["Alice A.", PROFILE_CANARY]

    # CCPA do-not-sell, by the subject; visible to exports and in access.
    assert http.put("/privacy/subjects/alice/do-not-sell", json={}, headers=alice).json()[
        "do_not_sell"
    ]
    engine = make_engine(store_url)
    try:
        assert do_not_sell_subjects(engine) == {"alice"}
        assert http.get("/privacy/subjects/alice", headers=auditor).json()["flags"]["do_not_sell"]

        # Restriction: refused at once, then lifted.
        r = http.post(
            "/privacy/subjects/alice/restrict", json={"reason": "disputed"}, headers=auditor
        )
        assert r.status_code == 200 and r.json()["restricted"]
        refused = http.post("/v1/chat/completions", json=chat_body("m1"), headers=alice)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "subject_restricted"
        bob_ok = http.post(
            "/v1/chat/completions", json=chat_body("m1"), headers=bearer(keys["bob"])
        )
        assert bob_ok.status_code == 200
        assert http.delete("/privacy/subjects/alice/restrict", headers=auditor).status_code == 200
        again = http.post("/v1/chat/completions", json=chat_body("m1"), headers=alice)
        assert again.status_code == 200, again.text

        # A legal hold blocks erasure with its reason.
        hold = http.put(
            "/privacy/subjects/alice/legal-hold", json={"reason": "case 42"}, headers=auditor
        )
        assert hold.status_code == 200
        blocked = http.delete("/privacy/subjects/alice", headers=alice)
        assert blocked.status_code == 409
        assert blocked.json()["error"]["code"] == "legal_hold"
        assert "case 42" in blocked.json()["error"]["message"]
        assert http.delete("/privacy/subjects/alice/legal-hold", headers=auditor).status_code == 200

        # Erasure: a signed receipt; keys dead; payloads unreadable; the chain verifies.
        erased = http.delete("/privacy/subjects/alice", headers=auditor)
        assert erased.status_code == 200, erased.text
        receipt = erased.json()
        assert verify_receipt(receipt, load_public_key(signing))
        assert not verify_receipt(
            {**receipt, "erased_us": receipt["erased_us"] + 1}, load_public_key(signing)
        )
        assert receipt["destroyed"]["data_keys"] == 1
        assert "alice" not in json.dumps(receipt)
        assert http.get("/v1/models", headers=alice).status_code == 401
        reader = AuditReader(engine, KeyRing(engine, base64.b64decode(MASTER_KEY)))
        pseudonym = receipt["subject_pseudonyms"][0]
        sealed = [
            e for e in reader.entries(limit=10_000) if e.data_key_id == pseudonym and e.payload
        ]
        assert sealed
        for entry in sealed:
            with pytest.raises(PayloadUnavailable):
                reader.payload(entry)
        assert http.get("/privacy/subjects/alice", headers=auditor).json()["erased"] is True
        ledger = http.get("/privacy/requests", headers=auditor).json()["data"]
        types = {(row["type"], row["status"]) for row in ledger}
        assert {("access", "completed"), ("erasure", "blocked"), ("erasure", "completed")} <= types
        assert all(row["subject"] != "alice" for row in ledger)
        assert all(row["due"] > row["received"] for row in ledger)
        verdict = http.get("/compliance/audit/verify", headers=auditor).json()
        assert verdict["ok"] is True, verdict
        done_cli = audit_verify(store_url, signing)
        assert done_cli.returncode == 0, done_cli.stdout + done_cli.stderr
        if store_url.startswith("sqlite"):
            with engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    if store_url.startswith("sqlite"):
        path = Path(store_url.removeprefix("sqlite:///"))
        for file in (path, path.with_name(path.name + "-wal")):
            if file.exists():
                raw = file.read_bytes()
                assert CANARY.encode() not in raw, file
                assert PROFILE_CANARY.encode() not in raw, file

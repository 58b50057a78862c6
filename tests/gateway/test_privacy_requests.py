"""The access export streamed page by page (no cap); requests received outside the API
logged and closed by the compliance officer; erasure receipts checked by the CLI.

The gateway runs in process (its lifespan included) on SQLite or PostgreSQL, with
authentication off (every caller may do everything: RBAC is tested in test_access.py).
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.testclient import TestClient

import compliance.subject_export
from compliance.appender import ChainAppender
from compliance.keyring import KeyRing
from compliance.reader import AuditReader
from compliance.signing import create_signing_key_file, public_key_pem
from gateway.app import BastionApp
from gateway.config import Settings
from tests.compliance.records import request_record
from tests.support import bastion_command

MASTER_KEY = bytes(range(32))


@pytest.fixture
def gateway(database_url: str, tmp_path: Path) -> Iterator[tuple[BastionApp, TestClient]]:
    create_signing_key_file(tmp_path / "signing.key")
    settings = Settings(
        upstreams=[{"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}],
        dev=True,
        master_key=base64.b64encode(MASTER_KEY).decode(),
        signing_key_file=tmp_path / "signing.key",
        database_url=database_url,
        auth={"enabled": False},
        health_check={"enabled": False},
        audit={"retention_interval_s": 0},
    )
    app = BastionApp(settings)
    with TestClient(app) as client:
        yield app, client


def signing_key(app: BastionApp) -> Ed25519PrivateKey:
    from compliance.signing import load_signing_key

    path = app.settings.signing_key_file
    assert path is not None
    return load_signing_key(path)


def test_the_access_export_streams_every_entry_a_page_at_a_time(
    gateway: tuple[BastionApp, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = gateway
    seeded = 57
    appender = ChainAppender(
        app.engine, KeyRing(app.engine, MASTER_KEY), signing_key(app), "seed-writer"
    )
    for n in range(1, seeded + 1):
        appender.append(request_record(n, subject="alice" if n % 2 else "bob"))
        appender.append(request_record(n, subject="alice"))
    appender.close()
    pages: list[int] = []
    real = compliance.subject_export.query_page

    def counted(*args: Any, **kwargs: Any) -> Any:
        page = real(*args, **kwargs)
        pages.append(len(page.entries))
        return page

    monkeypatch.setattr(compliance.subject_export, "query_page", counted)
    app.privacy.export_page = 10
    with client.stream("GET", "/privacy/subjects/alice") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        export = json.loads(response.read())
    # Alice's: one entry for every n, another for every odd n; then subject.accessed.
    expected = seeded + (seeded + 1) // 2 + 1
    entries = export["audit_entries"]
    assert len(entries) == expected and max(pages) == 10 and len(pages) == -(-expected // 10)
    assert [e["kind"] for e in entries][-1] == "subject.accessed"
    answers = [e["payload"]["response"] for e in entries if e["kind"] == "request"]
    assert answers[:3] == ["answer 1", "answer 1", "answer 2"]
    seqs = [int(e["id"].rsplit(":", 1)[1]) for e in entries if e["id"].startswith("seed-")]
    assert seqs == sorted(seqs) and len(seqs) == expected - 1  # oldest first, none twice
    assert export["subject"] == "alice" and export["information"]["retention"]["audit_days"]
    (access,) = [r for r in export["requests"] if r["type"] == "access"]
    assert access["status"] == "completed"  # closed once the last entry was out


def log_request(client: TestClient, **fields: Any) -> Any:
    body = {
        "subject": "erin",
        "right": "do-not-sell",
        "received": (datetime.now(UTC) - timedelta(days=3)).date().isoformat(),
        "channel": "email",
        "note": "ref 2026/17",
    } | fields
    return client.post("/privacy/requests", json=body)


def test_a_request_received_by_email_is_logged_audited_and_completed(
    gateway: tuple[BastionApp, TestClient],
) -> None:
    app, client = gateway
    received = (datetime.now(UTC) - timedelta(days=3)).date()
    logged = log_request(client)
    assert logged.status_code == 201, logged.text
    row = logged.json()
    assert (row["type"], row["status"], row["channel"]) == ("do_not_sell", "open", "email")
    assert row["received"] == f"{received.isoformat()}T00:00:00+00:00"
    assert row["due"].startswith(
        f"{received.year + (received.month == 12)}-{received.month % 12 + 1:02d}"
    )
    listed = client.get("/privacy/requests", params={"subject": "erin"}).json()["data"]
    assert [r["id"] for r in listed] == [row["id"]]

    reader = AuditReader(app.engine, KeyRing(app.engine, MASTER_KEY))
    (entry,) = reader.entries(kinds=["privacy.request_logged"])
    detail = json.loads(entry.detail or "{}")
    assert detail == {"ledger": row["id"], "type": "do_not_sell", "channel": "email"}
    assert [e.id for e in reader.entries(subject_id="erin")] == [entry.id]

    for refused in (
        {"received": (datetime.now(UTC) + timedelta(days=2)).date().isoformat()},
        {"received": "2020-01-01"},
        {"received": "yesterday"},
        {"right": "telepathy"},
        {"channel": "pigeon"},
        {"subject": ""},
    ):
        answer = log_request(client, **refused)
        assert answer.status_code == 400, (refused, answer.text)
        assert answer.json()["error"]["type"] == "invalid_request_error"

    done = client.post(f"/privacy/requests/{row['id']}/complete", json={})
    assert done.status_code == 200 and done.json()["status"] == "completed"
    assert done.json()["completed_at"]
    again = client.post(f"/privacy/requests/{row['id']}/complete", json={})
    assert again.status_code == 409 and again.json()["error"]["code"] == "request_closed"
    assert client.post("/privacy/requests/0123456789abcdef/complete", json={}).status_code == 404
    other = log_request(client, right="objection", channel="phone").json()
    no_reason = client.post(f"/privacy/requests/{other['id']}/complete", json={"status": "refused"})
    assert no_reason.status_code == 400
    refused_row = client.post(
        f"/privacy/requests/{other['id']}/complete",
        json={"status": "refused", "reason": "identity not established"},
    ).json()
    assert (refused_row["status"], refused_row["status_reason"]) == (
        "refused",
        "identity not established",
    )
    closed = reader.entries(kinds=["privacy.request_completed"])
    assert [json.loads(e.detail or "{}")["status"] for e in closed] == ["completed", "refused"]
    assert client.get("/compliance/audit/verify").json()["ok"] is True


def test_a_request_for_an_erased_subject_is_logged_by_reference(
    gateway: tuple[BastionApp, TestClient],
) -> None:
    _, client = gateway
    receipt = client.delete("/privacy/subjects/erin").json()
    logged = log_request(client, right="access", note=None)
    assert logged.status_code == 201
    assert logged.json()["subject"] == f"erased:{receipt['subject_ref']}"
    assert "erin" not in logged.text


def verify_receipt_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bastion_command(), "compliance", "verify-receipt", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


# The CLI reads only files: one store is enough.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_verify_receipt_says_what_a_receipt_attests_and_why_one_fails(
    gateway: tuple[BastionApp, TestClient], tmp_path: Path
) -> None:
    app, client = gateway
    client.patch("/privacy/subjects/alice", json={"display_name": "Alice"})
    receipt = client.delete("/privacy/subjects/alice").json()
    public = tmp_path / "audit-public.pem"
    public.write_text(public_key_pem(signing_key(app).public_key()))
    good = tmp_path / "receipt.json"
    good.write_text(json.dumps(receipt))

    done = verify_receipt_cli(str(good), "--public-key", str(public))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid erasure receipt" in done.stdout
    assert f"subject reference {receipt['subject_ref']} erased at" in done.stdout
    assert "1 audit data key(s) destroyed" in done.stdout
    assert "profile and flags deleted" in done.stdout
    assert receipt["audit_entry"] in done.stdout

    # The access answer for an erased subject carries the receipt; the signing key's file
    # stands in for the public key.
    wrapped = tmp_path / "access.json"
    wrapped.write_text(client.get("/privacy/subjects/alice").text)
    env = {"PATH": "/usr/bin:/bin", "BASTION_SIGNING_KEY_FILE": str(app.settings.signing_key_file)}
    assert verify_receipt_cli(str(wrapped), env=env).returncode == 0

    other_key = tmp_path / "other.pem"
    other_key.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    flipped = base64.b64decode(receipt["signature"])
    flipped = base64.b64encode(bytes([flipped[0] ^ 1]) + flipped[1:]).decode()
    cases: list[tuple[str, Any, list[str], str]] = [
        ("altered", {**receipt, "erased_us": receipt["erased_us"] - 1}, [], "a field was altered"),
        (
            "more-keys",
            {**receipt, "destroyed": {**receipt["destroyed"], "data_keys": 5}},
            [],
            "a field was altered",
        ),
        ("bad-signature", {**receipt, "signature": flipped}, [], "does not match"),
        ("not-base64", {**receipt, "signature": "not base64!"}, [], "not base64"),
        ("short", {**receipt, "signature": "AAAA"}, [], "3 bytes, not the 64"),
        ("unsigned", {k: v for k, v in receipt.items() if k != "signature"}, [], "no signature"),
        ("wrong-key", receipt, ["--public-key", str(other_key)], "signed by another key"),
        ("manifest", {"format": "bastion.export.v1"}, [], "not an erasure receipt"),
        ("text", "hello", [], "not an erasure receipt"),
    ]
    for name, document, extra, reason in cases:
        path = tmp_path / f"{name}.json"
        path.write_text(document if isinstance(document, str) else json.dumps(document))
        failed = verify_receipt_cli(str(path), "--public-key", str(public), *extra)
        assert failed.returncode == 1, (name, failed.stdout, failed.stderr)
        assert "INVALID" in failed.stdout and reason in failed.stdout, (name, failed.stdout)
    missing = verify_receipt_cli(str(tmp_path / "absent.json"), "--public-key", str(public))
    assert missing.returncode == 2 and "cannot read" in missing.stderr

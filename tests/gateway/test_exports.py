"""Signed exports and the AI Act report from a running gateway, checked by the offline CLI.

Real processes: a fixture upstream, ``bastion serve`` writing its audit log, and
``bastion compliance export / verify-export`` as an auditor would run them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from compliance.signing import load_or_create_signing_key
from tests.compliance.bundles import flip_byte, read_bundle, write_bundle
from tests.databases import postgres_database
from tests.gateway.test_audit_trail import CANARY, MASTER_KEY, audit_cli, audited_gateway, reader
from tests.support import ProcessPool, bastion_command, chat_body

WINDOW = {"since": "2020-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"}


def compliance_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    return subprocess.run(
        [*bastion_command(), "compliance", *args],
        capture_output=True,
        text=True,
        env=clean | (env or {}),
        timeout=60,
        check=False,
    )


def verify(bundle: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    return compliance_cli("verify-export", str(bundle), "--public-key", str(public_key))


@pytest.fixture
def exported(pool: ProcessPool, tmp_path: Path) -> tuple[Any, Path, Path, str]:
    """A gateway with a few calls behind it, and a bundle exported from it with payloads."""
    database_url = f"sqlite:///{tmp_path / 'bastion.db'}"
    gateway, _, signing = audited_gateway(pool, tmp_path, database_url)
    for n in range(5):
        r = gateway.http.post(
            "/v1/chat/completions",
            json=chat_body(content=f"{CANARY} {n}"),
            headers={"x-request-id": f"exp-{n}"},
        )
        assert r.status_code == 200
    r = gateway.http.post(
        "/compliance/exports", json=WINDOW | {"payloads": True, "reason": "DSAR 17"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-tar"
    disposition = r.headers["content-disposition"]
    assert disposition.startswith("attachment;") and ".tar" in disposition
    bundle = tmp_path / "export.tar"
    bundle.write_bytes(r.content)
    return gateway, bundle, signing, database_url


def test_round_trip_from_a_gateway_verifies_offline(
    exported: tuple[Any, Path, Path, str],
) -> None:
    _, bundle, signing, database_url = exported
    done = verify(bundle, signing)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "export OK" in done.stdout
    files = read_bundle(bundle)
    entries = [orjson.loads(line) for line in files["entries.jsonl"].splitlines()]
    calls = [e for e in entries if e["kind"] == "request"]
    sent = {json.loads(e["detail"])["client_request_id"] for e in calls}
    assert sent == {f"exp-{n}" for n in range(5)}
    assert len({e["request_id"] for e in calls}) == 5  # the gateway's own, one per call
    assert calls[0]["payload"]["request"]["messages"][0]["content"].startswith(CANARY)
    manifest = json.loads(files["manifest.json"])
    assert manifest["query"]["reason"] == "DSAR 17"
    assert manifest["signer"]["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")

    engine, audit = reader(database_url)
    try:
        made = audit.entries(kinds=["export.made"])
        viewed = audit.entries(kinds=["audit.content_viewed"])
    finally:
        engine.dispose()
    assert len(made) == 1 and len(viewed) == 1
    detail = json.loads(made[0].detail or "{}")
    assert detail["export_id"] == manifest["export_id"]
    assert json.loads(viewed[0].detail or "{}")["reason"] == "DSAR 17"
    # The export's own checkpoint keeps the log verifiable.
    assert audit_cli(database_url, signing, "verify").returncode == 0


@pytest.mark.parametrize("tampering", ["byte", "line", "manifest", "key"])
def test_tampering_is_detected(
    exported: tuple[Any, Path, Path, str], tmp_path: Path, tampering: str
) -> None:
    _, bundle, signing, _ = exported
    files = read_bundle(bundle)
    public_key = signing
    if tampering == "byte":
        files["entries.jsonl"] = flip_byte(files["entries.jsonl"], b"client_request_id")
        expected = "entries.jsonl: its SHA-256 does not match the manifest"
    elif tampering == "line":
        kept = files["entries.jsonl"].splitlines(keepends=True)
        files["entries.jsonl"] = b"".join(kept[:1] + kept[2:])
        expected = "entries.jsonl: its SHA-256 does not match the manifest"
    elif tampering == "manifest":
        files["manifest.json"] = files["manifest.json"].replace(b"DSAR 17", b"DSAR 18")
        expected = "manifest.sig: the signature does not match manifest.json"
    else:
        public_key = tmp_path / "other.key"
        load_or_create_signing_key(public_key)
        expected = "manifest.sig: the signature does not match manifest.json"
    done = verify(write_bundle(tmp_path / "tampered.tar", files), public_key)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"export FAILED: {expected}" in done.stdout


def test_payloads_need_a_reason(pool: ProcessPool, tmp_path: Path) -> None:
    gateway, _, _ = audited_gateway(pool, tmp_path, f"sqlite:///{tmp_path / 'b.db'}")
    r = gateway.http.post("/compliance/exports", json=WINDOW | {"payloads": True})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "reason"
    r = gateway.http.post("/compliance/exports", json={"since": "2021-01-01", "until": "2020"})
    assert r.status_code == 400


def test_cli_export_offline(exported: tuple[Any, Path, Path, str], tmp_path: Path) -> None:
    _, _, signing, database_url = exported
    env = {
        "BASTION_DATABASE_URL": database_url,
        "BASTION_SIGNING_KEY_FILE": str(signing),
        "BASTION_MASTER_KEY": base64.b64encode(MASTER_KEY).decode(),
    }
    out = tmp_path / "offline.tar"
    args = ["--since", WINDOW["since"], "--until", WINDOW["until"], "-o", str(out)]
    refused = compliance_cli("export", *args, "--payloads", env=env)
    assert refused.returncode == 2 and "reason" in refused.stderr
    done = compliance_cli("export", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    checked = verify(out, signing)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    engine, audit = reader(database_url)
    try:
        assert len(audit.entries(kinds=["export.made"])) == 2  # the API's and the CLI's
    finally:
        engine.dispose()


def test_ai_act_report_from_the_live_gateway(exported: tuple[Any, Path, Path, str]) -> None:
    gateway = exported[0]
    r = gateway.http.get("/compliance/reports/ai-act")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/markdown")
    assert "`dev-model`" in r.text and "audit-up" in r.text
    assert "logs are kept 90 days" in r.text  # the default retention is under six months
    assert "| 2xx | 5 | 100.0 % |" in r.text
    # What the running gateway does, not what a setting names.
    assert "Events shipped to Elasticsearch/OpenSearch: no" in r.text
    assert "Request events go to: audit, metrics" in r.text
    html = gateway.http.get("/compliance/reports/ai-act", headers={"accept": "text/html"})
    assert html.headers["content-type"].startswith("text/html")
    assert "<h2>1. System description</h2>" in html.text
    assert gateway.http.get("/compliance/reports/ai-act?format=pdf").status_code == 400


def test_round_trip_on_postgresql(pool: ProcessPool, tmp_path: Path) -> None:
    with postgres_database() as database_url:
        gateway, _, signing = audited_gateway(pool, tmp_path, database_url)
        for _ in range(3):
            assert gateway.http.post("/v1/chat/completions", json=chat_body()).status_code == 200
        r = gateway.http.post("/compliance/exports", json=WINDOW)
        assert r.status_code == 200, r.text
        bundle = tmp_path / "pg.tar"
        bundle.write_bytes(r.content)
        done = verify(bundle, signing)
        assert done.returncode == 0, done.stdout + done.stderr
        gateway.stop()

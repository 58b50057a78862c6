"""The audit trail of a running gateway: an entry per model call and per admin action,
durable before the answer completes, surviving SIGKILL, verifiable by ``bastion audit``.

Real processes: fixture upstreams, ``bastion serve`` writing to SQLite or PostgreSQL,
and the audit CLI; the entries are read back with the compliance package's reader.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from compliance.keyring import KeyRing
from compliance.reader import AuditReader
from compliance.signing import load_or_create_signing_key
from gateway.store import make_engine
from tests.databases import postgres_database
from tests.support import ProcessPool, bastion_command, chat_body, sse_data

MASTER_KEY = bytes(range(32))
CANARY = "canary-7f3a1c-audit"


def audited_gateway(pool: ProcessPool, tmp_path: Path, database_url: str, **extra: Any) -> Any:
    upstream = pool.upstream("audit-up", ["dev-model"])
    signing = tmp_path / "signing.key"
    load_or_create_signing_key(signing)
    gateway = pool.gateway(
        [upstream],
        env={"BASTION_MASTER_KEY": base64.b64encode(MASTER_KEY).decode()},
        database_url=database_url,
        signing_key_file=str(signing),
        audit={"checkpoint_every_entries": 50, "checkpoint_every_s": 0.5},
        **extra,
    )
    return gateway, upstream, signing


def client_request_id(entry: Any) -> str | None:
    """The ``x-request-id`` the client sent (the entry's request id is the gateway's)."""
    found: str | None = json.loads(entry.detail or "{}").get("client_request_id")
    return found


def reader(database_url: str) -> tuple[Engine, AuditReader]:
    engine = make_engine(database_url)
    return engine, AuditReader(engine, KeyRing(engine, MASTER_KEY))


def audit_cli(database_url: str, signing: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env |= {"BASTION_DATABASE_URL": database_url, "BASTION_SIGNING_KEY_FILE": str(signing)}
    return subprocess.run(
        [*bastion_command(), "audit", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bastion.db'}"
    else:
        with postgres_database() as url:
            yield url


def test_every_call_leaves_one_entry_with_its_payload_sealed(
    pool: ProcessPool, tmp_path: Path, database_url: str
) -> None:
    gateway, _, signing = audited_gateway(pool, tmp_path, database_url)
    whole = gateway.http.post(
        "/v1/chat/completions",
        json=chat_body(content=CANARY),
        headers={"x-request-id": "req-whole"},
    )
    assert whole.status_code == 200
    with gateway.http.stream(
        "POST",
        "/v1/chat/completions",
        json=chat_body(content="stream me", stream=True),
        headers={"x-request-id": "req-stream"},
    ) as r:
        events = sse_data(r.iter_lines())
    assert events[-1] == "[DONE]"
    missing = gateway.http.post(
        "/v1/chat/completions", json=chat_body("no-such-model"), headers={"x-request-id": "req-404"}
    )
    assert missing.status_code == 404
    created = gateway.http.post("/admin/keys", json={"roles": ["app"], "subject": "alice"})
    assert created.status_code == 201

    engine, audit = reader(database_url)
    try:
        found = {client_request_id(e): e for e in audit.entries(limit=100)}
        assert {"req-whole", "req-stream", "req-404"} <= set(found)
        entry = found["req-whole"]
        assert (entry.kind, entry.status, entry.model, entry.route) == (
            "request",
            200,
            "dev-model",
            "/v1/chat/completions",
        )
        assert entry.prompt_tokens is not None and entry.latency_us is not None
        payload = audit.payload(entry)
        assert payload["request"]["messages"][0]["content"] == CANARY
        assert payload["response"]["choices"][0]["message"]["content"]
        assert CANARY.encode() not in (entry.payload or b"")  # sealed, not in clear
        stream_payload = audit.payload(found["req-stream"])
        assert "data: [DONE]" in stream_payload["delivered"]
        assert found["req-stream"].ttft_us is not None
        assert found["req-404"].status == 404
        assert "does not exist" in json.dumps(audit.payload(found["req-404"]))
        kinds = [e.kind for e in audit.entries(kinds=["key.created"])]
        assert kinds == ["key.created"]
        detail = audit.entries(kinds=["key.created"])[0].detail or ""
        assert "alice" not in detail  # the subject is personal data: never in clear
    finally:
        engine.dispose()
    done = audit_cli(database_url, signing, "verify")
    assert done.returncode == 0, done.stdout + done.stderr


def test_nothing_a_client_saw_completed_is_lost_to_sigkill(
    pool: ProcessPool, tmp_path: Path, database_url: str
) -> None:
    """Clients hammer the gateway; SIGKILL it mid-load; every answer a client received in
    full has its entry, and the chain verifies."""
    gateway, _, signing = audited_gateway(pool, tmp_path, database_url)
    completed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=gateway.url, timeout=5) as http:
            n = 0
            while not stop.is_set():
                request_id = f"kill-{worker}-{n}"
                n += 1
                try:
                    stream = n % 3 == 0
                    r = http.post(
                        "/v1/chat/completions",
                        json=chat_body(content=f"{CANARY} {request_id}", stream=stream),
                        headers={"x-request-id": request_id},
                    )
                except httpx.HTTPError:
                    continue  # cut by the kill: not seen completed
                complete = r.status_code == 200 and (not stream or "data: [DONE]" in r.text)
                if complete:
                    with lock:
                        completed.append(request_id)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    assert gateway.process is not None
    gateway.process.kill()  # SIGKILL to the whole process group, mid-load
    stop.set()
    for t in threads:
        t.join(10)
    assert len(completed) > 20, "too little load to prove anything"

    engine, audit = reader(database_url)
    try:
        recorded = {client_request_id(e) for e in audit.entries(kinds=["request"], limit=100_000)}
    finally:
        engine.dispose()
    lost = [rid for rid in completed if rid not in recorded]
    assert lost == [], f"{len(lost)} of {len(completed)} completed calls have no entry"
    done = audit_cli(database_url, signing, "verify")
    assert done.returncode == 0, done.stdout + done.stderr

"""The compliance officer's routes: audit query and paging, audited decryption, verify
(which must name the entry whose byte was changed), the Art. 30 processing record."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from gateway.store import make_engine
from tests.gateway.test_access import bearer
from tests.gateway.test_privacy import start
from tests.support import ProcessPool, chat_body

SECRET = "canary-officer-41c0"


def test_query_page_decrypt_verify_and_tamper(pool: ProcessPool, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bastion.db'}"
    gateway, keys, _ = start(pool, tmp_path, url)
    http, officer = gateway.http, bearer(keys["auditor"])
    for n in range(5):
        body = chat_body("m1", content=f"{SECRET}-{n}")
        r = http.post("/v1/chat/completions", json=body, headers=bearer(keys["alice"]))
        assert r.status_code == 200
    first = http.get("/compliance/audit?subject=alice&limit=3", headers=officer).json()
    assert len(first["data"]) == 3 and first["next_cursor"]
    assert all("payload" not in e for e in first["data"])
    rest = http.get(
        f"/compliance/audit?subject=alice&limit=3&cursor={first['next_cursor']}", headers=officer
    ).json()
    assert len(rest["data"]) == 2 and rest["next_cursor"] is None
    ids = [e["id"] for e in first["data"] + rest["data"]]
    assert len(set(ids)) == 5
    assert http.get("/compliance/audit?payloads=true", headers=officer).status_code == 400
    opened = http.get(
        "/compliance/audit?subject=alice&kind=request&payloads=true&reason=ticket 7",
        headers=officer,
    ).json()["data"]
    assert [e["payload"]["request"]["messages"][0]["content"] for e in opened] == [
        f"{SECRET}-{n}" for n in range(5)
    ]
    viewed = http.get("/compliance/audit?kind=audit.content_viewed", headers=officer).json()
    assert viewed["data"][0]["detail"]["reason"] == "ticket 7"
    assert http.get("/compliance/audit?since=yesterday", headers=officer).status_code == 400
    assert http.get("/compliance/audit", headers=bearer(keys["app"])).status_code == 403

    record = http.get("/compliance/processing-record", headers=officer).json()
    assert record["retention"]["audit_days"] == 90
    assert record["recipients"][0]["name"] == "privacy-up"
    assert record["security_measures"]["tls_in_transit"] is False

    ok = http.get("/compliance/audit/verify", headers=officer).json()
    assert ok["ok"] is True and ok["entries"] >= 6 and ok["chains"] >= 1
    victim = ids[2]
    writer, seq = victim.rsplit(":", 1)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE audit_entries SET status = 201 WHERE writer_id = :w AND seq = :s"),
                {"w": writer, "s": int(seq)},
            )
    finally:
        engine.dispose()
    bad = http.get("/compliance/audit/verify", headers=officer)
    assert bad.status_code == 200
    assert bad.json()["ok"] is False
    assert bad.json()["first_problem"]["entry"] == victim

"""/readyz tells strangers only ready or not, and says not ready when the store is gone;
a call the store cannot record is refused before anything is forwarded (issue 14 item 9)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, text

from tests.databases import ADMIN_URL, postgres_database
from tests.gateway.test_access import MASTER_KEY, bearer, make_key, secure_settings, wait_for_key
from tests.gateway.test_audit_trail import audited_gateway
from tests.support import ProcessPool, assert_openai_error, chat_body, wait_until


def test_public_readiness_hides_the_topology(pool: ProcessPool, tmp_path: Path) -> None:
    upstream = pool.upstream("ready-up", ["m1"])
    gateway = pool.gateway(
        [upstream], env={"BASTION_MASTER_KEY": MASTER_KEY}, **secure_settings(tmp_path / "b.db")
    )
    stranger = gateway.http.get("/readyz")
    assert stranger.status_code == 200 and stranger.json() == {"status": "ready"}
    app = make_key(gateway, "--role", "app")["key"]
    admin = make_key(gateway, "--role", "admin")["key"]
    wait_for_key(gateway, app)
    wait_for_key(gateway, admin)
    assert gateway.http.get("/readyz", headers=bearer(app)).json() == {"status": "ready"}
    detailed = gateway.http.get("/readyz", headers=bearer(admin)).json()
    assert detailed["models"] == {"m1": True} and detailed["store"]["up"] is True
    assert detailed["upstreams"][0]["name"] == "ready-up"


def _allow_connections(database_url: str, allowed: bool) -> None:
    name = database_url.rsplit("/", 1)[1]
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {allowed}'))
        if not allowed:
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
    admin.dispose()


def test_a_lost_store_stops_calls_before_they_reach_the_upstream(
    pool: ProcessPool, tmp_path: Path
) -> None:
    with postgres_database() as database_url:
        gateway, upstream, _ = audited_gateway(pool, tmp_path, database_url)
        assert gateway.http.post("/v1/chat/completions", json=chat_body()).status_code == 200
        _allow_connections(database_url, False)
        try:
            wait_until(lambda: gateway.http.get("/readyz").status_code == 503, 10, what="503")
            before = upstream.stats()["requests"]
            r = gateway.http.post("/v1/chat/completions", json=chat_body())
            assert_openai_error(r, 503, "service_unavailable", "audit_unavailable")
            assert upstream.stats()["requests"] == before  # nothing was forwarded
        finally:
            _allow_connections(database_url, True)
        wait_until(lambda: gateway.http.get("/readyz").status_code == 200, 10, what="200")
        assert gateway.http.post("/v1/chat/completions", json=chat_body()).status_code == 200
        gateway.stop()

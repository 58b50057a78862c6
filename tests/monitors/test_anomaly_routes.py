"""GET /compliance/anomalies through the gateway's own guard and error middleware:
filters, paging, cold-start status, explanations and request ids; auditor and admin
200, app 403 (with the ``anomalies:read`` permission the lead adds to gateway/rbac.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from starlette.routing import Route, Router, request_response
from starlette.testclient import TestClient

from gateway.anomaly_routes import AnomalyRoutes
from gateway.asgi import Receive, Scope, Send
from gateway.middleware.auth import Guarded
from gateway.middleware.errors import ErrorMiddleware
from gateway.rbac import ROLE_PERMISSIONS, Principal
from monitors.anomaly import store
from monitors.anomaly.settings import AnomalySettings
from tests.monitors.anomaly_db import anomaly_engine  # noqa: F401

PERMISSION = "anomalies:read"
HOUR_US = 3_600_000_000
T0 = 1_767_225_600_000_000


class RolesFromHeader:
    """Stands in for the authentication middleware: ``x-roles: a,b`` is the principal."""

    def __init__(self, app: Router) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        roles = dict(scope["headers"]).get(b"x-roles", b"").decode()
        principal = None
        if roles:
            principal = Principal(f"k-{roles}", frozenset(roles.split(",")), None, None, "std")
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


@pytest.fixture
def client(anomaly_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:  # noqa: F811
    # The lead's rbac.py edit: anomalies:read for admin and auditor.
    for role in ("admin", "auditor"):
        monkeypatch.setitem(ROLE_PERMISSIONS, role, ROLE_PERMISSIONS[role] | {PERMISSION})
    routes = AnomalyRoutes(anomaly_engine, AnomalySettings(min_windows=10))
    guarded = Guarded(request_response(routes.list), PERMISSION)
    app = ErrorMiddleware(RolesFromHeader(Router([Route("/compliance/anomalies", guarded)])))
    with TestClient(app) as test_client:
        yield test_client


def flag(n: int, key: str, model: str, family: str) -> dict:
    return {
        "time_us": T0 + n * HOUR_US,
        "window_start_us": T0 + n * HOUR_US - 30_000_000,
        "key_id": key,
        "model": model,
        "family": family,
        "score": 12.5,
        "threshold": 10.0,
        "model_version": 1,
        "requests": 2,
        "request_ids": [f"req-{n}-a", f"req-{n}-b"],
        "explanation": {"family": family, "features": [{"text": "x 1 (usual 0): +1.00"}]},
    }


def test_filters_paging_status_and_access(client: TestClient, anomaly_engine: Engine) -> None:  # noqa: F811
    auditor, admin = {"x-roles": "auditor"}, {"x-roles": "admin"}
    empty = client.get("/compliance/anomalies", headers=auditor)
    assert empty.status_code == 200
    assert empty.json()["data"] == [] and empty.json()["status"]["state"] == "cold_start"
    store.insert_anomalies(
        anomaly_engine,
        [
            flag(0, "key-a", "m1", "volume"),
            flag(1, "key-b", "m1", "size"),
            flag(2, "key-a", "m2", "safety"),
            flag(3, "key-a", "m1", "volume"),
        ],
    )
    page = client.get("/compliance/anomalies?limit=3", headers=admin).json()
    assert [f["time"][:13] for f in page["data"]] == [
        "2026-01-01T03",
        "2026-01-01T02",
        "2026-01-01T01",
    ]
    assert page["data"][0]["request_ids"] == ["req-3-a", "req-3-b"]
    assert page["data"][0]["explanation"]["features"][0]["text"].startswith("x 1")
    rest = client.get(
        f"/compliance/anomalies?limit=3&cursor={page['next_cursor']}", headers=admin
    ).json()
    assert [f["key_id"] for f in rest["data"]] == ["key-a"] and rest["next_cursor"] is None

    def ids(query: str) -> list[str]:
        answer = client.get(f"/compliance/anomalies?{query}", headers=auditor)
        assert answer.status_code == 200, answer.text
        return [f["request_ids"][0] for f in answer.json()["data"]]

    assert ids("key=key-a") == ["req-3-a", "req-2-a", "req-0-a"]
    assert ids("model=m2") == ["req-2-a"]
    assert ids("family=volume") == ["req-3-a", "req-0-a"]
    assert ids("since=2026-01-01T01:00:00Z&until=2026-01-01T03:00:00Z") == ["req-2-a", "req-1-a"]
    assert ids("key=key-a&family=volume&since=2026-01-01T02:00:00") == ["req-3-a"]

    for bad in ("family=fun", "since=yesterday", "limit=0", "limit=x", "cursor=nope"):
        answer = client.get(f"/compliance/anomalies?{bad}", headers=auditor)
        assert answer.status_code == 400, bad
        assert answer.json()["error"]["param"] == bad.split("=")[0]
    assert client.get("/compliance/anomalies", headers={"x-roles": "app"}).status_code == 403
    assert client.get("/compliance/anomalies").status_code == 401

"""``/admin/keys`` over HTTP: separation of duties (issue 14, item 4).

An admin key may mint ordinary keys, but not an auditor or admin key, nor a key bound to
a subject the gateway already knows, unless the deployment allows it; the CLI still can.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route, Router

from gateway.admin_routes import KeyAdmin
from gateway.app import BastionApp
from gateway.asgi import Receive, Scope, Send
from gateway.errors import GatewayError
from tests.gateway.app_client import app_settings, bearer, serving
from tests.support import assert_openai_error


@pytest.fixture
def gateway(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = app_settings(f"sqlite:///{tmp_path / 'bastion.db'}", tmp_path)
    with serving(settings, {"admin": ["admin"], "auditor": ["auditor"]}) as served:
        yield served


@pytest.mark.parametrize("roles", [["auditor"], ["admin"], ["app", "auditor"]])
def test_an_admin_cannot_mint_auditor_or_admin_keys_over_http(gateway, roles: list[str]) -> None:  # type: ignore[no-untyped-def]
    client, keys = gateway
    r = client.post("/admin/keys", json={"roles": roles}, headers=bearer(keys["admin"]))
    error = assert_openai_error(r, 403, "permission_error", "privileged_key", "roles")
    assert "bastion keys create" in error["message"]
    listed = client.get("/admin/keys", headers=bearer(keys["admin"])).json()["data"]
    assert len(listed) == 2  # nothing was minted


def test_an_admin_cannot_mint_a_key_for_a_subject_with_audit_entries(gateway) -> None:  # type: ignore[no-untyped-def]
    client, keys = gateway
    admin, auditor = bearer(keys["admin"]), bearer(keys["auditor"])
    # Alice gets audit entries (a rectification is recorded under her data key).
    assert client.patch(
        "/privacy/subjects/alice", json={"email": "a@x"}, headers=auditor
    ).is_success
    r = client.post("/admin/keys", json={"roles": ["app"], "subject": "alice"}, headers=admin)
    assert_openai_error(r, 403, "permission_error", "privileged_key", "subject")
    # A subject nobody knows yet, and a key without a subject, are fine.
    fresh = client.post("/admin/keys", json={"roles": ["app"], "subject": "bob"}, headers=admin)
    assert fresh.status_code == 201, fresh.text
    # Bob now has a key: a second one for him is privileged too.
    again = client.post("/admin/keys", json={"roles": ["app"], "subject": "bob"}, headers=admin)
    assert_openai_error(again, 403, "permission_error", "privileged_key", "subject")
    assert client.post("/admin/keys", json={"roles": ["app"]}, headers=admin).status_code == 201


class _As:
    """The routes below, called as an admin key (what authentication would set)."""

    def __init__(self, app: Any, principal: Any) -> None:
        self.app, self.principal = app, principal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {}).update(principal=self.principal, request_id="r1")
        try:
            await self.app(scope, receive, send)
        except GatewayError as exc:
            await send({"type": "http.response.start", "status": exc.status, "headers": []})
            await send({"type": "http.response.body", "body": exc.body()})


def test_a_deployment_that_allows_privileged_keys_mints_them(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    settings = app_settings(f"sqlite:///{tmp_path / 'bastion.db'}", tmp_path)
    with serving(settings, {"admin": ["admin"]}) as (client, keys):
        app: BastionApp = client.app  # type: ignore[assignment]
        admin = app.key_cache.check(keys["admin"], 0.0)
        for allow, status in [(False, 403), (True, 201)]:
            admin_routes = KeyAdmin(app.key_store, app.key_cache, {}, allow_privileged=allow)
            router = Router([Route("/k", admin_routes.create, methods=["POST"])])
            with TestClient(_As(router, admin)) as direct:
                r = direct.post("/k", json={"roles": ["auditor"]})
                assert r.status_code == status, r.text


@pytest.mark.parametrize("path", ["/admin/keys/", "/v1/models/", "/healthz/", "//evil.example/"])
def test_no_redirect_is_built_from_the_host_header(gateway, path: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 14 item 10: a trailing slash was answered 307 to ``http://<Host>/admin/keys``."""
    client, _ = gateway
    r = client.get(path, headers={"host": "evil.example"}, follow_redirects=False)
    assert not r.is_redirect and "location" not in r.headers, r.headers
    assert_openai_error(r, 404, "invalid_request_error", "not_found")

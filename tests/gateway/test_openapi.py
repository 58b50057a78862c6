"""The OpenAPI document covers every route, and a live gateway holds to it under fuzzing
(schemathesis, every role's key, a bounded number of examples per operation): no 5xx,
no answer outside the document (issue 14, item 8)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from gateway.app import BastionApp
from gateway.openapi import QUERY_PARAMETERS, REQUEST_BODIES, openapi_document
from gateway.rbac import ROLE_PERMISSIONS
from tests.gateway.app_client import app_settings
from tests.gateway.test_access import MASTER_KEY, secure_settings
from tests.support import ProcessPool, bastion_command

EXAMPLES_PER_OPERATION = 10


def route_table(tmp_path: Path) -> list[tuple[str, str, str]]:
    app = BastionApp(app_settings(f"sqlite:///{tmp_path / 'x.db'}", tmp_path))
    return app.route_permissions()


def test_every_route_is_an_operation_with_its_permission(tmp_path: Path) -> None:
    routes = route_table(tmp_path)
    document = openapi_document(routes)
    assert document["openapi"] == "3.1.0"
    operations = {
        (method.upper(), path): operation["x-permission"]
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    assert operations == {(method, path): permission for method, path, permission in routes}
    # No stale entries: every documented body and query belongs to a served route.
    served = {(method, path) for method, path, _ in routes}
    assert set(REQUEST_BODIES) <= served and set(QUERY_PARAMETERS) <= served
    for (method, path), permission in operations.items():
        operation = document["paths"][path][method.lower()]
        assert ("security" in operation) == (permission != "public")
        assert "default" in operation["responses"]
    # Loadable by a client generator.
    assert len(list(schemathesis.openapi.from_dict(document).get_all_operations())) == len(routes)


def test_openapi_json_is_served_publicly(tmp_path: Path) -> None:
    """``GET /openapi.json`` (public) is the document of the app's own routes."""
    from starlette.testclient import TestClient

    app = BastionApp(app_settings(f"sqlite:///{tmp_path / 'x.db'}", tmp_path))
    with TestClient(app) as client:
        r = client.get("/openapi.json")
        assert r.status_code == 200, r.text
        assert r.json() == openapi_document(app.route_permissions())
        assert ("GET", "/openapi.json", "public") in app.route_permissions()


def document_operations(document: dict[str, Any]) -> list[str]:
    return [f"{m.upper()} {p}" for p, methods in document["paths"].items() for m in methods]


def make_key(config: Path, role: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_MASTER_KEY"] = MASTER_KEY
    argv = [*bastion_command(), "keys", "create", "--role", role, "--json"]
    done = subprocess.run(
        [*argv, "--config", str(config)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    key: str = json.loads(done.stdout)["key"]
    return key


def test_a_live_gateway_holds_to_its_document_under_fuzzing(
    pool: ProcessPool, tmp_path: Path
) -> None:
    upstream = pool.upstream("fuzz-up", ["m1", "m2"])
    config = secure_settings(tmp_path / "bastion.db")
    config["rate_limits"] = {"enabled": False}
    gateway = pool.gateway([upstream], env={"BASTION_MASTER_KEY": MASTER_KEY}, **config)
    keys = {role: make_key(gateway.config_path, role) for role in ROLE_PERMISSIONS}
    document = openapi_document(route_table(tmp_path))
    schema = schemathesis.openapi.from_dict(document)
    conformance = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
    ]
    failures: list[str] = []
    seen: dict[str, Any] = {"2xx": 0, "4xx": 0, "operations": set()}
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for result in schema.get_all_operations():
            operation = result.ok()
            permission = operation.definition.raw["x-permission"]
            # The roles that may call it (its body and parameters are then read), and
            # one that may not (refused before).
            allowed = [r for r, held in ROLE_PERMISSIONS.items() if permission in held]
            refused = [r for r, held in ROLE_PERMISSIONS.items() if permission not in held]
            for role in allowed + refused[:1]:
                headers = {"authorization": f"Bearer {keys[role]}"}
                failures += fuzz(client, operation, headers, conformance, role, seen)
    assert not failures, "\n".join(failures[:20])
    # The fuzzing reached the routes: answers of both kinds, from every operation.
    assert seen["2xx"] > 50 and seen["4xx"] > 50, seen
    assert len(seen["operations"]) == len(document_operations(document)), seen["operations"]


def fuzz(
    client: httpx.Client,
    operation: Any,
    headers: dict[str, str],
    run: list[Any],
    role: str,
    seen: dict[str, Any],
) -> list[str]:
    """EXAMPLES_PER_OPERATION cases of ``operation``, sent with httpx (schemathesis's own
    transport, requests, does not work beside urllib3.future here), each answer checked."""
    found: list[str] = []

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Any) -> None:
        sent = case.as_transport_kwargs(base_url=str(client.base_url), headers=headers)
        response = client.request(
            sent["method"],
            sent["url"],
            params=sent.get("params"),
            headers=sent["headers"],
            json=sent.get("json"),
            content=sent.get("data"),
        )
        seen["operations"].add(operation.label)
        kind = f"{response.status_code // 100}xx"
        seen[kind] = seen.get(kind, 0) + 1
        try:
            case.validate_response(response, checks=run)
        except Exception as exc:  # collected, not raised: no shrinking, every failure seen
            found.append(f"{operation.label} as {role}: {str(exc)[:600]}")

    one()
    return found

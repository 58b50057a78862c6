"""Inputs that once reached a 500 (issue 14, item 7): each is a clear 400 in OpenAI's
error shape, and nothing is half-written. SQLite and PostgreSQL, the whole app in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway.app_client import app_settings, bearer, serving
from tests.support import assert_openai_error, chat_body

ROLES = {"admin": ["admin"], "app": ["app"], "auditor": ["auditor"]}


@pytest.fixture
def gateway(database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    with serving(app_settings(database_url, tmp_path), ROLES) as served:
        yield served


@pytest.mark.parametrize("model", ["m" * 257, "m1\x00", "\x00"])
def test_a_long_or_nul_model_name_is_400(gateway, model: str) -> None:  # type: ignore[no-untyped-def]
    client, keys = gateway
    r = client.post("/v1/chat/completions", json=chat_body(model), headers=bearer(keys["app"]))
    assert_openai_error(r, 400, "invalid_request_error", "invalid_request", "model")


@pytest.mark.parametrize("expires", ["3000000d", "99999999999d", "\u0663d", "1\u0663h"])
def test_expires_in_overflow_and_non_ascii_digits_are_400(gateway, expires: str) -> None:  # type: ignore[no-untyped-def]
    client, keys = gateway
    body = {"roles": ["app"], "expires_in": expires}
    r = client.post("/admin/keys", json=body, headers=bearer(keys["admin"]))
    assert_openai_error(r, 400, "invalid_request_error", "invalid_request", "expires_in")
    listed = client.get("/admin/keys", headers=bearer(keys["admin"])).json()["data"]
    assert len(listed) == len(ROLES)  # no key was made


@pytest.mark.parametrize(
    "raw",
    [
        b'{"attributes": {"a": -20012430154548469760}}',
        b'{"attributes": {"a": 1e400}}',
        b'{"attributes": {"a": [1, -1e400]}}',
        b'{"attributes": {"a\\u0000": 1}}',
        b'{"display_name": "x\\u0000y"}',
    ],
)
def test_rectification_that_cannot_be_stored_is_400_and_nothing_is_written(
    gateway,  # type: ignore[no-untyped-def]
    raw: bytes,
) -> None:
    client, keys = gateway
    auditor = {**bearer(keys["auditor"]), "content-type": "application/json"}
    r = client.patch("/privacy/subjects/zed", content=raw, headers=auditor)
    assert_openai_error(r, 400, "invalid_request_error", "invalid_request")
    # No request left open in the ledger, no profile saved.
    requests = client.get("/privacy/requests?subject=zed", headers=auditor).json()["data"]
    assert requests == []
    good = client.patch("/privacy/subjects/zed", json={"attributes": {"a": 1}}, headers=auditor)
    assert good.status_code == 200, good.text
    assert [h["version"] for h in good.json()["history"]] == [1]


@pytest.mark.parametrize(
    "query", ["subject=a%00b", "kind=x%00", "request_id=%00", "key=k%00", "subject=" + "s" * 300]
)
def test_nul_or_long_audit_query_parameters_are_400(gateway, query: str) -> None:  # type: ignore[no-untyped-def]
    client, keys = gateway
    r = client.get(f"/compliance/audit?{query}", headers=bearer(keys["auditor"]))
    param = query.split("=")[0]
    assert_openai_error(r, 400, "invalid_request_error", "invalid_request", param)


@pytest.mark.parametrize("subject", ["a%00b", "%01", "s" * 5000])
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_nul_or_long_subject_ids_in_the_path_are_400(gateway, subject: str, method: str) -> None:  # type: ignore[no-untyped-def]
    client, keys = gateway
    r = client.request(
        method,
        f"/privacy/subjects/{subject}",
        json={"display_name": "x"} if method == "PATCH" else None,
        headers=bearer(keys["auditor"]),
    )
    assert_openai_error(r, 400, "invalid_request_error", "invalid_request", "subject_id")


def test_a_5000_character_subject_in_a_logged_request_is_400(gateway) -> None:  # type: ignore[no-untyped-def]
    client, keys = gateway
    body = {"subject": "s" * 5000, "right": "access", "received": "2026-01-05", "channel": "email"}
    r = client.post("/privacy/requests", json=body, headers=bearer(keys["auditor"]))
    assert_openai_error(r, 400, "invalid_request_error", "invalid_request")
    r = client.get("/privacy/requests?subject=" + "s" * 5000, headers=bearer(keys["auditor"]))
    assert_openai_error(r, 400, "invalid_request_error", "invalid_request")


@pytest.mark.parametrize("expires", ["99999999999d", "\u0663d"])
def test_the_cli_refuses_an_impossible_expiry_with_one_line(tmp_path: Path, expires: str) -> None:
    """``bastion keys create --expires 99999999999d`` printed a traceback (OverflowError)."""
    import base64

    from tests.gateway.app_client import MASTER_KEY
    from tests.support import run_bastion

    config = {
        "upstreams": [{"name": "a", "url": "http://127.0.0.1:9", "models": ["m"]}],
        "database_url": f"sqlite:///{tmp_path / 'keys.db'}",
        "master_key": base64.b64encode(MASTER_KEY).decode(),
    }
    done = run_bastion(["keys", "create", "--role", "app", "--expires", expires], config, tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("bastion: --expires:"), done.stderr

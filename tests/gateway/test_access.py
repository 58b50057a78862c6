"""Access control end to end: API keys from the CLI, RBAC on every route, model
allow-lists, rate limits (in memory and in Redis across two gateway processes), priority.

Real processes throughout: fixture upstreams, `bastion serve`, `bastion keys`.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.rbac import ROLE_PERMISSIONS
from tests.databases import postgres_database
from tests.support import (
    Gateway,
    ProcessPool,
    assert_openai_error,
    bastion_command,
    chat_body,
)
from tests.watermarking import build_tokenizer

MASTER_KEY = base64.b64encode(b"k" * 32).decode()
TODAY = datetime.now(UTC).date().isoformat()
ROLES = list(ROLE_PERMISSIONS)


def signing_key_beside(database: Path) -> Path:
    """An audit signing key file next to the database (made once per directory)."""
    from compliance.signing import load_or_create_signing_key

    path = database.parent / "signing.key"
    load_or_create_signing_key(path)
    return path


def secure_settings(database: Path, **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "dev": False,
        "signing_key_file": str(signing_key_beside(database)),
        "auth": {"enabled": True, "key_refresh_s": 0.2, "role_models": {"data_scientist": ["m2"]}},
        "rate_limits": {"enabled": True, "requests_per_second": 1000, "tokens_per_minute": 10**8},
        "database_url": f"sqlite:///{database}",
    }
    settings.update(extra)
    return settings


def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_MASTER_KEY"] = MASTER_KEY
    return subprocess.run(
        [*bastion_command(), *args, "--config", str(gateway.config_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_key(gateway: Gateway, *args: str) -> dict[str, Any]:
    done = cli(gateway, "keys", "create", "--json", *args)
    assert done.returncode == 0, done.stderr
    created: dict[str, Any] = json.loads(done.stdout)
    return created


def wait_for_key(gateway: Gateway, key: str) -> None:
    """A key made by the CLI reaches the running gateway within auth.key_refresh_s."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        r = gateway.http.get("/v1/models", headers=bearer(key))
        if r.status_code != 401:
            return
        time.sleep(0.05)
    raise AssertionError("the gateway never accepted the new key")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def secure(module_pool: ProcessPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One upstream serving m1 and m2 behind a gateway with authentication on."""
    upstream = module_pool.upstream("acl-up", ["m1", "m2"])
    database = tmp_path_factory.mktemp("acl") / "bastion.db"
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("acl-tokenizer"))
    watermark_keys = json.dumps({"k1": base64.b64encode(b"w" * 32).decode()})
    gateway = module_pool.gateway(
        [upstream],
        env={"BASTION_MASTER_KEY": MASTER_KEY, "BASTION_WATERMARK_KEYS": watermark_keys},
        watermark={"enabled": True, "tokenizers": {"m2": str(tokenizer)}},
        **secure_settings(database),
    )
    keys = {role: make_key(gateway, "--role", role)["key"] for role in ROLES}
    for key in keys.values():
        wait_for_key(gateway, key)
    yield gateway, upstream, keys


# Every route, a request that the route accepts when allowed, and its permission (m2:
# the one model every model-calling role may use in this configuration).
ROUTES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("POST", "/v1/chat/completions", chat_body("m2"), "models:call"),
    ("POST", "/v1/completions", {"model": "m2", "prompt": "hi"}, "models:call"),
    ("POST", "/v1/embeddings", {"model": "m2", "input": "hi"}, "models:call"),
    ("GET", "/v1/models", None, "models:list"),
    ("POST", "/v1/watermark/detect", {"text": "hello there", "model": "m2"}, "watermark:detect"),
    ("GET", "/metrics", None, "metrics:read"),
    ("GET", "/admin/upstreams", None, "upstreams:read"),
    ("GET", "/admin/keys", None, "keys:manage"),
    ("POST", "/admin/keys", {"roles": ["app"], "description": "matrix"}, "keys:manage"),
    ("DELETE", "/admin/keys/0000000000000000", None, "keys:manage"),
    ("GET", "/healthz", None, "public"),
    ("GET", "/readyz", None, "public"),
    ("GET", "/openapi.json", None, "public"),
    ("GET", "/compliance/audit", None, "audit:read"),
    ("GET", "/compliance/audit/verify", None, "audit:read"),
    ("GET", "/compliance/processing-record", None, "audit:read"),
    (
        "POST",
        "/compliance/exports",
        {"since": "2020-01-01T00:00:00Z", "until": "2020-01-02T00:00:00Z"},
        "audit:read",
    ),
    ("GET", "/compliance/reports/ai-act", None, "audit:read"),
    ("GET", "/compliance/anomalies", None, "anomalies:read"),
    ("GET", "/privacy/subjects/matrix-subject", None, "privacy:manage"),
    ("PATCH", "/privacy/subjects/matrix-subject", {"display_name": "M"}, "privacy:manage"),
    ("POST", "/privacy/subjects/matrix-subject/restrict", {}, "privacy:manage"),
    ("DELETE", "/privacy/subjects/matrix-subject/restrict", None, "privacy:manage"),
    ("PUT", "/privacy/subjects/matrix-subject/do-not-sell", {}, "privacy:manage"),
    ("PUT", "/privacy/subjects/matrix-subject/legal-hold", {"reason": "r"}, "privacy:manage"),
    ("DELETE", "/privacy/subjects/matrix-subject/legal-hold", None, "privacy:manage"),
    ("DELETE", "/privacy/subjects/matrix-subject", None, "privacy:manage"),
    ("GET", "/privacy/requests", None, "privacy:manage"),
    (
        "POST",
        "/privacy/requests",
        {"subject": "matrix-subject", "right": "objection", "received": TODAY, "channel": "letter"},
        "privacy:manage",
    ),
    ("POST", "/privacy/requests/ffffffffffffffff/complete", {}, "privacy:manage"),
    ("POST", "/privacy/requests/ffffffffffffffff/extend", {"reason": "r"}, "privacy:manage"),
]
# Concrete path parts in ROUTES and the route templates they stand for.
PLACEHOLDERS = {
    "0000000000000000": "{key_id}",
    "matrix-subject": "{subject_id}",
    "ffffffffffffffff": "{request_id}",
}


def template(path: str) -> str:
    for concrete, placeholder in PLACEHOLDERS.items():
        path = path.replace(concrete, placeholder)
    return path


def secure_app() -> Any:
    from gateway.app import BastionApp
    from gateway.config import Settings

    settings = Settings(
        upstreams=[{"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}],
        master_key=MASTER_KEY,
        database_url="sqlite://",
        audit={"enabled": False},
    )
    return BastionApp(settings)


def test_every_route_is_in_the_matrix() -> None:
    served = set(secure_app().route_permissions())
    tested = {(m, template(p), perm) for m, p, _, perm in ROUTES}
    assert served == tested


def test_readme_shows_the_permission_table() -> None:
    from gateway.rbac import permission_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert permission_table(secure_app().route_permissions()) in readme


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("method", "path", "body", "permission"), ROUTES)
def test_role_route_matrix(
    secure: Any, role: str, method: str, path: str, body: dict[str, Any] | None, permission: str
) -> None:
    gateway, _, keys = secure
    response = gateway.http.request(method, path, json=body, headers=bearer(keys[role]))
    if permission == "public" or permission in ROLE_PERMISSIONS[role]:
        assert response.status_code not in (401, 403), response.text
        assert response.status_code < 500, response.text
    else:
        assert response.status_code == 403, response.text
        assert_openai_error(response, 403, "permission_error", "permission_denied")


@pytest.mark.parametrize(("method", "path", "body", "permission"), ROUTES)
def test_no_key_is_401_except_public_routes(
    secure: Any, method: str, path: str, body: dict[str, Any] | None, permission: str
) -> None:
    gateway, _, _ = secure
    response = gateway.http.request(method, path, json=body)
    if permission == "public":
        assert response.status_code == 200
    else:
        assert_openai_error(response, 401, "invalid_request_error", "invalid_api_key")
        assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer sk-not-ours",
        "bearer bst_0123456789abcdef_" + "A" * 43,
        "Bearer " + "x" * 6000,
        "Token abc",
    ],
)
def test_garbage_authorization_is_401(secure: Any, header: str) -> None:
    gateway, _, _ = secure
    response = gateway.http.post(
        "/v1/chat/completions", json=chat_body("m1"), headers={"Authorization": header}
    )
    assert_openai_error(response, 401, "invalid_request_error", "invalid_api_key")


def raw_request(gateway: Gateway, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_non_utf8_and_huge_headers_never_500(secure: Any) -> None:
    gateway, _, _ = secure
    reply = raw_request(
        gateway,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xfd\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    # Heads up to server.max_header_bytes (64 KiB by default) reach the app; larger ones
    # get 431 in OpenAI's shape, readable by a client still sending (lingering close).
    large = b"X-Junk: " + b"a" * 32_000 + b"\r\n"
    reply = raw_request(gateway, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + large + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    for huge in (
        b"X-Junk: " + b"a" * 200_000 + b"\r\n",
        b"".join(b"X-Junk-%d: %s\r\n" % (i, b"a" * 100) for i in range(2_000)),
        b"X-Junk: " + b"a" * 5_000_000 + b"\r\n",
    ):
        reply = raw_request(gateway, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + huge + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
        assert b'"code":"request_headers_too_large"' in reply.replace(b" ", b""), reply
    assert gateway.http.get("/healthz").status_code == 200


def test_key_lifecycle_with_the_openai_client(secure: Any) -> None:
    gateway, _, _ = secure
    created = make_key(gateway, "--role", "app", "--subject", "alice", "--models", "m1")
    assert created["key"].startswith("bst_") and created["roles"] == ["app"]
    wait_for_key(gateway, created["key"])
    client = openai.OpenAI(base_url=gateway.base_url, api_key=created["key"], max_retries=0)
    reply = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert "upstream=acl-up" in (reply.choices[0].message.content or "")
    assert [m.id for m in client.models.list()] == ["m1"]  # the key's own allow-list
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="m2", messages=[{"role": "user", "content": "hi"}])

    listed = cli(gateway, "keys", "list", "--json")
    assert created["id"] in {k["id"] for k in json.loads(listed.stdout)}
    assert created["key"] not in listed.stdout
    revoked = cli(gateway, "keys", "revoke", created["id"])
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 1.5  # key_refresh_s is 0.2 here; the promise is "within"
    while True:
        try:
            client.models.list()
        except openai.AuthenticationError as exc:
            assert "revoked" in str(exc)
            break
        assert time.monotonic() < deadline, "revocation did not take effect"
        time.sleep(0.05)
    # Replaying the revoked key stays refused.
    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}])
    assert cli(gateway, "keys", "revoke", "ffffffffffffffff").returncode == 2
    # Both CLI actions are in the audit log, without the subject in clear.
    from compliance.keyring import KeyRing
    from compliance.reader import AuditReader
    from gateway.store import make_engine

    engine = make_engine(gateway.config["database_url"])
    try:
        reader = AuditReader(engine, KeyRing(engine, base64.b64decode(MASTER_KEY)))
        created_entries = [
            e for e in reader.entries(kinds=["key.created"]) if created["id"] in (e.detail or "")
        ]
        revoked_entries = [
            e for e in reader.entries(kinds=["key.revoked"]) if created["id"] in (e.detail or "")
        ]
    finally:
        engine.dispose()
    assert len(created_entries) == 1 and len(revoked_entries) == 1
    assert "alice" not in (created_entries[0].detail or "")
    verified = cli(gateway, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_expired_key_is_401(secure: Any) -> None:
    gateway, _, _ = secure
    created = make_key(gateway, "--role", "app", "--expires", "2s")
    wait_for_key(gateway, created["key"])
    time.sleep(2.1)
    response = gateway.http.get("/v1/models", headers=bearer(created["key"]))
    assert_openai_error(response, 401, "invalid_request_error", "invalid_api_key")
    assert "expired" in response.json()["error"]["message"]


def test_admin_api_creates_lists_and_revokes(secure: Any) -> None:
    gateway, _, keys = secure
    admin = bearer(keys["admin"])
    r = gateway.http.post("/admin/keys", json={"roles": ["app"], "models": ["m1"]}, headers=admin)
    assert r.status_code == 201, r.text
    new = r.json()
    assert gateway.http.get("/v1/models", headers=bearer(new["key"])).status_code == 200
    listed = gateway.http.get("/admin/keys", headers=admin).json()["data"]
    assert new["id"] in {k["id"] for k in listed} and all("key" not in k for k in listed)
    assert gateway.http.delete(f"/admin/keys/{new['id']}", headers=admin).status_code == 200
    assert gateway.http.get("/v1/models", headers=bearer(new["key"])).status_code == 401
    bad = gateway.http.post("/admin/keys", json={"roles": ["root"]}, headers=admin)
    assert_openai_error(bad, 400, "invalid_request_error", "invalid_request")
    bad = gateway.http.post(
        "/admin/keys", json={"roles": ["app"], "expires_in": "soon"}, headers=admin
    )
    assert_openai_error(bad, 400, "invalid_request_error", "invalid_request")
    bad = gateway.http.post("/admin/keys", content=b"{nope", headers=admin)
    assert_openai_error(bad, 400, "invalid_request_error", "invalid_json")


def test_role_allow_list_and_models_listing(secure: Any) -> None:
    gateway, _, keys = secure
    scientist = bearer(keys["data_scientist"])
    assert [m["id"] for m in gateway.http.get("/v1/models", headers=scientist).json()["data"]] == [
        "m2"
    ]
    denied = gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=scientist)
    assert_openai_error(denied, 403, "permission_error", "model_not_allowed")
    allowed = gateway.http.post("/v1/chat/completions", json=chat_body("m2"), headers=scientist)
    assert allowed.status_code == 200
    app_models = gateway.http.get("/v1/models", headers=bearer(keys["app"])).json()["data"]
    assert [m["id"] for m in app_models] == ["m1", "m2"]
    auditor = gateway.http.get("/v1/models", headers=bearer(keys["auditor"])).json()["data"]
    assert auditor == []  # auditors call no models


def test_priority_from_the_key_tier(secure: Any) -> None:
    gateway, upstream, _ = secure
    critical = make_key(gateway, "--role", "app", "--tier", "critical")["key"]
    standard = make_key(gateway, "--role", "app")["key"]
    wait_for_key(gateway, critical)
    wait_for_key(gateway, standard)
    gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(critical))
    assert upstream.stats()["last_body"]["priority"] == -10
    gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(standard))
    assert "priority" not in upstream.stats()["last_body"]


@pytest.mark.parametrize(
    ("role", "allowed"),
    [("app", False), ("data_scientist", True), ("model_admin", True), ("admin", True)],
)
def test_only_some_roles_may_turn_the_watermark_off(secure: Any, role: str, allowed: bool) -> None:
    gateway, upstream, keys = secure
    body = chat_body("m2", vllm_xargs={"bastion_watermark": "off", "other": 1})
    r = gateway.http.post("/v1/chat/completions", json=body, headers=bearer(keys[role]))
    if allowed:
        assert r.status_code == 200, r.text
        assert upstream.stats()["last_body"]["vllm_xargs"] == body["vllm_xargs"]
    else:
        assert_openai_error(r, 403, "permission_error", "permission_denied")
        assert "vllm_xargs.bastion_watermark" in r.json()["error"]["message"]
    # Other extension arguments are nobody's privilege; a non-object is a 400.
    ok = chat_body("m2", vllm_xargs={"other": 1})
    assert (
        gateway.http.post("/v1/chat/completions", json=ok, headers=bearer(keys[role])).status_code
        == 200
    )
    bad = chat_body("m2", vllm_xargs=["bastion_watermark"])
    r = gateway.http.post("/v1/chat/completions", json=bad, headers=bearer(keys[role]))
    assert_openai_error(r, 400, "invalid_request_error", "invalid_request")


def test_metrics_in_prometheus_format(secure: Any) -> None:
    gateway, _, keys = secure
    r = gateway.http.get("/metrics", headers=bearer(keys["auditor"]))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "bastion_ratelimit_backend_errors_total" in r.text
    assert keys["auditor"] not in r.text


def test_gateway_key_never_reaches_the_upstream(secure: Any) -> None:
    gateway, upstream, keys = secure
    gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(keys["app"]))
    sent = {k.lower(): v for k, v in upstream.stats()["last_request_headers"].items()}
    assert keys["app"] not in json.dumps(sent)


# --- rate limits ----------------------------------------------------------------------


@pytest.fixture
def limited(pool: ProcessPool, tmp_path: Path) -> Iterator[Any]:
    upstream = pool.upstream("rl-up", ["m1"])
    settings = secure_settings(
        tmp_path / "bastion.db",
        rate_limits={
            "enabled": True,
            "requests_per_second": 2,
            "burst": 3,
            "tokens_per_minute": 3000,
        },
    )
    gateway = pool.gateway([upstream], env={"BASTION_MASTER_KEY": MASTER_KEY}, **settings)
    key = make_key(gateway, "--role", "app")["key"]
    wait_for_key(gateway, key)
    time.sleep(1.6)  # let the bucket refill after wait_for_key's probes
    yield gateway, key, upstream


def test_requests_per_second_limit_answers_429_with_headers(limited: Any) -> None:
    gateway, key, _ = limited
    statuses = []
    for _ in range(6):
        r = gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(key))
        statuses.append(r.status_code)
        if r.status_code == 200:
            assert r.headers["x-ratelimit-limit-requests"] == "3"
            assert int(r.headers["x-ratelimit-remaining-requests"]) >= 0
            assert r.headers["x-ratelimit-limit-tokens"] == "3000"
        else:
            assert_openai_error(r, 429, "rate_limit_error", "rate_limit_exceeded")
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]


def test_tokens_per_minute_estimate_and_correction(limited: Any) -> None:
    gateway, key, upstream = limited
    # A budget above the whole minute's allowance is admitted on a full bucket (it could
    # never pass otherwise) and then corrected from what it really used.
    big = gateway.http.post(
        "/v1/chat/completions", json=chat_body("m1", max_tokens=5000), headers=bearer(key)
    )
    assert big.status_code == 200, big.text
    used = big.json()["usage"]["total_tokens"]
    second = gateway.http.post(
        "/v1/chat/completions", json=chat_body("m1", max_tokens=10), headers=bearer(key)
    )
    assert second.status_code == 200, second.text
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    # Corrected from the first answer's usage: what it really used, not its 5000 budget.
    assert remaining > 3000 - used - 10 - 40, (remaining, used)

    # While a request holds a 2500-token reservation, one asking for 1000 more is refused.
    upstream.set_mode("slow_stream", count=1)
    body = chat_body("m1", max_tokens=2500, stream=True)
    with gateway.http.stream(
        "POST", "/v1/chat/completions", json=body, headers=bearer(key)
    ) as held:
        assert held.status_code == 200
        next(held.iter_lines())
        refused = gateway.http.post(
            "/v1/chat/completions", json=chat_body("m1", max_tokens=1000), headers=bearer(key)
        )
        assert_openai_error(refused, 429, "rate_limit_error", "rate_limit_exceeded")
        assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 1000
        assert int(refused.headers["retry-after"]) >= 1


def test_stream_usage_is_counted_and_hidden_when_not_asked(limited: Any) -> None:
    gateway, key, _ = limited
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=1500
        )
    )
    assert chunks and all(c.usage is None for c in chunks)  # not asked for: not shown
    time.sleep(0.6)
    r = gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(key))
    assert int(r.headers["x-ratelimit-remaining-tokens"]) > 2500  # the 1500 budget came back
    asked = list(
        client.chat.completions.create(
            model="m1",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert asked[-1].usage is not None and asked[-1].usage.total_tokens > 0


def redis_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


def test_two_gateway_processes_share_postgres_keys_and_one_redis_bucket(
    pool: ProcessPool, tmp_path: Path
) -> None:
    if not redis_available():
        if os.environ.get("CI"):
            pytest.fail("Redis is not running on 127.0.0.1:6379")
        pytest.skip("Redis is not running")
    upstream = pool.upstream("shared-up", ["m1"])
    with postgres_database() as database_url:
        settings = secure_settings(
            tmp_path / "unused.db",
            redis_url="redis://127.0.0.1:6379/0",
            rate_limits={
                "enabled": True,
                "requests_per_second": 5,
                "burst": 5,
                "tokens_per_minute": 10**7,
            },
        )
        settings["database_url"] = database_url
        env = {"BASTION_MASTER_KEY": MASTER_KEY}
        first = pool.gateway([upstream], env=env, **settings)
        second = pool.gateway([upstream], env=env, **settings)

        # A key made through one process works on the other; revoked there, it stops here.
        admin = make_key(first, "--role", "admin")["key"]
        wait_for_key(first, admin)
        wait_for_key(second, admin)
        made = first.http.post("/admin/keys", json={"roles": ["app"]}, headers=bearer(admin))
        key = made.json()["key"]
        wait_for_key(second, key)

        time.sleep(1.2)  # refill after the probes
        started = time.monotonic()
        ok = 0
        for i in range(40):
            gateway = first if i % 2 else second
            r = gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(key))
            assert r.status_code in (200, 429), r.text
            ok += r.status_code == 200
        elapsed = time.monotonic() - started
        assert 5 <= ok <= 5 + 5 * elapsed + 1, (ok, elapsed)

        revoked = second.http.delete(f"/admin/keys/{made.json()['id']}", headers=bearer(admin))
        assert revoked.status_code == 200
        deadline = time.monotonic() + 1.0 + 0.3  # key_refresh_s is 0.2 here
        while first.http.get("/v1/models", headers=bearer(key)).status_code != 401:
            assert time.monotonic() < deadline, "revocation did not reach the other process"
            time.sleep(0.02)


def test_redis_down_fails_open_or_closed(pool: ProcessPool, tmp_path: Path) -> None:
    upstream = pool.upstream("nored-up", ["m1"])
    env = {"BASTION_MASTER_KEY": MASTER_KEY}
    dead = "redis://127.0.0.1:1/0"
    for mode, expected in (("open", 200), ("closed", 503)):
        settings = secure_settings(
            tmp_path / f"{mode}.db",
            redis_url=dead,
            rate_limits={"enabled": True, "redis_failure_mode": mode},
        )
        gateway = pool.gateway([upstream], env=env, **settings)
        key = make_key(gateway, "--role", "app")["key"]
        wait_for_key(gateway, key)
        r = gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(key))
        assert r.status_code == expected, r.text
        if expected == 503:
            assert_openai_error(r, 503, "service_unavailable", "rate_limiter_unavailable")
        assert gateway.process is not None and gateway.process.alive()


def test_serve_refuses_to_start_without_a_master_key(tmp_path: Path) -> None:
    config = tmp_path / "bastion.yaml"
    config.write_text(
        "upstreams: [{name: a, url: 'http://127.0.0.1:9', models: [m]}]\n"
        f"database_url: sqlite:///{tmp_path / 'x.db'}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    done = subprocess.run(
        [*bastion_command(), "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("bastion: configuration error: master_key:")
    assert len(done.stderr.strip().splitlines()) == 1


def test_rate_limit_headers_only_on_refusals_when_configured(
    pool: ProcessPool, tmp_path: Path
) -> None:
    upstream = pool.upstream("hdr-up", ["m1"])
    settings = secure_settings(
        tmp_path / "bastion.db",
        rate_limits={
            "enabled": True,
            "requests_per_second": 1,
            "burst": 1,
            "response_headers": "on_refusal",
        },
    )
    gateway = pool.gateway([upstream], env={"BASTION_MASTER_KEY": MASTER_KEY}, **settings)
    key = make_key(gateway, "--role", "app")["key"]
    wait_for_key(gateway, key)
    time.sleep(1.1)  # refill after wait_for_key's probe
    ok = gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(key))
    assert ok.status_code == 200
    assert not [h for h in ok.headers if h.startswith("x-ratelimit")]
    refused = gateway.http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(key))
    assert_openai_error(refused, 429, "rate_limit_error", "rate_limit_exceeded")
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.headers["retry-after"]) >= 1

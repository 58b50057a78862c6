"""The CLI and configuration contract: ``bastion serve``, BASTION_* variables, config errors."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    ProcessPool,
    Upstream,
    assert_openai_error,
    chat_body,
    free_port,
    gateway_config,
    run_bastion,
    upstream_entry,
)


@pytest.fixture(scope="module")
def up(module_pool: ProcessPool) -> Upstream:
    return module_pool.upstream("cli-up", ["dev-model", "dev-model-v2"])


def _valid(up_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    return gateway_config([upstream_entry("a", models=["dev-model"], url=up_url)])


def _with(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``config`` with the dotted ``path`` set to ``value`` (list indexes as numbers)."""
    node: Any = config
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


BAD_CONFIGS = [
    pytest.param("bogus", 1, "bogus", id="unknown-top-level-key"),
    pytest.param("server.bogus", 1, "server.bogus", id="unknown-nested-key"),
    pytest.param("upstreams.0.bogus", 1, "upstreams.0.bogus", id="unknown-upstream-key"),
    pytest.param("upstreams.0.weight", 0, "upstreams.0.weight", id="weight-zero"),
    pytest.param("upstreams.0.models", [], "upstreams.0.models", id="no-models"),
    pytest.param("upstreams.0.url", "ftp://x", "upstreams.0.url", id="not-http-url"),
    pytest.param("upstreams", [], "upstreams", id="no-upstreams"),
    pytest.param("timeouts.read_s", -1, "timeouts.read_s", id="negative-timeout"),
    pytest.param(
        "canaries",
        [{"model": "dev-model", "version": "dev-model", "share": 1.5}],
        "canaries.0.share",
        id="canary-share-out-of-range",
    ),
    pytest.param(
        "canaries",
        [{"model": "dev-model", "version": "not-served", "share": 0.1}],
        "canaries.0.version",
        id="canary-version-not-served",
    ),
]


@pytest.mark.parametrize(("path", "value", "field"), BAD_CONFIGS)
def test_bad_configuration_is_one_line_and_exit_2(
    tmp_path: Path, path: str, value: Any, field: str
) -> None:
    config = _with(_valid(), path, value)
    port = free_port()
    result = run_bastion(["serve", "--port", str(port)], config, tmp_path, timeout=20)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(rf"bastion: configuration error: {re.escape(field)}: \S.*", lines[0]), (
        lines[0]
    )


def test_duplicate_upstream_names_are_a_config_error(tmp_path: Path) -> None:
    config = _valid()
    config["upstreams"].append(dict(config["upstreams"][0]))
    result = run_bastion(["serve"], config, tmp_path, timeout=20)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bastion: configuration error: upstreams")


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_bastion(
        ["serve", "--config", str(tmp_path / "absent.yaml")], None, tmp_path, timeout=20
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bastion: configuration error: "), lines


def test_config_from_env_var_and_port_flag(pool: ProcessPool, up: Upstream) -> None:
    gw = pool.gateway([up], config_via_env=True, port_via="cli")
    r = gw.http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200 and r.headers["x-bastion-upstream"] == "cli-up"
    # --port wins over the port written in the YAML, which stays closed.
    assert not _listening(gw.yaml_port)


def test_env_overrides_yaml(pool: ProcessPool, up: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env_upstreams = [{"name": "from-env", "url": up.url, "models": ["dev-model"]}]
    gw = pool.gateway(
        [upstream_entry("from-yaml", models=["dev-model"], url=dead)],
        port_via="env",
        env={
            "BASTION_SERVER__MAX_BODY_BYTES": "2048",
            "BASTION_UPSTREAMS": json.dumps(env_upstreams),
        },
    )
    assert not _listening(gw.yaml_port), "BASTION_SERVER__PORT must win over the YAML port"
    r = gw.http.post("/v1/chat/completions", json=chat_body(content="x" * 4096))
    assert_openai_error(r, 413, "invalid_request_error", "request_too_large")
    r = gw.http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200 and r.headers["x-bastion-upstream"] == "from-env"
    assert set(gw.admin_upstreams()) == {"from-env"}


def test_port_from_yaml_and_admin_upstreams_shape(pool: ProcessPool, up: Upstream) -> None:
    gw = pool.gateway(
        [upstream_entry(up, weight=2.5)],
        port_via="yaml",
        canaries=[{"model": "dev-model", "version": "dev-model-v2", "share": 0.5}],
    )
    assert gw.http.get("/healthz").json() == {"status": "ok"}
    (entry,) = gw.http.get("/admin/upstreams").json()["upstreams"]
    assert entry["name"] == "cli-up"
    assert entry["url"].rstrip("/") == up.url
    assert entry["models"] == ["dev-model", "dev-model-v2"]
    assert entry["weight"] == 2.5
    assert entry["healthy"] is True
    assert entry["breaker"] == "closed"
    assert entry["consecutive_failures"] == 0
    models = gw.http.get("/v1/models").json()
    assert models["object"] == "list"
    assert {m["id"] for m in models["data"]} == {"dev-model", "dev-model-v2"}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0

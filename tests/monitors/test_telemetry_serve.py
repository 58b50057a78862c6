"""End to end: ``bastion serve --workers 2`` behind real sockets, one scrape shows every
request exactly once, promtool accepts the exposition, the logs are ECS JSON lines with the
request id, and no prompt or key reaches the metrics or the logs."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    START_TIMEOUT_S,
    Gateway,
    ProcessPool,
    bastion_command,
    chat_body,
    free_port,
    gateway_config,
    upstream_entry,
    wait_until,
)

MASTER_KEY = base64.b64encode(b"t" * 32).decode()
CHAT = "/v1/chat/completions"
N = 24
PROMPT_CANARY = "prompt-canary-8c41f7"
KEY_CANARY = "bst_canary0key0d5e93a1"


def cli(config: Path, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_MASTER_KEY"] = MASTER_KEY
    done = subprocess.run(
        [*bastion_command(), *args, "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class Served:
    def __init__(self, gateway: Gateway, app_key: str, reader_key: str) -> None:
        self.gateway = gateway
        self.app_key = app_key
        self.reader_key = reader_key
        self.request_ids: list[str] = []

    def call(self, key: str, **body: Any) -> httpx.Response:
        # A new connection each time, so that both workers take requests.
        return httpx.post(
            f"{self.gateway.url}{CHAT}",
            json=chat_body("dev-model", PROMPT_CANARY, **body),
            headers={"authorization": f"Bearer {key}", "connection": "close"},
            timeout=30,
        )

    def scrape(self) -> httpx.Response:
        r = httpx.get(
            f"{self.gateway.url}/metrics",
            headers={"authorization": f"Bearer {self.reader_key}", "connection": "close"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return r


@pytest.fixture(scope="module")
def served(module_pool: ProcessPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from compliance.signing import load_or_create_signing_key

    work = tmp_path_factory.mktemp("telemetry")
    upstream = module_pool.upstream("tel-up", ["dev-model"])
    signing = work / "signing.key"
    load_or_create_signing_key(signing)
    config = gateway_config(
        [upstream_entry(upstream)],
        dev=False,
        signing_key_file=str(signing),
        database_url=f"sqlite:///{work / 'bastion.db'}",
        auth={"enabled": True, "key_refresh_s": 0.2},
        rate_limits={"enabled": False},  # in-memory limits refuse several workers
        server={"workers": 2},
    )
    gateway = Gateway(config, work, env={"BASTION_MASTER_KEY": MASTER_KEY})
    module_pool.gateways.append(gateway)
    gateway.start()  # it makes the store the keys go to
    wait_until(
        lambda: gateway.http.get("/readyz").status_code == 200,
        START_TIMEOUT_S,
        what=f"gateway /readyz 200 (output: {gateway.output()[-500:]})",
    )
    app_key = cli(gateway.config_path, "keys", "create", "--json", "--role", "app")["key"]
    reader_key = cli(gateway.config_path, "keys", "create", "--json", "--role", "auditor")["key"]
    served = Served(gateway, app_key, reader_key)

    def both_workers_know_the_keys() -> bool:  # each refreshes its key cache every 0.2 s
        return all(
            httpx.get(
                f"{gateway.url}/v1/models",
                headers={"authorization": f"Bearer {key}", "connection": "close"},
            ).status_code
            == 200
            for _ in range(6)
            for key in (app_key, reader_key)
        )

    wait_until(both_workers_know_the_keys, 10, interval=0.3, what="the keys in both workers")
    yield served


def requests_total(text: str, status_class: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "bastion_requests_total"
                and s.labels.get("route") == CHAT
                and s.labels.get("status_class") == status_class
            ):
                return s.value
    return 0.0


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_two_workers_n_requests_one_scrape_shows_exactly_n(served: Served) -> None:
    time.sleep(0.3)  # what the key checks left pending is written
    unknown_before = sample(served.scrape().text, "bastion_auth_failures_total", reason="malformed")
    for i in range(N):
        r = served.call(served.app_key, stream=bool(i % 3 == 0))
        assert r.status_code == 200, r.text
        served.request_ids.append(r.headers["x-request-id"])
    for _ in range(3):
        r = served.call(KEY_CANARY)
        assert r.status_code == 401
        served.request_ids.append(r.headers["x-request-id"])

    # Events reach the metrics just after the answer (and each worker writes its sums
    # within a tenth of a second): wait for them, then every scrape must agree.
    seen: list[float] = []

    def reached() -> bool:
        seen.append(requests_total(served.scrape().text, "2xx"))
        return seen[-1] >= N

    try:
        wait_until(reached, 10, interval=0.2, what="the requests in the metrics")
    except AssertionError:
        pytest.fail(f"bastion_requests_total{{route={CHAT!r}}} 2xx never reached {N}: {seen[-8:]}")
    time.sleep(0.3)
    for _ in range(8):  # new connections: both workers answer some of these
        text = served.scrape().text
        assert requests_total(text, "2xx") == N
        assert requests_total(text, "4xx") == 3
        unknown = sample(text, "bastion_auth_failures_total", reason="malformed")
        assert unknown == (unknown_before or 0) + 3
        assert sample(text, "bastion_tokens_total", model="dev-model", type="output")
        assert sample(text, "bastion_requests_in_flight", route=CHAT) in (None, 0.0)
        count = sample(text, "bastion_request_duration_seconds_count", route=CHAT,
                       model="dev-model")  # fmt: skip
        assert count == N
        build = [s for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "bastion_build_info"]  # fmt: skip
        assert len(build) == 1  # one series, whichever worker answers


def test_promtool_accepts_the_live_exposition_and_it_holds_no_secret(served: Served) -> None:
    if not served.request_ids:
        served.call(served.app_key)
        served.call(KEY_CANARY)
    body = served.scrape().content
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    for secret in (PROMPT_CANARY, KEY_CANARY, served.app_key, served.reader_key):
        assert secret.encode() not in body


def test_logs_are_ecs_json_with_request_ids_and_no_prompt_or_key(served: Served) -> None:
    if not served.request_ids:
        r = served.call(served.app_key)
        served.request_ids.append(r.headers["x-request-id"])
    time.sleep(0.5)  # the access log's writer thread drains every 50 ms
    assert served.gateway.process is not None
    text = served.gateway.process.log_path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    documents = []
    for line in lines:
        try:
            documents.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line[:200]}")
    assert all("@timestamp" in d and "log.level" in d for d in documents)
    access = [d for d in documents if d.get("log", {}).get("logger") == "bastion.access"]
    logged_ids = {d["http"]["request"]["id"] for d in access}
    assert set(served.request_ids) <= logged_ids
    chat = [d for d in access if d["url"]["path"] == CHAT]
    assert all(d["event"]["duration"] > 0 for d in chat)
    for secret in (PROMPT_CANARY, KEY_CANARY, served.app_key, served.reader_key):
        assert secret not in text


def test_the_internal_listener_serves_every_workers_sum_without_a_key(
    pool: ProcessPool,
) -> None:
    upstream = pool.upstream("tel-listen", ["dev-model"])
    listen_port = free_port()
    gateway = pool.gateway(
        [upstream], server={"workers": 2, "metrics_listen": f"127.0.0.1:{listen_port}"}
    )
    for _ in range(5):
        r = httpx.post(
            f"{gateway.url}{CHAT}",
            json=chat_body("dev-model", "hello"),
            headers={"connection": "close"},
            timeout=30,
        )
        assert r.status_code == 200, r.text

    def scrape() -> str:
        r = httpx.get(f"http://127.0.0.1:{listen_port}/metrics", timeout=10)  # no key
        assert r.status_code == 200
        return r.text

    wait_until(lambda: requests_total(scrape(), "2xx") == 5, 10, what="5 requests on the listener")
    for _ in range(3):
        assert requests_total(scrape(), "2xx") == 5

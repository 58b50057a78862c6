"""The vLLM-specific queries against a real vLLM (the CPU build serving the dev model),
scraped by a real Prometheus next to the gateway in front of it.

The tier is slow to start (about a minute), so this is the one module that starts it;
where ``.venv-inference`` is missing it is skipped (a failure under CI, which installs
it). Every panel query and recording rule that reads ``vllm:`` series must return a
number; every vLLM alert's inputs must exist under the names the pinned vLLM exposes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inference.dev_model import build_dev_model
from tests.dashboards.prometheus_server import PrometheusServer, has_data, label_values
from tests.dashboards.queries import shipped_queries, variable_queries, write_key_file
from tests.gateway.test_access import MASTER_KEY, make_key, secure_settings, wait_for_key
from tests.support import Gateway, ProcessPool, chat_body, wait_until
from tests.vllm_tier import WATERMARK_KEYS, InferenceTier, start_tier

pytestmark = pytest.mark.timeout(420)

MODEL = "dev-model"
# A shared prefix longer than a KV block (16 tokens), so later calls hit the prefix cache.
PREFIX = "The tide tables for the northern coast list two high waters each day. " * 6


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InferenceTier, Path]]:
    model_dir = tmp_path_factory.mktemp("dev-model") / "dev-model"
    build_dev_model(model_dir)
    tier = start_tier(tmp_path_factory.mktemp("tier"), model_dir)
    yield tier, model_dir
    tier.stop()


@pytest.fixture(scope="module")
def scraped(
    module_pool: ProcessPool,
    tier: tuple[InferenceTier, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusServer]:
    inference, model_dir = tier
    work = tmp_path_factory.mktemp("vllm-queries")
    gateway: Gateway = module_pool.gateway(
        [{"name": "vllm", "url": inference.url, "models": [MODEL]}],
        env={"BASTION_MASTER_KEY": MASTER_KEY, "BASTION_WATERMARK_KEYS": WATERMARK_KEYS},
        watermark={"enabled": True, "tokenizers": {MODEL: str(model_dir)}},
        timeouts={"connect_s": 2.0, "read_s": 120.0},
        **secure_settings(work / "bastion.db", auth={"enabled": True, "key_refresh_s": 0.2}),
    )
    app = make_key(gateway, "--role", "app")["key"]
    reader = make_key(gateway, "--role", "model_admin")["key"]
    for key in (app, reader):
        wait_for_key(gateway, key)
    bearer = {"type": "Bearer", "credentials_file": str(write_key_file(work, reader))}
    scrape = [
        {"job_name": "vllm", "static_configs": [{"targets": [inference.url[len("http://") :]]}]},
        {
            "job_name": "bastion-gateway",
            "authorization": bearer,
            "static_configs": [{"targets": [gateway.url[len("http://") :]]}],
        },
    ]
    prometheus = PrometheusServer(work / "prometheus", scrape).start()
    try:
        for job in ("vllm", "bastion-gateway"):
            wait_until(lambda j=job: prometheus.targets_up(j), 30, what=f"{job} scraped")
        headers = {"authorization": f"Bearer {app}"}
        for i in range(6):
            body = chat_body(MODEL, f"{PREFIX} Question {i}.", max_tokens=12, stream=i % 2 == 0)
            r = httpx.post(
                f"{gateway.base_url}/chat/completions", json=body, headers=headers, timeout=120
            )
            assert r.status_code == 200, r.text
        wait_until(
            lambda: has_data(prometheus.query("sum(vllm:request_success_total) >= 6")),
            30,
            what="vLLM's finished requests scraped",
        )
        wait_until(
            lambda: has_data(prometheus.query("model_name:vllm_prefix_cache_hit:ratio_rate5m")),
            30,
            what="the prefix-cache recording rule evaluated",
        )
        yield prometheus
    finally:
        prometheus.stop()


VLLM_QUERIES = [q for q in shipped_queries() if q.needs_vllm and not q.needs_gpu_host]


def test_vllm_queries_parse_and_return_data(scraped: PrometheusServer) -> None:
    counted = [q for q in VLLM_QUERIES if q.kind in ("panel", "record")]
    parsed = [q for q in counted if scraped.query(q.promql()).get("status") == "success"]
    empty = [q.where for q in counted if not has_data(scraped.query(q.promql()))]
    print(
        f"\nvLLM queries: parsed {len(parsed)}/{len(counted)}, "
        f"returned data {len(counted) - len(empty)}/{len(counted)}"
    )
    assert len(parsed) == len(counted)
    assert empty == [], "no data for:\n" + "\n".join(empty)


def test_vllm_alerts_read_series_the_pinned_vllm_exposes(scraped: PrometheusServer) -> None:
    alerts = [q for q in VLLM_QUERIES if q.kind == "alert"]
    assert alerts
    for query in alerts:
        assert scraped.query(query.promql())["status"] == "success", query.where
        for name in set(re.findall(r"vllm:[a-z0-9_]+|model_name:vllm_[a-z_:0-9]+", query.expr)):
            assert has_data(scraped.query(f"group({name})")), f"{query.where}: no {name}"


def test_vllm_variables_list_the_served_model(scraped: PrometheusServer) -> None:
    variables = [v for v in variable_queries() if v.needs_vllm]
    assert variables
    for variable in variables:
        values = label_values(scraped, variable.label, variable.metric)
        assert values, variable.where
        if variable.label == "model_name":
            assert values == [MODEL]

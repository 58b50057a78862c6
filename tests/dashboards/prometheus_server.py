"""A real Prometheus (Debian's ``prometheus`` package) on loopback, for the live query tests.

It loads the stack's rule files from dashboards/prometheus/rules/, scrapes every second
and evaluates rules every second, and keeps its data in a temporary directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.dashboards.tools import tool
from tests.support import REPO_ROOT, ManagedProcess, free_port, wait_until

RULES_GLOB = str(REPO_ROOT / "dashboards" / "prometheus" / "rules" / "*.yml")


class PrometheusServer:
    """``prometheus`` with ``scrape_configs`` given as dicts (as in prometheus.yml)."""

    def __init__(self, work_dir: Path, scrape_configs: list[dict[str, Any]]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                "scrape_timeout": "1s",
            },
            "rule_files": [RULES_GLOB],
            "scrape_configs": scrape_configs,
        }
        self.config_path = work_dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process = ManagedProcess(
            [
                str(tool("prometheus")),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            work_dir / "prometheus.log",
            cwd=work_dir,
        )

    def start(self) -> PrometheusServer:
        self.process.spawn()

        def ready() -> bool:
            if not self.process.alive():
                raise RuntimeError(f"prometheus exited:\n{self.process.output()}")
            try:
                return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, what="prometheus /-/ready", interval=0.2)
        return self

    def stop(self) -> None:
        self.process.stop(timeout=10)

    def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query`` at now: Prometheus's whole JSON answer (status, data, error)."""
        r = httpx.post(f"{self.url}/api/v1/query", data={"query": expr}, timeout=30)
        answer: dict[str, Any] = r.json()
        return answer

    def targets_up(self, job: str) -> bool:
        answer = self.query(f'up{{job="{job}"}} == 1')
        return bool(answer.get("data", {}).get("result"))

    def rule_health(self) -> list[dict[str, Any]]:
        """Every rule as Prometheus evaluates it (name, health, lastError)."""
        r = httpx.get(f"{self.url}/api/v1/rules", timeout=30)
        groups = r.json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]


def has_data(answer: dict[str, Any]) -> bool:
    """A successful answer holding at least one sample that is a number (not NaN: a
    quantile of no observations, a ratio of zero rates)."""
    if answer.get("status") != "success":
        return False
    data = answer["data"]
    if data["resultType"] == "scalar":
        return not math.isnan(float(data["result"][1]))
    return any(not math.isnan(float(item["value"][1])) for item in data["result"])


def label_values(server: PrometheusServer, label: str, match: str) -> list[str]:
    """What Grafana's ``label_values(match, label)`` asks Prometheus (its label values API)."""
    r = httpx.get(
        f"{server.url}/api/v1/label/{label}/values", params={"match[]": match}, timeout=30
    )
    answer = r.json()
    assert answer["status"] == "success", answer
    values: list[str] = answer["data"]
    return values

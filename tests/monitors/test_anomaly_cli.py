"""``bastion monitor --once`` and ``bastion anomalies list`` (the apps the gateway mounts),
and the default loader's settings, database and key."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from compliance.job_lease import JobLease
from monitors.anomaly import store
from monitors.anomaly.cli import MonitorContext, default_loader, make_apps, model_mac_key
from monitors.anomaly.features import event_row
from monitors.anomaly.scorer import LEASE_NAME
from monitors.anomaly.settings import AnomalySettings
from tests.monitors.anomaly_db import anomaly_engine  # noqa: F401
from tests.monitors.anomaly_traffic import traffic


def test_monitor_once_and_list(anomaly_engine: Engine) -> None:  # noqa: F811
    settings = AnomalySettings(window_s=10, grace_s=0)
    seen: list[dict] = []
    entered: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        entered.append("start")
        yield
        entered.append("stop")

    def loader(config: Path | None, url: str | None) -> MonitorContext:
        return MonitorContext(
            anomaly_engine, settings, b"k" * 32, on_flag=[seen.append], lifespan=lifespan
        )

    monitor_app, anomalies_app = make_apps(loader)
    import time

    now = time.time_ns() // 1000
    rows = [
        r for e in traffic(np.random.default_rng(0), now - 60_000_000, 40) if (r := event_row(e))
    ]
    store.insert_events(anomaly_engine, rows)
    runner = CliRunner()
    # Another process holds the lease: this one waits, scores nothing, exits.
    other = JobLease(anomaly_engine, LEASE_NAME, "other", ttl_s=60)
    assert other.acquire()
    result = runner.invoke(monitor_app, ["--once"])
    assert result.exit_code == 0, result.output
    assert store.history(anomaly_engine).windows == 0
    other.release()
    result = runner.invoke(monitor_app, ["--once"])
    assert result.exit_code == 0, result.output
    assert store.history(anomaly_engine).windows > 0  # cold start: recorded, not flagged
    assert not seen
    assert entered == ["start", "stop"] * 2
    store.insert_anomalies(
        anomaly_engine,
        [
            {
                "time_us": now,
                "window_start_us": now - 10_000_000,
                "key_id": "key-a",
                "model": "m1",
                "family": "size",
                "score": 9.0,
                "threshold": 5.0,
                "model_version": None,
                "requests": 1,
                "request_ids": ["req-1"],
                "explanation": {"features": [{"text": "prompt_tokens 3,900 (usual 250): +4.10"}]},
            }
        ],
    )
    listed = runner.invoke(anomalies_app, ["list", "--family", "size"])
    assert listed.exit_code == 0, listed.output
    assert "cold_start" in listed.output and "prompt_tokens 3,900 (usual 250)" in listed.output
    as_json = runner.invoke(anomalies_app, ["list", "--json", "--key", "key-a"])
    assert json.loads(as_json.output.splitlines()[0])["request_ids"] == ["req-1"]
    assert runner.invoke(anomalies_app, ["list", "--family", "x"]).exit_code == 2


def test_default_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "bastion.yaml"
    config.write_text(
        f"database_url: sqlite:///{tmp_path / 'b.db'}\nanomaly:\n  budget_per_million: 3\n"
    )
    master = bytes(range(32))
    monkeypatch.setenv("BASTION_MASTER_KEY", base64.b64encode(master).decode())
    context = default_loader(config, None)
    assert context.settings.budget_per_million == 3
    assert context.mac_key == model_mac_key(master)
    assert str(context.engine.url).endswith("b.db")
    context.engine.dispose()
    config.write_text("anomaly:\n  window_s: -1\n")
    monitor_app, _ = make_apps()
    result = CliRunner().invoke(monitor_app, ["--config", str(config), "--once"])
    assert result.exit_code == 2 and "anomaly" in result.output

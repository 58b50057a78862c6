"""The committed dashboards and rule files are what the code under monitors/dashboards
builds, and the dashboards keep the conventions an SRE relies on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from monitors.dashboards.build import GRAFANA_DIR, RULES_DIR, render
from monitors.dashboards.slo import SloSettings, load_slo_settings
from tests.support import REPO_ROOT

DASHBOARDS_DIR = REPO_ROOT / "dashboards"
EXPECTED_UIDS = {"bastion-gateway", "bastion-inference", "bastion-security", "bastion-gpu"}


def committed_dashboards() -> dict[str, dict[str, Any]]:
    return {
        path.stem: json.loads(path.read_text())
        for path in sorted((DASHBOARDS_DIR / GRAFANA_DIR).glob("*.json"))
    }


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def test_build_command_regenerates_the_committed_files_exactly(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "monitors.dashboards", "build", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    built = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(DASHBOARDS_DIR).as_posix()
        for pattern in (f"{GRAFANA_DIR}/*.json", f"{RULES_DIR}/*.yml")
        for p in DASHBOARDS_DIR.glob(pattern)
    }
    assert built == committed, "stale or missing files: run python -m monitors.dashboards build"
    for relative in sorted(built):
        fresh = (tmp_path / relative).read_text()
        assert fresh == (DASHBOARDS_DIR / relative).read_text(), (
            f"dashboards/{relative} differs from what the code builds: "
            "run python -m monitors.dashboards build"
        )


def test_four_dashboards_with_fixed_uids_and_variables() -> None:
    boards = committed_dashboards()
    assert set(boards) == EXPECTED_UIDS
    for uid, board in boards.items():
        assert board["uid"] == uid
        names = {v["name"] for v in board["templating"]["list"]}
        assert {"datasource", "model", "instance"} <= names, uid
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)) and all(ids), f"{uid}: panel ids must be fixed and unique"


@pytest.mark.parametrize("uid", sorted(EXPECTED_UIDS))
def test_every_panel_has_a_unit_a_description_and_queries(uid: str) -> None:
    board = committed_dashboards()[uid]
    for panel in panels(board):
        title = panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{uid}/{title}: no unit"
        assert panel.get("description"), f"{uid}/{title}: no description"
        assert panel["targets"], f"{uid}/{title}: no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["refId"] and target["expr"].strip()


def all_exprs() -> list[tuple[str, str]]:
    return [
        (f"{uid}/{panel['title']}", target["expr"])
        for uid, board in committed_dashboards().items()
        for panel in panels(board)
        for target in panel["targets"]
    ]


def test_rates_use_the_rate_interval_and_percentiles_use_buckets() -> None:
    for where, expr in all_exprs():
        for window in re.findall(r"\b(?:rate|increase|irate)\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{where}: rate over {window}"
        for inner in re.findall(r"histogram_quantile\([^,]+,(.*)", expr):
            assert "_bucket" in inner, f"{where}: quantile without buckets"
        # An average since the process started hides every incident.
        assert not re.search(r"_sum\b|_count\b", expr), f"{where}: _sum/_count in {expr}"


def test_slo_panels_read_the_recorded_ratios_and_the_budget() -> None:
    slo = SloSettings()
    gateway = committed_dashboards()["bastion-gateway"]
    exprs = " ".join(t["expr"] for p in panels(gateway) for t in p["targets"])
    assert "bastion:slo_availability:error_ratio_30d" in exprs
    assert f"/ {slo.availability_budget:g}" in exprs  # error budget left
    assert f"/ {slo.ttft_budget:g}" in exprs


def test_settings_validate_and_change_the_rules(tmp_path: Path) -> None:
    path = tmp_path / "slo.yaml"
    path.write_text("availability_objective: 0.995\np99_ttft_bound_s: 0.8\n")
    settings = load_slo_settings(path)
    files = render(settings)
    assert "> 0.8" in files[f"{RULES_DIR}/gateway-alerts.yml"]
    assert "> 0.072" in files[f"{RULES_DIR}/slo-alerts.yml"]  # 14.4 x 0.5 %
    path.write_text("ttft_threshold_s: 0.3\n")
    with pytest.raises(ValidationError, match="buckets"):
        load_slo_settings(path)
    path.write_text("availabilty_objective: 0.99\n")
    with pytest.raises(ValidationError, match="availabilty_objective"):
        load_slo_settings(path)


def test_docs_name_every_panel_and_alert() -> None:
    """docs/dashboards.md says what each dashboard answers: it lists every panel and alert."""
    import yaml

    doc = (REPO_ROOT / "docs" / "dashboards.md").read_text()
    flat = " ".join(doc.split())
    for uid, board in committed_dashboards().items():
        assert f"`{uid}`" in doc
        for panel in board["panels"]:
            title = re.sub(r" \(objective [^)]*\)", "", panel["title"])
            assert title in flat, f"docs/dashboards.md does not mention {uid}/{title}"
    for path in sorted((DASHBOARDS_DIR / RULES_DIR).glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule["record"]
                if "alert" in rule:
                    assert f"| {name} |" in doc, f"docs/dashboards.md: no row for {name}"


def shipped_exprs() -> str:
    from tests.dashboards.queries import shipped_queries

    return "\n".join(q.expr for q in shipped_queries())


def test_every_bastion_metric_queried_is_defined() -> None:
    """The dashboards and rules read only metrics monitors/metrics.py defines."""
    from prometheus_client import REGISTRY

    import monitors.metrics  # noqa: F401  (registers the metrics)

    defined = set(REGISTRY._names_to_collectors)
    used = set(re.findall(r"\bbastion_[a-z_]+", shipped_exprs()))
    assert used, "no Bastion metric in the shipped queries"
    assert used - defined == set()


def test_every_vllm_metric_queried_exists_in_the_pinned_vllm() -> None:
    """Each vllm: name is one that the pinned vLLM's metrics logger defines (counters
    exposed with _total, histograms with _bucket)."""
    from tests.vllm_tier import INFERENCE_VENV, inference_python

    inference_python()  # skips (fails under CI) without vLLM's environment
    loggers = next(INFERENCE_VENV.glob("lib/python*/site-packages/vllm/v1/metrics/loggers.py"))
    source = loggers.read_text()
    names = set(re.findall(r'name="(vllm:[a-z0-9_]+)"', source))
    used = set(re.findall(r"\bvllm:[a-z0-9_]+", shipped_exprs()))
    assert used
    for name in used:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert name in names or base in names, f"{name}: not in {loggers}"

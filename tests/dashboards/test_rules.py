"""The stack's Prometheus configuration, its rules and their unit tests, and
Alertmanager's configuration, checked by the tools that ship with them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from monitors.dashboards.alerts import SCRAPE_JOBS
from tests.dashboards.tools import tool
from tests.support import REPO_ROOT

PROMETHEUS_DIR = REPO_ROOT / "dashboards" / "prometheus"
RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))
ALERTMANAGER = REPO_ROOT / "dashboards" / "alertmanager" / "alertmanager.yml"


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False
    )


def prometheus_config_for_this_machine(tmp_path: Path) -> Path:
    """The stack's prometheus.yml with its container paths mapped onto tmp_path and the
    repository, so ``promtool check config`` also loads the rule files and secret files."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    for name in ("prometheus_gateway_key", "gateway_ca"):
        assert f"/run/secrets/{name}" in text
        (secrets / name).write_text("placeholder\n")
    text = text.replace("/run/secrets/", f"{secrets}/")
    text = text.replace("/etc/prometheus/rules/", f"{PROMETHEUS_DIR / 'rules'}/")
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    return path


def test_promtool_check_config(tmp_path: Path) -> None:
    done = run(tool("promtool"), "check", "config", prometheus_config_for_this_machine(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    # Every rule file was loaded, not just the configuration parsed.
    for rule_file in RULES:
        assert rule_file.name in done.stdout


def test_promtool_check_rules() -> None:
    done = run(tool("promtool"), "check", "rules", *RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULES)


def test_promtool_test_rules() -> None:
    done = run(tool("promtool"), "test", "rules", *RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_amtool_check_config() -> None:
    done = run(tool("amtool"), "check-config", ALERTMANAGER)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(ALERTMANAGER.read_text())
    routed = {m for r in config["route"]["routes"] for m in r["matchers"]}
    assert routed == {'severity="page"', 'severity="ticket"'}


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def test_every_alert_has_a_firing_unit_test_and_a_known_severity() -> None:
    fired: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) - fired == set(), "alerts without a unit test that makes them fire"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_scrape_job_has_an_absent_rule() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]} - {"prometheus"}
    assert jobs == set(SCRAPE_JOBS)
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    for job in jobs:
        assert f'absent(up{{job="{job}"}} == 1)' in exprs


def test_burn_rate_alerts_follow_the_sre_workbook() -> None:
    burn = {r["alert"]: r for r in alert_rules() if "slo" in r["labels"]}
    assert len(burn) == 6
    windows = {
        (r["labels"]["slo"], r["labels"]["window"], r["labels"]["severity"]) for r in burn.values()
    }
    for slo in ("availability", "ttft"):
        assert {(slo, "1h", "page"), (slo, "6h", "page"), (slo, "3d", "ticket")} <= windows
    fast = burn["BastionAvailabilityBudgetBurnFast"]["expr"]
    assert "rate1h > 0.0144" in fast and "rate5m > 0.0144" in fast

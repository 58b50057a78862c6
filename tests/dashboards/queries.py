"""Every PromQL expression Bastion ships: each dashboard panel's queries and each
recording and alert rule, read from the committed files, with Grafana's variables
replaced the way Grafana would (all models, all instances)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support import REPO_ROOT

DASHBOARDS = REPO_ROOT / "dashboards"
# What Grafana sends for "All" (the variables' allValue) and for $__rate_interval; the
# window covers the whole test, so a rate sees every request it sent.
SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$model": ".*",
    "$instance": ".*",
    "$host": ".*",
}


@dataclass(frozen=True)
class ShippedQuery:
    where: str
    """``dashboard-uid/panel title [refId]`` or ``rules-file/rule name``."""
    expr: str
    kind: str
    """``panel``, ``annotation``, ``record`` or ``alert``."""

    @property
    def needs_gpu_host(self) -> bool:
        """DCGM or node exporter series (the GPU and hosts dashboard, its rules)."""
        return self.where.startswith("bastion-gpu/") or bool(re.search(r"DCGM_|node_", self.expr))

    @property
    def needs_vllm(self) -> bool:
        return "vllm" in self.expr

    def promql(self) -> str:
        text = self.expr
        for variable, value in SUBSTITUTIONS.items():
            text = text.replace(variable, value)
        assert "$" not in text, f"{self.where}: unsubstituted variable in {text}"
        return text

    def inputs(self) -> list[str]:
        """The Bastion series an alert reads (metric and recording-rule names)."""
        return sorted(set(re.findall(r"\bbastion(?:_[a-z_]+|:[a-z0-9_:]+)", self.expr)))


def shipped_queries() -> list[ShippedQuery]:
    found: list[ShippedQuery] = []
    for path in sorted((DASHBOARDS / "grafana").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                where = f"{board['uid']}/{panel['title']} [{target['refId']}]"
                found.append(ShippedQuery(where, target["expr"], "panel"))
        for annotation in board["annotations"]["list"]:
            if annotation.get("expr"):
                where = f"{board['uid']}/annotation {annotation['name']}"
                found.append(ShippedQuery(where, annotation["expr"], "annotation"))
    for path in sorted((DASHBOARDS / "prometheus" / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                kind = "alert" if "alert" in rule else "record"
                name = rule.get("alert") or rule["record"]
                found.append(ShippedQuery(f"{path.name}/{name}", rule["expr"], kind))
    return found


def write_key_file(directory: Path, key: str) -> Path:
    """The bearer credentials file Prometheus reads (mode 0600, as a secret should be)."""
    path = directory / "metrics.key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class VariableQuery:
    """A dashboard variable's ``label_values(metric, label)``."""

    where: str
    metric: str
    label: str

    @property
    def needs_gpu_host(self) -> bool:
        return self.where.startswith("bastion-gpu/") and "vllm" not in self.metric

    @property
    def needs_vllm(self) -> bool:
        return "vllm" in self.metric


def variable_queries() -> list[VariableQuery]:
    found = []
    for path in sorted((DASHBOARDS / "grafana").glob("*.json")):
        board = json.loads(path.read_text())
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            text = variable["query"]["query"]
            parsed = re.fullmatch(r"label_values\((.+), (\w+)\)", text)
            assert parsed, f"{board['uid']}/${variable['name']}: {text}"
            where = f"{board['uid']}/${variable['name']}"
            found.append(VariableQuery(where, parsed.group(1), parsed.group(2)))
    return found

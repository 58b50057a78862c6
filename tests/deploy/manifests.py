"""Render deploy/kubernetes's overlays with kubectl's built-in kustomize and walk the result."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("dev", "production", "canary")
KUBERNETES_VERSION = "1.31.0"
"""The Kubernetes version the manifests are validated for (kubernetes-validate's schemas)."""
DOC = REPO_ROOT / "docs" / "kubernetes.md"
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

Resource = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        message = "kubectl is missing (it renders the kustomize overlays; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@cache
def _render(path: str) -> tuple[Resource, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", path], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render(target: str | Path) -> list[Resource]:
    """Every resource ``kubectl kustomize`` renders for an overlay name or a directory."""
    path = DEPLOY / "overlays" / target if isinstance(target, str) else target
    return list(_render(str(path)))


def pod_templates(resources: list[Resource]) -> Iterator[tuple[Resource, Resource]]:
    """(workload, pod spec) for every resource that runs pods."""
    for resource in resources:
        if resource["kind"] in POD_KINDS:
            yield resource, resource["spec"]["template"]["spec"]


def containers(pod: Resource) -> list[Resource]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def named(resources: list[Resource], kind: str, name: str) -> Resource:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def secret_refs(pod: Resource) -> set[tuple[str, str | None]]:
    """(Secret name, key or None) for every Secret a pod spec uses."""
    refs: set[tuple[str, str | None]] = set()
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            items = volume["secret"].get("items") or [{"key": None}]
            refs |= {(volume["secret"]["secretName"], i["key"]) for i in items}
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                items = source["secret"].get("items") or [{"key": None}]
                refs |= {(source["secret"]["name"], i["key"]) for i in items}
    for container in containers(pod):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                refs.add((source["secretRef"]["name"], None))
    refs |= {(s["name"], None) for s in pod.get("imagePullSecrets", [])}
    return refs


def config_map_refs(pod: Resource) -> set[str]:
    refs = set()
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            refs.add(volume["configMap"]["name"])
        for source in volume.get("projected", {}).get("sources", []):
            if "configMap" in source:
                refs.add(source["configMap"]["name"])
    for container in containers(pod):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                refs.add(ref["name"])
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                refs.add(source["configMapRef"]["name"])
    return refs


def operator_supplied() -> dict[str, str]:
    """Secret and ConfigMap names docs/kubernetes.md lists as the operator's, with their line.

    The list is the bullets of its "Operator-supplied Secrets" section: "- `name` ...".
    """
    text = DOC.read_text()
    section = text.split("## Operator-supplied Secrets", 1)[1].split("\n## ", 1)[0]
    found = {}
    for line in section.splitlines():
        match = re.match(r"^- `([a-z0-9.-]+)`", line)
        if match:
            found[match.group(1)] = line
    return found

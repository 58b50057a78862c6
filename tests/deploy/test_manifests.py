"""deploy/kubernetes: every overlay renders offline, passes kubernetes-validate, and keeps
the security settings, references and rules the deployment promises (docs/kubernetes.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.dashboards.tools import tool
from tests.deploy.manifests import (
    DEPLOY,
    KUBERNETES_VERSION,
    OVERLAYS,
    config_map_refs,
    containers,
    named,
    operator_supplied,
    pod_templates,
    render,
    secret_refs,
)
from tests.support import REPO_ROOT

RULES_DIR = REPO_ROOT / "dashboards" / "prometheus" / "rules"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus Operator: no schema offline
GATEWAY = ("Deployment", "bastion-gateway")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_resource_passes_kubernetes_validate(overlay: str) -> None:
    resources = render(overlay)
    kinds = {r["kind"] for r in resources}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert {"NetworkPolicy", "Job", "PersistentVolumeClaim", "ConfigMap", "Ingress"} <= kinds
    assert kinds >= CRD_KINDS
    checked = 0
    for resource in resources:
        if resource["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = f"{resource['kind']}/{resource['metadata']['name']}"
            pytest.fail(f"{overlay}: {name}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_inlined(overlay: str) -> None:
    resources = render(overlay)
    assert [r["metadata"]["name"] for r in resources if r["kind"] == "Secret"] == []
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|MASTER_KEY$|SIGNING_KEY$|API_KEY", re.I)
    for _, pod in pod_templates(resources):
        for container in containers(pod):
            for env in container.get("env", []):
                if secretish.search(env["name"]):
                    assert "valueFrom" in env, f"{container['name']}: {env['name']} inlined"
                value = env.get("value", "")
                # A URL may carry a password only as a reference to a secret-fed variable.
                assert not re.search(r"://[^:/@]+:(?!\$\()[^@]+@", value), (env["name"], value)
    for resource in resources:
        if resource["kind"] == "ConfigMap" and "bastion.yaml" in resource.get("data", {}):
            config = yaml.safe_load(resource["data"]["bastion.yaml"])
            assert not {"master_key", "database_url", "redis_url"} & set(config)
            assert all("api_key" not in u for u in config["upstreams"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_locked_down(overlay: str) -> None:
    for workload, pod in pod_templates(render(overlay)):
        pod_security = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, workload["metadata"]["name"]
        for container in containers(pod):
            where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            security = container.get("securityContext", {})
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("privileged", False) is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("capabilities", {}).get("add"), where
            seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where} {bound}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_drain_and_spread(overlay: str) -> None:
    resources = render(overlay)
    gateway = named(resources, *GATEWAY)
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # preStop runs before SIGTERM; then uvicorn drains for up to 10 s (serve.py) and the
    # audit writes its final checkpoint: the grace period must cover all of it.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 10 + 10
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    selector = gateway["spec"]["selector"]["matchLabels"]
    assert all(c["labelSelector"]["matchLabels"] == selector for c in spread)
    service = named(resources, "Service", "bastion-gateway")
    assert service["spec"]["selector"] == selector
    pdb = named(resources, "PodDisruptionBudget", "bastion-gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    hpa = named(resources, "HorizontalPodAutoscaler", "bastion-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "bastion-gateway"
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu[0]["resource"]["target"]["averageUtilization"] == 70


def test_in_flight_autoscaling_component_renders_and_validates(tmp_path: Path) -> None:
    """components/hpa-in-flight on production: a Pods metric the custom metrics API serves."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY / "overlays" / "production", tmp_path)],
                "components": [os.path.relpath(DEPLOY / "components" / "hpa-in-flight", tmp_path)],
            }
        )
    )
    hpa = named(render(tmp_path), "HorizontalPodAutoscaler", "bastion-gateway")
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods[0]["metric"]["name"] == "bastion_requests_in_flight"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_tier_asks_for_gpus_and_mounts_the_processor(overlay: str) -> None:
    resources = render(overlay)
    tiers = [
        (w, p)
        for w, p in pod_templates(resources)
        if w["metadata"]["labels"].get("app.kubernetes.io/component") == "inference"
    ]
    assert len(tiers) == (2 if overlay == "canary" else 1)
    for workload, pod in tiers:
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert any("--logits-processors=inference.vllm_watermark:" in a for a in container["args"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = next(v for v in pod["volumes"] if v["name"] == mounts["/opt/bastion/inference"])
        config_map = named(resources, "ConfigMap", volume["configMap"]["name"])
        for name in ("vllm_watermark.py", "watermark.py", "watermark_keys.py", "__init__.py"):
            assert config_map["data"][name] == (REPO_ROOT / "inference" / name).read_text()
        claim = next(v for v in pod["volumes"] if v["name"] == mounts["/models/model"])
        named(resources, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])
        assert workload["kind"] == "Deployment"
    hpas = [r["spec"]["scaleTargetRef"]["name"] for r in resources if r["kind"].startswith("Hori")]
    assert hpas == ["bastion-gateway"], "GPU pods scale by hand (docs/kubernetes.md)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_is_defined_or_operator_supplied(overlay: str) -> None:
    resources = render(overlay)
    supplied = operator_supplied()
    defined = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for workload, pod in pod_templates(resources):
        where = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}"
        for name, key in secret_refs(pod):
            if ("Secret", name) in defined:
                continue
            assert name in supplied, f"{where}: Secret {name} is neither rendered nor documented"
            if key is not None:
                assert f"`{key}`" in supplied[name], f"{where}: key {key} of {name} undocumented"
        for name in config_map_refs(pod):
            assert ("ConfigMap", name) in defined, f"{where}: ConfigMap {name} not rendered"
        for volume in pod.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            assert claim is None or ("PersistentVolumeClaim", claim) in defined, (where, claim)
    for ingress in (r for r in resources if r["kind"] == "Ingress"):
        for tls in ingress["spec"].get("tls", []):
            assert tls["secretName"] in supplied, tls["secretName"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_reaches_vllm_and_the_datastores(overlay: str) -> None:
    resources = render(overlay)
    policies = {r["metadata"]["name"]: r["spec"] for r in resources if r["kind"] == "NetworkPolicy"}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # Who carries the labels the vLLM and datastore policies admit.
    for workload, _ in pod_templates(resources):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        component = labels.get("app.kubernetes.io/component")
        if labels.get("bastion.dev/inference-client") == "true":
            assert component == "gateway", workload["metadata"]["name"]
        if labels.get("bastion.dev/datastore-client") == "true":
            assert component in ("gateway", "migrate"), workload["metadata"]["name"]
    vllm = policies["bastion-vllm"]["ingress"]
    assert vllm[0]["from"] == [
        {"podSelector": {"matchLabels": {"bastion.dev/inference-client": "true"}}}
    ]
    gateway = policies["bastion-gateway"]["ingress"]
    sources = [rule["from"][0]["namespaceSelector"]["matchLabels"] for rule in gateway]
    assert sources == [
        {"kubernetes.io/metadata.name": "ingress-nginx"},
        {"kubernetes.io/metadata.name": "monitoring"},
    ]
    assert gateway[1]["ports"] == [{"protocol": "TCP", "port": 9464}]  # metrics only


def test_prometheus_rule_equals_the_promtool_tested_rules(tmp_path: Path) -> None:
    """The PrometheusRule holds exactly the groups of dashboards/prometheus/rules/*.yml."""
    files = sorted(RULES_DIR.glob("*.yml"))
    assert len(files) >= 5
    groups = [g for f in files for g in yaml.safe_load(f.read_text())["groups"]]
    for overlay in OVERLAYS:
        rule = named(render(overlay), "PrometheusRule", "bastion")
        assert rule["spec"]["groups"] == groups, overlay
    # promtool checks what the operator would load, and the rule tests run on the files.
    extracted = tmp_path / "prometheusrule.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    done = subprocess.run(
        [str(tool("promtool")), "check", "rules", str(extracted)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    monitors = [r for r in render("production") if r["kind"] == "ServiceMonitor"]
    jobs = set()
    for monitor in monitors:
        label = monitor["spec"]["jobLabel"]
        for service in render("production"):
            if service["kind"] == "Service" and all(
                service["metadata"]["labels"].get(k) == v
                for k, v in monitor["spec"]["selector"]["matchLabels"].items()
            ):
                jobs.add(service["metadata"]["labels"][label])
    # The job names the target alerts look for (up{job="..."}).
    assert jobs == {"bastion-gateway", "vllm"}


def test_generated_files_are_current() -> None:
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_canary_overlay_sends_a_share_to_the_new_version() -> None:
    resources = render("canary")
    config_map = next(
        r for r in resources if r["kind"] == "ConfigMap" and "bastion.yaml" in r.get("data", {})
    )
    config = yaml.safe_load(config_map["data"]["bastion.yaml"])
    assert config["canaries"] == [{"model": "model", "version": "model-v2", "share": 0.1}]
    upstreams = {u["name"]: u for u in config["upstreams"]}
    service = named(resources, "Service", "bastion-vllm-canary")
    assert upstreams["inference-canary"]["url"] == "http://bastion-vllm-canary:8000"
    assert service["spec"]["selector"]["bastion.dev/model-track"] == "canary"
    canary = named(resources, "Deployment", "bastion-vllm-canary")
    assert (
        "--served-model-name=model-v2"
        in canary["spec"]["template"]["spec"]["containers"][0]["args"]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_step_applies_before_any_gateway_or_vllm_pod(overlay: str) -> None:
    """docs/kubernetes.md's step 1 (``-l 'bastion.dev/rollout!=after-migration'``) holds the
    Job and all it mounts, and neither the gateway's nor vLLM's Deployment."""
    resources = render(overlay)
    first = [
        r
        for r in resources
        if r["metadata"].get("labels", {}).get("bastion.dev/rollout") != "after-migration"
    ]
    names = {(r["kind"], r["metadata"]["name"]) for r in first}
    later = {(r["kind"], r["metadata"]["name"]) for r in resources} - names
    assert {kind for kind, _ in later} == {"Deployment"}
    assert ("Deployment", "bastion-gateway") in later
    job = named(first, "Job", "bastion-migrate")
    pod = job["spec"]["template"]["spec"]
    for name in config_map_refs(pod):
        assert ("ConfigMap", name) in names
    for volume in pod["volumes"]:
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        assert claim is None or ("PersistentVolumeClaim", claim) in names

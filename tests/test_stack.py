"""docker-compose.yml, checked as far as a machine without a Docker engine allows.

``docker-compose config`` (the apt package, v1.29) validates and interpolates the file;
the interpolated services are then held against the code: the inference service loads
the processor this repository ships, with the variables it reads, from a mount that
holds everything it imports; the gateway's configuration (deploy/bastion.yaml plus the
service's environment) loads into Bastion's Settings. What stays unverified here:
pulling the images, the GPU reservation, and the stack actually serving.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from compliance.signing import create_signing_key_file
from gateway.config import load_settings
from gateway.credentials import load_audit_signing_key, load_master_key
from inference.launch import WATERMARK_PROCESSOR
from tests.support import REPO_ROOT
from tests.watermarking import build_tokenizer

COMPOSE = REPO_ROOT / "docker-compose.yml"


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing (.ci/run installs it)")
        pytest.skip("docker-compose (apt package) is not installed")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "POSTGRES_"))}
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    done = compose_config({"POSTGRES_PASSWORD": "pw", "BASTION_MODEL_NAME": "qwen-7b"})
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = yaml.safe_load(done.stdout)
    return dict(document["services"])


def test_compose_refuses_to_run_without_a_database_password() -> None:
    done = compose_config({})
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr


def test_inference_service_loads_bastions_processor(services: dict[str, Any]) -> None:
    inference = services["inference"]
    assert inference["image"].startswith("vllm/vllm-openai:")
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in inference["command"])
    assert flags["logits-processors"] == WATERMARK_PROCESSOR
    assert flags["served-model-name"] == "qwen-7b"
    assert flags["scheduling-policy"] == "priority"  # the gateway sends key tiers as priority
    env = inference["environment"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in inference["volumes"]}
    package_dir = mounts[f"{env['PYTHONPATH']}/inference"]
    assert Path(package_dir) == REPO_ROOT / "inference"
    # The processor reads these names; the key file is the secret both services mount.
    assert env["BASTION_WATERMARK__KEYS_FILE"] == "/run/secrets/watermark_keys"
    prefix = module_constant(REPO_ROOT / "inference" / "vllm_watermark.py", "ENV_PREFIX")
    for name in ("KEYS_FILE", "GAMMA", "DELTA"):
        assert f"{prefix}{name}" in env
    assert [s["source"] for s in inference["secrets"]] == ["watermark_keys"]
    reservation = inference["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["capabilities"] == ["gpu"]
    assert "ports" not in inference  # only the gateway is published


def module_constant(path: Path, name: str) -> Any:
    """A module-level constant, read without importing (the module needs torch)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path}: no {name}")


def test_processor_needs_nothing_beyond_the_mounted_package() -> None:
    """The vLLM image has torch, numpy and vLLM, not Bastion's other packages."""
    allowed_roots = {"torch", "numpy", "vllm", "inference", "__future__"}
    stdlib = set(sys.stdlib_module_names)
    seen: set[str] = set()
    todo = ["vllm_watermark"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((REPO_ROOT / "inference" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            for module in modules:
                root = module.split(".")[0]
                assert root in allowed_roots or root in stdlib, f"inference/{name}.py: {module}"
                if root == "inference" and "." in module:
                    todo.append(module.split(".")[1])
    assert {"vllm_watermark", "watermark", "watermark_keys"} <= seen


def test_gateway_service_configuration_loads(
    services: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = services["gateway"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}
    config_file = Path(mounts["/etc/bastion/bastion.yaml"])
    assert config_file == REPO_ROOT / "deploy" / "bastion.yaml"
    # Paths inside the container, mapped onto this machine for the check.
    model_dir = tmp_path / "model"
    build_tokenizer(model_dir)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "master_key").write_text("QUFB" * 10 + "QUE=\n")
    (secrets / "watermark_keys").write_text("k1: " + "QUFB" * 11 + "\n")
    create_signing_key_file(secrets / "signing_key")
    write_gateway_tls(secrets)
    (secrets / "bastion_es_password").write_text("0123abcd" * 6 + "\n")
    for key in list(os.environ):
        if key.startswith("BASTION_"):
            monkeypatch.delenv(key)
    for key, value in gateway["environment"].items():
        value = value.replace("/run/secrets", str(secrets)).replace("/models/model", str(model_dir))
        monkeypatch.setenv(key, value)
    settings = load_settings(config_file)
    assert settings.dev is False and settings.auth.enabled
    assert [(u.name, str(u.url).rstrip("/"), u.models) for u in settings.upstreams] == [
        ("inference", "http://inference:8000", ["qwen-7b"])
    ]
    assert settings.watermark.enabled and settings.watermark.tokenizers == {"qwen-7b": model_dir}
    assert settings.database_url.startswith("postgresql://bastion:pw@postgres:5432/")
    assert settings.redis_url == "redis://redis:6379/0"
    assert load_master_key(settings) and load_audit_signing_key(settings)  # secrets wired
    assert gateway["command"] == ["serve", "--config", "/etc/bastion/bastion.yaml"]
    assert [p["target"] for p in gateway["ports"]] == [settings.server.port]
    # TLS on the listener, from the service's secrets.
    assert settings.server.tls is not None
    assert settings.server.tls.certfile == secrets / "gateway_cert"
    if "events" in type(settings).model_fields:  # event shipping, once the gateway has it
        events = settings.events  # type: ignore[attr-defined]
        assert events.url == "http://elasticsearch:9200"
        assert events.password_file == secrets / "bastion_es_password"


def write_gateway_tls(secrets: Path) -> None:
    """A certificate and key for the name "gateway", as the stack's secrets hold them."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("gateway")
    cert.private_key_pem.write_to_path(str(secrets / "gateway_key"))
    cert.cert_chain_pems[0].write_to_path(str(secrets / "gateway_cert"))
    ca.cert_pem.write_to_path(str(secrets / "gateway_ca"))


# --- the observability stack: everything it mounts exists, everything it names is in it ---

MODEL_DIR_DEFAULT = REPO_ROOT / "models" / "model"  # the operator's weights, never committed
ONE_SHOTS = {"elasticsearch-users", "events-setup", "kibana-import"}
INTERNAL_ONLY = {"inference", "postgres", "redis", "elasticsearch", "dcgm-exporter"}


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    found = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("/"):
            found.append((Path(source), target))
    return found


def test_every_file_the_stack_mounts_exists(services: dict[str, Any]) -> None:
    checked = 0
    for name, service in services.items():
        for source, target in bind_mounts(service):
            if source == MODEL_DIR_DEFAULT or not source.is_relative_to(REPO_ROOT):
                continue  # the model directory and the host's root are the host's
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
            checked += 1
    assert checked >= 12


def test_secrets_come_from_files_outside_the_repository_history() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    ignored = (REPO_ROOT / ".gitignore").read_text().split()
    assert "secrets/" in ignored
    for name, secret in document["secrets"].items():
        assert secret["file"].startswith("./secrets/"), name


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image}"
        assert any(c.isdigit() for c in tag) or image.startswith("bastion:"), f"{name}: {image}"


def test_services_restart_and_report_their_health(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_SHOTS:
            assert service.get("restart", "no") == "no" or service["restart"].startswith(
                "on-failure"
            ), name
            continue
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), f"{name}: no health check"


def test_internal_services_have_no_way_out(services: dict[str, Any]) -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    assert document["networks"]["backend"]["internal"] is True
    for name in INTERNAL_ONLY:
        assert set(services[name]["networks"]) == {"backend"}, name
        assert "ports" not in services[name], name
    for name, service in services.items():
        for port in service.get("ports", []):
            if name != "gateway":  # only the gateway listens beyond the host by default
                # docker-compose writes a port with a host address as "IP:PUBLISHED:TARGET".
                assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_no_password_is_written_in_the_stack(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key and key != "POSTGRES_PASSWORD":
                assert key.endswith(("_FILE", "__FILE")), f"{name}: {key}"
                assert str(value).startswith("/run/secrets/"), f"{name}: {key}"
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "ELASTICSEARCH_PASSWORD" not in services["kibana"]["environment"]


def service_hosts(services: dict[str, Any], name: str) -> set[str]:
    networks = set(services[name].get("networks", []))
    return {
        other for other, service in services.items() if networks & set(service.get("networks", []))
    }


def test_every_service_the_gateway_points_to_is_in_the_stack(
    services: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from urllib.parse import urlsplit

    env = services["gateway"]["environment"]
    upstreams = json.loads(env["BASTION_UPSTREAMS"])
    urls = [u["url"] for u in upstreams]
    urls += [env["BASTION_DATABASE_URL"], env["BASTION_REDIS_URL"], env["BASTION_EVENTS__URL"]]
    reachable = service_hosts(services, "gateway")
    for url in urls:
        host = urlsplit(url).hostname
        assert host in services, f"{url}: no service {host}"
        assert host in reachable, f"{url}: {host} shares no network with the gateway"
    # Every secret file the gateway's environment names is one of its secrets.
    mounted = {f"/run/secrets/{s['source']}" for s in services["gateway"]["secrets"]}
    named = {v for v in env.values() if str(v).startswith("/run/secrets/")}
    assert named <= mounted


def test_prometheus_scrapes_services_of_the_stack(services: dict[str, Any]) -> None:
    config = yaml.safe_load((REPO_ROOT / "dashboards/prometheus/prometheus.yml").read_text())
    reachable = service_hosts(services, "prometheus")
    secrets = {f"/run/secrets/{s['source']}" for s in services["prometheus"]["secrets"]}
    for job in config["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host = target.rsplit(":", 1)[0]
            if host == "host.docker.internal":  # the node exporter, on the host's network
                assert services["node-exporter"]["network_mode"] == "host"
                assert "host.docker.internal:host-gateway" in services["prometheus"]["extra_hosts"]
                continue
            if host == "localhost":
                continue
            assert host in services and host in reachable, f"{job['job_name']}: {target}"
        for key in ("authorization", "tls_config"):
            for value in job.get(key, {}).values():
                if str(value).startswith("/run/secrets/"):
                    assert value in secrets, f"{job['job_name']}: {value}"
    mounts = {target: source for source, target in bind_mounts(services["prometheus"])}
    assert mounts["/etc/prometheus/rules"] == REPO_ROOT / "dashboards/prometheus/rules"
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    gateway_job = next(j for j in config["scrape_configs"] if j["job_name"] == "bastion-gateway")
    assert gateway_job["scheme"] == "https"  # the gateway serves TLS in the stack


def test_grafana_is_provisioned_from_the_repository(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    mounts = {target: source for source, target in bind_mounts(grafana)}
    provider = yaml.safe_load(
        (REPO_ROOT / "dashboards/provisioning/dashboards/bastion.yml").read_text()
    )["providers"][0]
    assert mounts[provider["options"]["path"]] == REPO_ROOT / "dashboards/grafana"
    datasources = yaml.safe_load(
        (REPO_ROOT / "dashboards/provisioning/datasources/bastion.yml").read_text()
    )["datasources"]
    reachable = service_hosts(services, "grafana")
    for source in datasources:
        host = source["url"].split("//")[1].split(":")[0]
        assert host in reachable, source["name"]
    # The dashboards' default data source is the provisioned Prometheus.
    board = json.loads((REPO_ROOT / "dashboards/grafana/bastion-gateway.json").read_text())
    variable = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == datasources[0]["uid"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"])


def test_one_shots_set_up_events_and_kibana(services: dict[str, Any]) -> None:
    setup = services["events-setup"]
    assert setup["image"] == services["gateway"]["image"]
    assert setup["command"][:2] == ["events", "setup"]
    kibana_import = {t: s for s, t in bind_mounts(services["kibana-import"])}
    assert (
        kibana_import["/import/bastion-events.ndjson"]
        == REPO_ROOT / "dashboards/kibana/bastion-events.ndjson"
    )
    assert services["kibana"]["depends_on"]["elasticsearch-users"]["condition"] == (
        "service_completed_successfully"
    )

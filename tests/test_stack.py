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

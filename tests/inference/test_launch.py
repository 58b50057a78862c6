"""The ``inference:`` section and the vLLM command line it becomes (inference/launch.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, load_inference_settings, load_settings
from inference.launch import (
    VLLM_SERVER_MODULE,
    WATERMARK_PROCESSOR,
    base_url,
    check_files,
    vllm_command,
    vllm_environment,
    watermark_environment,
)
from inference.settings import InferenceSettings
from inference.supervisor import LaunchError

REPO_ROOT = Path(__file__).resolve().parents[2]


def flag(command: list[str], name: str) -> str | None:
    """The value after ``name`` in ``command`` (None when the flag is absent)."""
    return command[command.index(name) + 1] if name in command else None


def test_defaults_give_the_minimal_command() -> None:
    settings = InferenceSettings()
    assert vllm_command(settings) == [
        ".venv-inference/bin/python",
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        ".bastion/dev-model",
        "--served-model-name",
        "dev-model",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--dtype",
        "auto",
        "--tensor-parallel-size",
        "1",
    ]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("python", "/opt/vllm/bin/python", {"python": "/opt/vllm/bin/python"}),
        ("host", "0.0.0.0", {"--host": "0.0.0.0"}),
        ("port", 8123, {"--port": "8123"}),
        (
            "model",
            "/models/qwen-7b",
            {"--model": "/models/qwen-7b", "--served-model-name": "qwen-7b"},
        ),
        ("served_model_name", "org/chat:v2", {"--served-model-name": "org/chat:v2"}),
        ("dtype", "bfloat16", {"--dtype": "bfloat16"}),
        ("quantization", "awq", {"--quantization": "awq"}),
        ("quantization", "gptq", {"--quantization": "gptq"}),
        ("quantization", "fp8", {"--quantization": "fp8"}),
        ("tensor_parallel_size", 4, {"--tensor-parallel-size": "4"}),
        ("max_num_batched_tokens", 8192, {"--max-num-batched-tokens": "8192"}),
        ("max_model_len", 4096, {"--max-model-len": "4096"}),
        ("gpu_memory_utilization", 0.85, {"--gpu-memory-utilization": "0.85"}),
        ("priority_scheduling", True, {"--scheduling-policy": "priority"}),
        ("watermark", True, {"--logits-processors": WATERMARK_PROCESSOR}),
    ],
)
def test_each_option_becomes_its_flag(field: str, value: Any, expected: dict[str, str]) -> None:
    command = vllm_command(InferenceSettings.model_validate({field: value}))
    for name, wanted in expected.items():
        if name == "python":
            assert command[:3] == [wanted, "-m", VLLM_SERVER_MODULE]
        else:
            assert flag(command, name) == wanted
    for name in expected:
        assert name == "python" or command.count(name) == 1


@pytest.mark.parametrize(
    ("field", "flag_name"),
    [
        ("quantization", "--quantization"),
        ("max_num_batched_tokens", "--max-num-batched-tokens"),
        ("max_model_len", "--max-model-len"),
        ("enforce_eager", "--enforce-eager"),
        ("lora_adapters", "--enable-lora"),
        ("priority_scheduling", "--scheduling-policy"),
        ("watermark", "--logits-processors"),
    ],
)
def test_options_at_their_default_add_no_flag(field: str, flag_name: str) -> None:
    assert getattr(InferenceSettings(), field) in (None, False, [])
    assert flag_name not in vllm_command(InferenceSettings())


def test_enforce_eager_is_a_bare_flag() -> None:
    command = vllm_command(InferenceSettings(enforce_eager=True))
    assert command[-1] == "--enforce-eager"


def test_lora_adapters_are_served_as_models() -> None:
    settings = InferenceSettings.model_validate(
        {
            "model": "/models/base",
            "lora_adapters": [
                {"name": "sql-helper", "path": "/adapters/sql"},
                {"name": "legal", "path": "/adapters/legal"},
            ],
        }
    )
    command = vllm_command(settings)
    at = command.index("--enable-lora")
    assert command[at : at + 4] == [
        "--enable-lora",
        "--lora-modules",
        "sql-helper=/adapters/sql",
        "legal=/adapters/legal",
    ]
    assert settings.served_models() == ["base", "sql-helper", "legal"]


def test_extra_args_come_last_unchanged() -> None:
    extra = ["--swap-space", "8", "--max-lora-rank=64"]
    settings = InferenceSettings(extra_args=extra, watermark=True)
    assert vllm_command(settings)[-3:] == extra


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"quantization": "int3"}, "quantization"),
        ({"dtype": "float8"}, "dtype"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"port": 0}, "port"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"startup_timeout_s": 0}, "startup_timeout_s"),
        ({"served_model_name": "has space"}, "served_model_name"),
        ({"lora_adapters": [{"name": "a=b", "path": "/x"}]}, "lora_adapters.0.name"),
        ({"lora_adapters": [{"name": "a"}]}, "lora_adapters.0.path"),
        (
            {"lora_adapters": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]},
            "lora_adapters.1.name: 'a' is used twice",
        ),
        (
            {"served_model_name": "m", "lora_adapters": [{"name": "m", "path": "/x"}]},
            "lora_adapters.0.name: 'm' is used twice",
        ),
        (
            {"extra_args": ["--port", "9"]},
            "extra_args: --port is set by Bastion; use inference.port",
        ),
        ({"extra_args": ["-tp=2"]}, "use inference.tensor_parallel_size"),
        ({"bogus": 1}, "inference.bogus: unknown key"),
    ],
)
def test_bad_values_name_the_field(
    document: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_bastion_env(monkeypatch)
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump({"inference": document}))
    with pytest.raises(ConfigError, match="inference") as caught:
        load_inference_settings(path)
    assert message in str(caught.value)


def test_paths_are_not_checked_when_the_configuration_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway host has no model directory: the gateway's Settings load all the same."""
    _clear_bastion_env(monkeypatch)
    document = {
        "upstreams": [{"name": "a", "url": "http://127.0.0.1:9", "models": ["m"]}],
        "inference": {
            "python": "/nowhere/bin/python",
            "model": "/nowhere/model",
            "lora_adapters": [{"name": "ad", "path": "/nowhere/adapter"}],
        },
    }
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump(document))
    assert load_settings(path).inference.model == Path("/nowhere/model")


def test_inference_settings_load_without_gateway_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU host's file may hold only ``inference:``; environment variables win over it."""
    _clear_bastion_env(monkeypatch)
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump({"inference": {"port": 8100, "dtype": "float32"}}))
    monkeypatch.setenv("BASTION_INFERENCE__PORT", "8200")
    settings = load_inference_settings(path).inference
    assert (settings.port, settings.dtype) == (8200, "float32")
    with pytest.raises(ConfigError, match="upstreams"):
        load_settings(path)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("gpu-a.internal", "http://gpu-a.internal:8000"),
    ],
)
def test_base_url_probes_loopback_for_wildcard_hosts(host: str, url: str) -> None:
    assert base_url(InferenceSettings(host=host)) == url


def test_environment_keeps_the_tier_private() -> None:
    env = vllm_environment(InferenceSettings(), {"PATH": "/bin", "HF_HUB_OFFLINE": "0"})
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["DO_NOT_TRACK"] == "1"
    assert env["HF_HUB_OFFLINE"] == "0"  # the operator's choice stands
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == "/bin"
    assert "PYTHONPATH" not in env


def test_watermark_puts_the_processor_on_the_path() -> None:
    env = vllm_environment(InferenceSettings(watermark=True), {"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/x"]
    assert (REPO_ROOT / "inference" / "__init__.py").is_file()


def test_check_files_names_what_is_missing(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    settings = InferenceSettings(python=tmp_path / "python", model=model)
    with pytest.raises(LaunchError, match=r"inference\.python: no interpreter"):
        check_files(settings)
    settings = settings.model_copy(update={"python": Path(sys.executable)})
    with pytest.raises(LaunchError, match=r"inference\.model: .* build-dev-model"):
        check_files(settings)
    (model / "config.json").write_text("{}")
    check_files(settings)
    adapter = tmp_path / "adapter"
    with_lora = InferenceSettings.model_validate(
        {
            "python": sys.executable,
            "model": str(model),
            "lora_adapters": [{"name": "ad", "path": str(adapter)}],
        }
    )
    with pytest.raises(LaunchError, match=r"inference.lora_adapters.0.path"):
        check_files(with_lora)
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    check_files(with_lora)


def _clear_bastion_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("BASTION_")]:
        monkeypatch.delenv(name)


SECRET_LINE = "k-old: " + "A" * 43 + "=\nk-new: " + "B" * 43 + "=\n"


def test_watermark_environment_names_the_processors_variables(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(SECRET_LINE)
    env = watermark_environment(keys, None, 0.25, 2.0, environ={})
    assert env == {
        "BASTION_WATERMARK__KEYS_FILE": str(keys.resolve()),
        "BASTION_WATERMARK__GAMMA": "0.25",
        "BASTION_WATERMARK__DELTA": "2.0",
    }
    env = watermark_environment(keys, "k-old", 0.5, 5.0, environ={})
    assert env["BASTION_WATERMARK__GENERATION_KEY_ID"] == "k-old"
    # Keys in the variable alone are enough (the child inherits it).
    from_env = {"BASTION_WATERMARK_KEYS": SECRET_LINE}
    assert "BASTION_WATERMARK__KEYS_FILE" not in watermark_environment(
        None, None, 0.25, 2, from_env
    )


@pytest.mark.parametrize(
    ("keys_text", "key_id", "message"),
    [
        (None, None, "inference.watermark: no watermark keys"),
        ("k1: c2hvcnQ=\n", None, "at least 16 random bytes"),
        (SECRET_LINE, "k-gone", "watermark.generation_key_id: 'k-gone' is not among"),
    ],
)
def test_watermark_environment_refuses_what_vllm_could_not_use(
    tmp_path: Path, keys_text: str | None, key_id: str | None, message: str
) -> None:
    keys = None
    if keys_text is not None:
        keys = tmp_path / "keys"
        keys.write_text(keys_text)
    with pytest.raises(LaunchError) as caught:
        watermark_environment(keys, key_id, 0.25, 2.0, environ={})
    assert message in str(caught.value)

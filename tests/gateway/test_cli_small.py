"""Smaller CLI promises: ``--version``, install progress off a terminal, vLLM's health
probes off the dev console, one rule for a key's audit detail, paths relative to the
configuration file."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from compliance.config_paths import resolve_database_url
from gateway.cli import app
from gateway.commands.inference import HEARTBEAT_S, install_progress
from gateway.config import Settings
from gateway.config_paths import resolve_relative_paths
from gateway.keys import KeyInfo
from inference.launch import shown


def test_version() -> None:
    from importlib.metadata import version

    done = CliRunner().invoke(app, ["--version"])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == f"bastion {version('bastion')}"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_install_progress_is_printed_when_not_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    clock = Clock()
    report = install_progress(None, console, clock)
    report("creating /x/.venv-inference")
    report("[1/3] torch (CPU)")
    for i in range(50):  # pip's lines: not one each, but one at least every HEARTBEAT_S
        clock.now += HEARTBEAT_S / 10
        report(f"[1/3] torch (CPU): Downloading part {i}")
    report("[2/3] vLLM")
    lines = out.getvalue().splitlines()
    assert lines[0].strip() == "creating /x/.venv-inference"
    assert lines[1].strip() == "[1/3] torch (CPU)"
    assert lines[-1].strip() == "[2/3] vLLM"
    heartbeats = [line for line in lines if "Downloading" in line]
    assert 4 <= len(heartbeats) <= 6, lines


def test_install_progress_on_a_terminal_is_the_spinner() -> None:
    class Status:
        text = ""

        def update(self, text: str) -> None:
            self.text = text

    status = Status()
    out = io.StringIO()
    report = install_progress(status, Console(file=out, force_terminal=True), Clock())
    report("[1/3] torch (CPU)")
    assert status.text == "[1/3] torch (CPU)" and out.getvalue() == ""


def test_vllm_health_probe_lines_are_not_shown() -> None:
    assert not shown('INFO:     127.0.0.1:40312 - "GET /health HTTP/1.1" 200 OK')
    assert shown('INFO:     127.0.0.1:40312 - "GET /health HTTP/1.1" 503 Service Unavailable')
    assert shown('INFO:     127.0.0.1:40320 - "POST /v1/chat/completions HTTP/1.1" 200 OK')
    assert shown("INFO 12-02 10:00:00 [api_server.py:1] vLLM API server version 0.32.0")


def test_a_keys_audit_detail_leaves_out_its_subject() -> None:
    info = KeyInfo(
        id="0123456789abcdef",
        roles=("app",),
        subject_id="alice@example.com",
        models=None,
        tier="standard",
        description="",
        created_at=datetime.now(UTC),
        expires_at=None,
        revoked_at=None,
    )
    detail = info.as_audit_json()
    assert "subject" not in detail and "alice" not in repr(detail)
    assert detail == {k: v for k, v in info.as_json().items() if k != "subject"}


def test_relative_paths_in_a_configuration_resolve_against_its_folder(tmp_path: Path) -> None:
    document = {
        "database_url": "sqlite:///state/dev.db",
        "master_key_file": "master.key",
        "signing_key_file": "/elsewhere/signing.key",
        "watermark": {"keys_file": "wm.keys", "tokenizers": {"m": "tok"}},
        "inference": {"python": "venv/bin/python", "model": "model"},
        "upstreams": [{"name": "a", "url": "http://h:1", "models": ["m"]}],
    }
    resolved = resolve_relative_paths(Settings, document, tmp_path)
    assert resolved["database_url"] == f"sqlite:///{tmp_path}/state/dev.db"
    assert resolved["master_key_file"] == str(tmp_path / "master.key")
    assert resolved["signing_key_file"] == "/elsewhere/signing.key"
    assert resolved["watermark"]["keys_file"] == str(tmp_path / "wm.keys")
    assert resolved["watermark"]["tokenizers"] == {"m": str(tmp_path / "tok")}
    assert resolved["inference"]["python"] == str(tmp_path / "venv/bin/python")
    assert resolved["upstreams"] == document["upstreams"]
    assert document["master_key_file"] == "master.key"  # the input is left as it was


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///bastion.db", "sqlite:////cfg/bastion.db"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_database_urls_resolve_against_the_configuration(url: str, expected: str) -> None:
    assert resolve_database_url(url, Path("/cfg")) == expected


def test_audit_commands_read_relative_paths_from_the_configurations_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``audit public-key`` with a config naming ``signing.key`` beside it, run elsewhere."""
    for name in ("BASTION_SIGNING_KEY_FILE", "BASTION_CONFIG", "BASTION_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "conf"
    runner = CliRunner()
    made = runner.invoke(app, ["secrets", "create-signing-key", str(folder / "signing.key")])
    assert made.exit_code == 0, made.output
    config = folder / "bastion.yaml"
    config.write_text(yaml.safe_dump({"signing_key_file": "signing.key"}))
    monkeypatch.chdir(tmp_path)
    done = runner.invoke(app, ["audit", "public-key", "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert done.output.startswith("-----BEGIN PUBLIC KEY-----")


def test_gateway_settings_resolve_relative_paths_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("BASTION_")]:
        monkeypatch.delenv(name)
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "wm.keys").write_text("k1: " + "QUFB" * 10 + "QUE=\n")
    config = folder / "bastion.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": "sqlite:///state/bastion.db",
                "master_key_file": "master.key",
                "watermark": {"keys_file": "wm.keys"},
                "upstreams": [{"name": "a", "url": "http://h:1", "models": ["m"]}],
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["config", "check", "--config", str(config)])
    assert done.exit_code == 0, done.output
    shown = yaml.safe_load(done.output)
    assert shown["database_url"] == f"sqlite:///{folder}/state/bastion.db"
    assert shown["master_key_file"] == str(folder / "master.key")
    assert shown["watermark"]["keys_file"] == str(folder / "wm.keys")

"""Configuration: YAML + BASTION_* overrides, validated with one clear line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, load_settings

UPSTREAM = {"name": "a", "url": "http://127.0.0.1:8000", "models": ["m1"]}


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "bastion.yaml"
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("BASTION_"):
            monkeypatch.delenv(name)


def test_yaml_values_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": {"port": 9000}, "upstreams": [UPSTREAM]})
    settings = load_settings(path)
    assert settings.server.port == 9000
    assert settings.server.host == "127.0.0.1"
    assert settings.timeouts.read_s == 60.0
    assert settings.upstreams[0].base_url == "http://127.0.0.1:8000"
    assert settings.models() == ["m1"]


def test_environment_overrides_yaml_and_flags_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, {"server": {"port": 9000, "host": "0.0.0.0"}, "upstreams": [UPSTREAM]})
    monkeypatch.setenv("BASTION_SERVER__PORT", "9100")
    monkeypatch.setenv("BASTION_TIMEOUTS__READ_S", "3.5")
    settings = load_settings(path)
    assert settings.server.port == 9100
    assert settings.server.host == "0.0.0.0"  # the rest of the section survives
    assert settings.timeouts.read_s == 3.5
    assert load_settings(path, server={"port": 9200}).server.port == 9200


def test_upstreams_from_environment_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "BASTION_UPSTREAMS", '[{"name": "e", "url": "https://gpu:8443", "models": ["x", "y"]}]'
    )
    settings = load_settings()
    assert [u.name for u in settings.upstreams] == ["e"]
    assert settings.models() == ["x", "y"]


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_CONFIG", str(write(tmp_path, {"upstreams": [UPSTREAM]})))
    assert load_settings().upstreams[0].name == "a"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"upstreams": [UPSTREAM], "colour": "red"}, "colour: unknown key"),
        ({"upstreams": [UPSTREAM], "server": {"prot": 1}}, "server.prot: unknown key"),
        (
            {"upstreams": [{**UPSTREAM, "url": "ftp://x"}]},
            "upstreams.0.url: not a valid http(s) URL",
        ),
        (
            {"upstreams": [{**UPSTREAM, "url": "nonsense"}]},
            "upstreams.0.url: not a valid http(s) URL",
        ),
        (
            {"upstreams": [{**UPSTREAM, "models": []}]},
            "upstreams.0.models: must list at least one model",
        ),
        ({"upstreams": [{**UPSTREAM, "weight": 0}]}, "upstreams.0.weight:"),
        ({"upstreams": []}, "upstreams: at least one upstream is required"),
        ({}, "upstreams: is required"),
        ({"upstreams": [UPSTREAM, UPSTREAM]}, "duplicate name 'a'"),
        (
            {
                "upstreams": [UPSTREAM],
                "server": {"tls": {"certfile": "/no/cert.pem", "keyfile": "/no/key.pem"}},
            },
            "server.tls.certfile: file not found: /no/cert.pem",
        ),
        (
            {"upstreams": [UPSTREAM], "canaries": [{"model": "m1", "version": "m9", "share": 0.1}]},
            "canaries.0.version: model 'm9' is not served by any upstream",
        ),
        ({"upstreams": [UPSTREAM], "auth": {"enabled": False}}, "auth.enabled: authentication"),
        ({"upstreams": [UPSTREAM], "master_key": "abc"}, "master_key: secrets are never read"),
        (
            {"upstreams": [UPSTREAM], "canaries": [{"model": "m1", "version": "m1", "share": 1.5}]},
            "canaries.0.share:",
        ),
    ],
)
def test_bad_configuration_names_the_field(tmp_path: Path, document: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, document))
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_bad_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_UPSTREAMS", '[{"name": "e", "url": "http://h:1", "models": ["x"]}]')
    monkeypatch.setenv("BASTION_SERVER__PORT", "eighty")
    with pytest.raises(ConfigError, match=r"^server\.port: "):
        load_settings()


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d"):
        load_settings(write(tmp_path, "upstreams:\n  - [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"))


def test_existing_certificate_files_are_accepted(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    document = {
        "upstreams": [UPSTREAM],
        "server": {"tls": {"certfile": str(cert), "keyfile": str(key)}},
    }
    tls = load_settings(write(tmp_path, document)).server.tls
    assert tls is not None and tls.certfile == cert

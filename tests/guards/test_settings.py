"""GuardSettings: defaults, the YAML in docs/guards.md, overrides, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gateway.guards.settings import GuardSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "guards.md"


def doc_yaml() -> dict:  # type: ignore[type-arg]
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    return yaml.safe_load(blocks[0])["guards"]


def test_the_documented_yaml_validates_and_shows_the_defaults() -> None:
    section = doc_yaml()
    documented = GuardSettings.model_validate(section)
    assert documented.roles and documented.keys
    defaults = GuardSettings()
    for name in ("input", "output", "stream", "pii", "token_limit", "model_scanners"):
        assert getattr(documented, name) == getattr(defaults, name), name
    assert documented.token_prompts == defaults.token_prompts
    assert set(section) == set(GuardSettings.model_fields)  # every field is shown


def test_defaults_without_configuration() -> None:
    settings = GuardSettings()
    assert settings.enabled
    assert set(settings.input) == {
        "invisible_text",
        "secrets",
        "sql_injection",
        "prompt_injection",
        "pii",
        "token_limit",
    }
    assert set(settings.output) == {"secrets", "pii_leak", "refusal", "json_validity"}
    assert settings.stream.hold_back_tokens == 32


def test_partial_policy_keeps_the_other_defaults() -> None:
    settings = GuardSettings.model_validate({"input": {"prompt_injection": {"action": "flag"}}})
    policy = settings.input["prompt_injection"]
    assert policy.action == "flag" and policy.message_roles == ("user", "tool", "prompt")
    assert settings.input["pii"].action == "redact"


def test_role_then_key_overrides() -> None:
    settings = GuardSettings.model_validate(
        {
            "roles": {
                "app": {"input": {"pii": {"action": "block"}}},
                "data_scientist": {"input": {"pii": {"action": "flag", "threshold": 0.9}}},
            },
            "keys": {"k": {"input": {"pii": {"enabled": False}}}},
        }
    )
    assert settings.policies("input", ("app",), None)["pii"].action == "block"
    both = settings.policies("input", ("data_scientist", "app"), None)["pii"]
    assert both.action == "flag" and both.threshold == 0.9  # the roles' order in the file
    keyed = settings.policies("input", ("app",), "k")["pii"]
    assert not keyed.enabled and keyed.action == "block"
    assert settings.override_key(("app",), "other") == (("app",), None)


@pytest.mark.parametrize(
    "section",
    [
        {"input": {"url_reachability": {}}},
        {"output": {"pii": {}}},
        {"roles": {"app": {"input": {"nope": {"enabled": False}}}}},
        {"input": {"pii": {"action": "delete"}}},
        {"input": {"pii": {"threshold": 2}}},
        {"stream": {"hold_back_tokens": 0}},
        {"unknown": 1},
        {"roles": {"app": {"input": {"pii": {"message_roles": ["user"]}}}}},
    ],
)
def test_invalid_configuration_is_refused(section: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError):
        GuardSettings.model_validate(section)


def test_frozen() -> None:
    with pytest.raises(ValidationError):
        GuardSettings().enabled = False  # type: ignore[misc]


def test_embedded_in_settings_with_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """As gateway.config.Settings will hold it: ``guards:`` from YAML and BASTION_* vars."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Embedding(BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix="BASTION_", env_nested_delimiter="__", extra="forbid", frozen=True
        )
        guards: GuardSettings = GuardSettings()

    assert Embedding().guards == GuardSettings()
    monkeypatch.setenv("BASTION_GUARDS__STREAM__RELEASE", "sentence")
    monkeypatch.setenv("BASTION_GUARDS__INPUT", '{"pii": {"action": "flag"}}')
    settings = Embedding().guards
    assert settings.stream.release == "sentence"
    assert settings.input["pii"].action == "flag"
    assert settings.input["secrets"].action == "redact"  # the others keep their defaults

"""The configuration shown in the docs is valid and complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from gateway.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/configuration.md"])
def test_yaml_examples_validate(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("BASTION_")]:
        monkeypatch.delenv(name)
    blocks = yaml_blocks(ROOT / doc)
    assert blocks, f"{doc} shows no YAML"
    for block in blocks:
        path = tmp_path / "bastion.yaml"
        path.write_text(block)
        load_settings(path)


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        annotation = info.annotation
        for candidate in getattr(annotation, "__args__", ()) or (annotation,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                paths.extend(field_paths(candidate, f"{prefix}{name}."))
    return paths


def test_reference_documents_every_field() -> None:
    reference = yaml.safe_load(yaml_blocks(ROOT / "docs/configuration.md")[0])

    def present(path: str) -> bool:
        node: object = reference
        for part in path.split("."):
            if isinstance(node, list):
                node = node[0]
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    env_only = {"master_key"}  # secrets are never read from the YAML
    missing = [
        p
        for p in field_paths(Settings)
        if not p.startswith("server.tls.") and p not in env_only and not present(p)
    ]
    assert missing == []

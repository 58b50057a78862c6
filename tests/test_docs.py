"""The configuration shown in the docs is valid and complete."""

from __future__ import annotations

import base64
import re
import subprocess
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


def _by_name(node: dict[str, object]) -> bool:
    """Whether ``node`` maps names to sections (``guards.input``), not fields to values."""
    return all(isinstance(v, dict) for v in node.values())


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
            if isinstance(node, dict) and part not in node and _by_name(node):
                if not node:
                    return True  # an empty mapping by name: its entries are shown elsewhere
                # A mapping by name (guards.input): one entry shows each field.
                node = next((v for v in node.values() if part in v), next(iter(node.values())))
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


README = ROOT / "README.md"


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert found, f"README has no section {title!r}"
    return found.group(1)


def test_readme_layout_names_only_folders_that_exist() -> None:
    named = re.findall(r"`([\w.-]+)/`", readme_section("Layout"))
    assert len(named) >= 6, named
    missing = [name for name in named if not (ROOT / name).is_dir()]
    assert missing == []


def test_readme_links_and_references_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "README links to no local document"
    assert [t for t in local if not (ROOT / t).exists()] == []
    # Pointers to what is not in the repository (e.g. a tracker's "issues").
    assert "see `issues`" not in text
    assert not re.search(r"^Coming\b", text, flags=re.M)


def test_readme_calls_the_gateway_where_it_listens() -> None:
    """Every example URL of a gateway route uses the port that make dev and the stack serve."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    published = {str(p).rsplit(":", 1)[-1] for p in compose["services"]["gateway"]["ports"]}
    assert published == {"8080"}
    routes = r"/(?:v1|compliance|privacy|admin|healthz|readyz|metrics)\b"
    urls = re.findall(rf"https?://[^/\s\"']+(?={routes})", README.read_text(encoding="utf-8"))
    assert urls, "README shows no gateway URL"
    assert sorted({u.rsplit(":", 1)[-1] for u in urls}) == ["8080"], urls


def test_readme_watermark_key_recipe_makes_a_private_file(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    (line,) = [
        raw.split("  #", 1)[0]
        for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)
        for raw in block.splitlines()
        if "> secrets/watermark.keys" in raw
    ]
    (tmp_path / "secrets").mkdir()
    subprocess.run(["bash", "-ec", line], cwd=tmp_path, check=True, timeout=30)
    keys = tmp_path / "secrets" / "watermark.keys"
    assert keys.stat().st_mode & 0o777 == 0o600
    key_id, secret = keys.read_text().strip().split(": ")
    assert key_id == "k1" and len(base64.b64decode(secret, validate=True)) == 32

"""``bastion audit``: verify, retention, public-key, rotate-master-key."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, update
from typer.testing import CliRunner, Result

from compliance.audit_schema import entries
from compliance.signing import public_key_pem
from gateway.cli import app
from tests.compliance.conftest import MASTER_KEY, AppenderFactory
from tests.compliance.test_retention import aged_log
from tests.compliance.test_verify import build_log


@pytest.fixture
def key_file(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "signing.pem"
    path.write_bytes(
        signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BASTION_DATABASE_URL", "BASTION_SIGNING_KEY_FILE", "BASTION_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def audit(*args: str | Path) -> Result:
    return CliRunner().invoke(app, ["audit", *map(str, args)])


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_verify_says_ok_or_names_the_first_bad_entry(
    engine: Engine, make_appender: AppenderFactory, key_file: Path
) -> None:
    build_log(make_appender)
    ok = audit("verify", "--database-url", url_of(engine), "--signing-key-file", key_file)
    assert ok.exit_code == 0, ok.output
    assert "audit log OK: 30 entries in 1 chain(s), 3 checkpoint(s)" in ok.output
    in_two = audit(
        "verify", "--jobs", "2", "--database-url", url_of(engine), "--signing-key-file", key_file
    )
    assert in_two.exit_code == 0 and "30 entries" in in_two.output
    partial = audit(
        "verify",
        "--from",
        "w1:20",
        "--database-url",
        url_of(engine),
        "--signing-key-file",
        key_file,
    )
    assert partial.exit_code == 0 and "18 entries" in partial.output
    with engine.begin() as connection:
        connection.execute(update(entries).where(entries.c.seq == 17).values(status=201))
    bad = audit("verify", "--database-url", url_of(engine), "--signing-key-file", key_file)
    assert bad.exit_code == 1
    assert "first bad: entry w1:17: altered" in bad.output


def test_settings_from_the_environment_and_the_yaml(
    engine: Engine,
    make_appender: AppenderFactory,
    key_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build_log(make_appender)
    config = tmp_path / "bastion.yaml"
    config.write_text(
        yaml.safe_dump({"database_url": url_of(engine), "signing_key_file": str(key_file)})
    )
    assert audit("verify", "--config", config).exit_code == 0
    monkeypatch.setenv("BASTION_DATABASE_URL", url_of(engine))
    monkeypatch.setenv("BASTION_SIGNING_KEY_FILE", str(key_file))
    assert audit("verify").exit_code == 0
    stranger = tmp_path / "stranger.pem"
    stranger.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    untrusted = audit("verify", "--public-key", stranger)
    assert untrusted.exit_code == 1 and "unknown key" in untrusted.output


def test_usage_errors_exit_2(engine: Engine, tmp_path: Path, key_file: Path) -> None:
    no_key = audit("verify", "--database-url", url_of(engine))
    assert no_key.exit_code == 2 and "--public-key" in no_key.output
    bad_start = audit(
        "verify",
        "--from",
        "yesterday",
        "--database-url",
        url_of(engine),
        "--signing-key-file",
        key_file,
    )
    assert bad_start.exit_code == 2 and "neither an entry id" in bad_start.output
    empty = audit(
        "verify",
        "--database-url",
        f"sqlite:///{tmp_path / 'empty.db'}",
        "--signing-key-file",
        key_file,
    )
    assert empty.exit_code == 2 and "database" in empty.output


def test_retention_public_key_and_rotation(
    engine: Engine,
    make_appender: AppenderFactory,
    key_file: Path,
    tmp_path: Path,
    signing_key: Ed25519PrivateKey,
) -> None:
    aged_log(make_appender)
    common = ("--database-url", url_of(engine), "--signing-key-file", key_file)
    dry = audit("retention", "--dry-run", *common)
    assert dry.exit_code == 0 and "would delete 25 entries older than 90 days" in dry.output
    done = audit("retention", "--days", "90", *common)
    assert done.exit_code == 0 and "deleted 25 entries" in done.output and "w1: 25" in done.output
    assert audit("verify", *common).exit_code == 0
    shown = audit("public-key", "--signing-key-file", key_file)
    assert shown.output == public_key_pem(signing_key.public_key())
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    old.write_text(base64.b64encode(MASTER_KEY).decode())
    new.write_text(base64.b64encode(bytes(32)).decode())
    rotated = audit(
        "rotate-master-key",
        "--old-key-file",
        old,
        "--new-key-file",
        new,
        "--database-url",
        url_of(engine),
    )
    assert rotated.exit_code == 0 and "re-wrapped 1 data key(s)" in rotated.output

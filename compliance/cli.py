"""``bastion audit``: verify the log, apply retention, rotate the master key; and
``bastion compliance verify-receipt`` (:func:`verify_receipt_command`, registered on the
``compliance`` sub-app by compliance/export_cli.py, which imports this module).

Settings come from options, the ``BASTION_*`` environment, or the YAML file named by
``--config``/``BASTION_CONFIG`` (only its ``database_url`` and ``signing_key_file``), in
that order, as for the rest of ``bastion``. Exit status: 0 OK, 1 the log does not
verify (or retention refused a chain), 2 usage or configuration error.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError

from compliance.chain import parse_entry_id
from compliance.config_paths import resolve_database_url, resolve_path, sqlite_file
from compliance.erasure_receipt import ReceiptInvalid, attestation, check_receipt
from compliance.keyring import rotate_master_key
from compliance.retention import DEFAULT_DAYS, apply_retention
from compliance.signing import (
    SigningKeyError,
    fingerprint,
    load_public_key,
    load_signing_key,
    public_key_pem,
)
from compliance.verify import LogVerifier, Start

DEFAULT_DATABASE_URL = "sqlite:///bastion.db"  # as gateway.config.StoreSettings

audit_app = typer.Typer(
    help="Verify and maintain the tamper-evident audit log.", no_args_is_help=True
)
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="BASTION_CONFIG",
        dir_okay=False,
        help="YAML configuration (its database_url and signing_key_file are used).",
    ),
]
DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url", envvar="BASTION_DATABASE_URL", help="SQLAlchemy URL of the store."
    ),
]
SigningKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--signing-key-file",
        envvar="BASTION_SIGNING_KEY_FILE",
        dir_okay=False,
        help="Ed25519 private key (PEM) that signs checkpoints.",
    ),
]


def _fail(message: str, code: int = 2, command: str = "audit") -> NoReturn:
    print(f"bastion {command}: {message}", file=sys.stderr)
    raise typer.Exit(code=code)


def _from_yaml(config: Path | None, field: str) -> Any:
    if config is None:
        return None
    try:
        document = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"configuration error: cannot read {config}: {exc}")
    return document.get(field) if isinstance(document, dict) else None


def _configured_path(config: Path | None, field: str) -> Path | None:
    """A file named in the YAML, relative to the YAML's folder."""
    configured = _from_yaml(config, field)
    if not configured or config is None:
        return None
    return resolve_path(configured, config.absolute().parent)


def _database_url(url: str | None, config: Path | None) -> str:
    if not url:
        configured = _from_yaml(config, "database_url")
        if configured and config is not None:
            url = resolve_database_url(configured, config.absolute().parent)
    url = url or DEFAULT_DATABASE_URL
    for prefix in ("postgresql://", "postgres://"):  # psycopg 3, as gateway/store.py
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def _signing_key_path(path: Path | None, config: Path | None) -> Path | None:
    if path is not None:
        return path
    return _configured_path(config, "signing_key_file")


@contextmanager
def _engine(url: str | None, config: Path | None) -> Iterator[Engine]:
    resolved = _database_url(url, config)
    file = sqlite_file(resolved)
    if file is not None and not file.exists():
        # SQLite would create an empty file (a stray ./bastion.db): these commands
        # work on a log that exists, so say where they looked instead.
        _fail(
            f"no database at {file.absolute()}: name the store with --config, "
            "--database-url or BASTION_DATABASE_URL (bastion dev's: --config .bastion/dev.yaml)"
        )
    args = {"connect_args": {"timeout": 30}} if resolved.startswith("sqlite") else {}
    engine = create_engine(resolved, **args)
    try:
        yield engine
    except SQLAlchemyError as exc:
        where = engine.url.render_as_string()
        first = str(exc).splitlines()[0]
        missing = type(getattr(exc, "orig", None)).__name__ == "UndefinedTable"
        if missing or "no such table" in first:
            _fail(f"database {where} holds no audit log (not a Bastion store, or never started)")
        _fail(f"database {where}: {type(exc).__name__}: {first}")
    finally:
        engine.dispose()


def _parse_start(text: str) -> Start:
    try:
        writer_id, seq = parse_entry_id(text)
        return Start(writer_id=writer_id, seq=seq)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"--from: {text!r} is neither an entry id (WRITER:SEQ) nor an ISO 8601 time")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return Start(time_us=int(moment.timestamp() * 1_000_000))


def _trusted_keys(
    public_keys: list[Path] | None, signing_key: Path | None
) -> list[Ed25519PublicKey]:
    paths = list(public_keys or []) or ([signing_key] if signing_key else [])
    if not paths:
        _fail("no key to check signatures with: give --public-key or BASTION_SIGNING_KEY_FILE")
    try:
        return [load_public_key(p) for p in paths]
    except SigningKeyError as exc:
        _fail(str(exc))


@audit_app.command("verify")
def verify(
    start: Annotated[
        str | None,
        typer.Option("--from", help="Start at entry WRITER:SEQ, or at a time (ISO 8601)."),
    ] = None,
    public_key: Annotated[
        list[Path] | None,
        typer.Option(help="Trusted public key (PEM), repeatable; default: the signing key's."),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(help="Processes; 0: one per CPU (up to 8) for logs over a million entries."),
    ] = 0,
    database_url: DatabaseOption = None,
    signing_key_file: SigningKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Check every link and every checkpoint signature; exit 0 only if all hold."""
    keys = _trusted_keys(public_key, _signing_key_path(signing_key_file, config))
    begin = _parse_start(start) if start else None
    with _engine(database_url, config) as engine:
        verifier = LogVerifier(engine, keys)
        total = verifier.estimate() if begin is None else None
        if jobs <= 0:
            large = total is not None and total >= 1_000_000
            jobs = min(os.cpu_count() or 1, 8) if large else 1
        columns = (
            TextColumn("verifying"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task("verify", total=total)
            report = verifier.verify(begin, progress=lambda n: progress.advance(task, n), jobs=jobs)
    summary = (
        f"{report.entries:,} entries in {len(report.chains)} chain(s), "
        f"{report.checkpoints:,} checkpoint(s)"
    )
    # Entries after their chain's last checkpoint are linked but covered by no signature:
    # a live writer's latest (signed within audit.checkpoint_every_s), or a dead writer's
    # tail until a gateway starts and signs it (compliance/unsigned_tails.py).
    uncovered = (
        f"  {report.unsigned:,} entries are covered by no checkpoint (chained, not yet signed)"
    )
    if report.ok:
        typer.echo(f"audit log OK: {summary}")
        typer.echo(uncovered)
        return
    typer.echo(f"audit log FAILED ({summary})")
    typer.echo(uncovered)
    typer.echo(f"  first bad: {report.problems[0]}")
    for problem in report.problems[1:]:
        typer.echo(f"  also: {problem}")
    raise typer.Exit(code=1)


@audit_app.command("retention")
def retention(
    days: Annotated[
        float, typer.Option(help="Keep this many days (the EU AI Act asks at least 180).")
    ] = DEFAULT_DAYS,
    dry_run: Annotated[bool, typer.Option(help="Only say what would be deleted.")] = False,
    database_url: DatabaseOption = None,
    signing_key_file: SigningKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Delete entries older than --days; signed anchors keep the rest verifiable."""
    path = _signing_key_path(signing_key_file, config)
    if path is None:
        _fail("retention signs anchors: set --signing-key-file or BASTION_SIGNING_KEY_FILE")
    try:
        key = load_signing_key(path)
    except SigningKeyError as exc:
        _fail(str(exc))
    with _engine(database_url, config) as engine:
        result = apply_retention(engine, key, days=days, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {result.total:,} entries older than {days:g} days")
    for writer, count in sorted(result.deleted.items()):
        typer.echo(f"  {writer}: {count:,}")
    if result.refused:
        for problem in result.refused:
            typer.echo(f"  refused: {problem}")
        raise typer.Exit(code=1)


@audit_app.command("public-key")
def public_key(signing_key_file: SigningKeyOption = None, config: ConfigOption = None) -> None:
    """Print the public key that checks checkpoints (give it to auditors)."""
    path = _signing_key_path(signing_key_file, config)
    if path is None:
        _fail("set --signing-key-file or BASTION_SIGNING_KEY_FILE")
    try:
        typer.echo(public_key_pem(load_public_key(path)), nl=False)
    except SigningKeyError as exc:
        _fail(str(exc))


def _read_master_key(path: Path) -> bytes:
    try:
        key = base64.b64decode(path.read_text(encoding="utf-8").strip(), validate=True)
    except OSError as exc:
        _fail(f"cannot read {path} ({exc.strerror})")
    except (binascii.Error, ValueError):
        _fail(f"{path}: not valid base64")
    if len(key) != 32:
        _fail(f"{path}: must decode to 32 bytes, not {len(key)}")
    return key


@audit_app.command("rotate-master-key")
def rotate(
    old_key_file: Annotated[Path, typer.Option(help="The master key in force (base64).")],
    new_key_file: Annotated[Path, typer.Option(help="The master key to move to (base64).")],
    database_url: DatabaseOption = None,
    config: ConfigOption = None,
) -> None:
    """Re-wrap every audit data key under a new master key; entries are untouched."""
    old, new = _read_master_key(old_key_file), _read_master_key(new_key_file)
    with _engine(database_url, config) as engine:
        result = rotate_master_key(engine, old, new)
    typer.echo(f"re-wrapped {result.rewrapped:,} data key(s)")
    if result.foreign:
        typer.echo(f"  {result.foreign:,} data key(s) are wrapped under neither key: left alone")
        raise typer.Exit(code=1)


def verify_receipt_command(
    file: Annotated[
        Path, typer.Argument(dir_okay=False, help="The receipt (JSON), as erasure answered it.")
    ],
    public_key: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="The audit public key (PEM, `bastion audit public-key`); default: the "
            "signing key's.",
        ),
    ] = None,
    signing_key_file: SigningKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Check a signed erasure receipt; exit 0 and say what it attests only if it holds."""
    path = public_key or _signing_key_path(signing_key_file, config)
    if path is None:
        _fail(
            "no key to check the signature with: give --public-key or BASTION_SIGNING_KEY_FILE",
            command="compliance verify-receipt",
        )
    try:
        key = load_public_key(path)
        text = file.read_text(encoding="utf-8")
    except SigningKeyError as exc:
        _fail(str(exc), command="compliance verify-receipt")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {file}: {exc}", command="compliance verify-receipt")
    try:
        receipt = check_receipt(json.loads(text), key)
    except json.JSONDecodeError:
        typer.echo(f"{file}: INVALID: not an erasure receipt (not JSON)")
        raise typer.Exit(code=1) from None
    except ReceiptInvalid as exc:
        typer.echo(f"{file}: INVALID: {exc}")
        raise typer.Exit(code=1) from None
    typer.echo(f"{file}: valid erasure receipt, signed by {fingerprint(key)}; it attests:")
    for line in attestation(receipt):
        typer.echo(f"  {line}")
    if receipt.get("signer") != fingerprint(key):
        typer.echo(f"  (its unsigned signer field reads {receipt.get('signer')!r})")

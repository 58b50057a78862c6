"""What several ``bastion`` commands share: the error line, settings, the store, the audit."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import (
    CONFIG_ENV_VAR,
    ConfigError,
    Settings,
    StoreSettings,
    load_settings,
    load_store_settings,
)

err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"YAML configuration file (default: ${CONFIG_ENV_VAR}).",
        dir_okay=False,
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``bastion: MESSAGE`` on stderr and exit with ``code`` (2: usage or config)."""
    print(f"bastion: {message}", file=sys.stderr)
    raise typer.Exit(code=code)


def load(config: Path | None, **overrides: Any) -> Settings:
    """The gateway's settings, or exit 2 with one line naming the bad field."""
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def prepare_store(settings: StoreSettings, create: bool = True) -> None:
    """Check the secrets and bring the database schema up to date, once, before workers.

    ``create=False`` (commands that work on a store the gateway made): a SQLite file
    that does not exist is an error naming where it was looked for, not a new database.
    """
    from compliance.config_paths import sqlite_file
    from gateway.credentials import load_audit_signing_key, load_master_key
    from gateway.store import make_engine, migrate

    try:
        load_master_key(settings)
        if isinstance(settings, Settings) and settings.audit.enabled:
            load_audit_signing_key(settings)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
    file = sqlite_file(settings.database_url)
    if not create and file is not None and not file.exists():
        fail(
            f"no database at {file.absolute()}: name the store with --config or "
            "BASTION_DATABASE_URL (bastion dev's: --config .bastion/dev.yaml)"
        )
    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
    except SQLAlchemyError as exc:
        fail(f"database {engine.url.render_as_string()}: {type(exc).__name__}: {exc.args[0]}")
    finally:
        engine.dispose()


def key_store(config: Path | None) -> Any:
    """The API key store of the configured database (schema brought up to date)."""
    return open_keys(config)[0]


def open_keys(config: Path | None, create: bool = False) -> tuple[Any, Any]:
    """``(KeyStore, KeyHasher)`` of the configured database and master key.

    The database must exist unless ``create`` (``bastion dev``'s first start)."""
    from gateway.credentials import derive_key, load_master_key
    from gateway.keys import KeyHasher, KeyStore
    from gateway.store import make_engine

    try:
        settings = load_store_settings(config)
        pepper = derive_key(load_master_key(settings), "api-key-pepper")
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
    prepare_store(settings, create=create)
    hasher = KeyHasher(pepper)
    return KeyStore(make_engine(settings.database_url), hasher), hasher


def audit_action(config: Path | None, kind: str, detail: dict[str, Any]) -> None:
    """Record an administrative action taken from the CLI in the audit log.

    A short chain of its own (one entry and a signed final checkpoint). Without a
    signing key (a store-only set-up) the action is done but not recorded: say so.
    """
    from compliance.appender import ChainAppender
    from compliance.keyring import KeyRing
    from compliance.records import AuditRecord
    from gateway.credentials import load_audit_signing_key, load_master_key
    from gateway.store import make_engine

    settings = load_store_settings(config)
    try:
        signing_key = load_audit_signing_key(settings)
        master_key = load_master_key(settings)
    except ConfigError as exc:
        err.print(f"[yellow]not recorded in the audit log[/]: {exc}", soft_wrap=True)
        return
    engine = make_engine(settings.database_url)
    try:
        appender = ChainAppender(engine, KeyRing(engine, master_key), signing_key)
        appender.append(AuditRecord(kind=kind, key_id=None, route="cli", status=0, detail=detail))
        appender.close()
    finally:
        engine.dispose()

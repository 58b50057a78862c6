"""``bastion compliance``: signed exports of the audit log, made and checked offline.

``export`` builds the same bundle as ``POST /compliance/exports`` straight from the
database (and records the export in the log, as the API does); ``verify-export`` needs
only the bundle and the audit public key. Exit status: 0 OK, 1 the bundle does not
verify (or the export failed), 2 usage or configuration error.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from compliance.appender import ChainAppender
from compliance.chain import default_writer_id
from compliance.cli import (
    ConfigOption,
    DatabaseOption,
    SigningKeyOption,
    _configured_path,
    _engine,
    _signing_key_path,
    verify_receipt_command,
)
from compliance.export_bundle import ExportError, ExportQuery, build_export, export_records
from compliance.export_verify import bundle_size, verify_export
from compliance.keyring import KeyRing
from compliance.signing import SigningKeyError, load_public_key, load_signing_key

compliance_app = typer.Typer(
    help="Signed exports of the audit log for auditors, their offline check, erasure receipts.",
    no_args_is_help=True,
)
compliance_app.command("verify-receipt")(verify_receipt_command)
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"bastion compliance: {message}", file=sys.stderr)
    raise typer.Exit(code=code)


def _time_us(text: str, option: str) -> int:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"{option}: {text!r} is not an ISO 8601 time")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def _master_key(path: Path | None) -> bytes:
    text = os.environ.get("BASTION_MASTER_KEY")
    source = "BASTION_MASTER_KEY"
    if path is not None:
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            _fail(f"cannot read {path} ({exc.strerror})")
    if not text:
        _fail("no master key: set BASTION_MASTER_KEY, --master-key-file or master_key_file")
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        _fail(f"{source}: not valid base64")
    if len(key) != 32:
        _fail(f"{source}: must decode to 32 bytes, not {len(key)}")
    return key


def _progress(label: str) -> Progress:
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=err, transient=True)


@compliance_app.command("export")
def export(
    since: Annotated[str, typer.Option(help="From this time (ISO 8601, UTC if no zone).")],
    until: Annotated[str, typer.Option(help="Up to this time, excluded (ISO 8601).")],
    output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="Bundle file.")],
    subject: Annotated[
        list[str] | None, typer.Option(help="Only this data subject's entries (repeatable).")
    ] = None,
    key: Annotated[
        list[str] | None, typer.Option(help="Only this API key id's entries (repeatable).")
    ] = None,
    payloads: Annotated[bool, typer.Option(help="Decrypt and include the payloads.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why payloads are opened (audited).")] = None,
    third_party: Annotated[
        bool, typer.Option(help="For a third party: leave out do-not-sell subjects (CCPA).")
    ] = False,
    master_key_file: Annotated[
        Path | None,
        typer.Option(envvar="BASTION_MASTER_KEY_FILE", help="Master key (base64) file."),
    ] = None,
    database_url: DatabaseOption = None,
    signing_key_file: SigningKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Write a signed bundle of the entries asked for; the export is itself audited."""
    try:
        query = ExportQuery(
            _time_us(since, "--since"),
            _time_us(until, "--until"),
            tuple(subject) if subject else None,
            tuple(key) if key else None,
            payloads,
            reason,
            third_party,
        )
    except ExportError as exc:
        _fail(str(exc))
    path = _signing_key_path(signing_key_file, config)
    if path is None:
        _fail("exports are signed: set --signing-key-file or BASTION_SIGNING_KEY_FILE")
    try:
        signing_key = load_signing_key(path)
    except SigningKeyError as exc:
        _fail(str(exc))
    master = _master_key(master_key_file or _configured_path(config, "master_key_file"))
    with _engine(database_url, config) as engine, _progress("exporting") as progress:
        task = progress.add_task("export", total=None)
        keyring = KeyRing(engine, master)
        directory = Path(tempfile.mkdtemp(dir=output.parent if output.parent.exists() else None))
        try:
            result = build_export(
                engine,
                keyring,
                signing_key,
                query,
                directory,
                progress=lambda n: progress.advance(task, n),
            )
            appender = ChainAppender(engine, keyring, signing_key, default_writer_id("cli-export"))
            appender.append_batch(
                export_records(
                    query,
                    result,
                    key_id=None,
                    request_id=None,
                    route="cli:compliance export",
                )
            )
            appender.close()
            shutil.move(result.path, output)
        except ExportError as exc:
            _fail(str(exc), code=1)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    typer.echo(
        f"exported {result.entries:,} entries to {output} "
        f"(export {result.export_id}, manifest sha256 {result.manifest_sha256})"
    )


@compliance_app.command("verify-export")
def verify_export_command(
    bundle: Annotated[Path, typer.Argument(dir_okay=False, help="The export bundle (.tar).")],
    public_key: Annotated[
        Path | None,
        typer.Option(help="The audit public key (PEM) to trust; default: the manifest's."),
    ] = None,
) -> None:
    """Check the signature, every file hash, every entry and its link to a signed head."""
    trusted = None
    if public_key is not None:
        try:
            trusted = load_public_key(public_key)
        except SigningKeyError as exc:
            _fail(str(exc))
    with _progress("verifying") as progress:
        task = progress.add_task("verify", total=bundle_size(bundle) or None)
        check = verify_export(bundle, trusted, lambda n: progress.advance(task, n))
    for note in check.notes:
        typer.echo(f"note: {note}")
    if not check.ok:
        typer.echo(f"export FAILED: {check.problem}")
        raise typer.Exit(code=1)
    typer.echo(
        f"export OK: {check.entries:,} entries linked to {check.checkpoints:,} signed "
        f"checkpoint(s), signed by {check.signer}"
    )

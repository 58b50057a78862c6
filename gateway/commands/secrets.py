"""``bastion secrets``: create the master key and the audit signing key."""

from __future__ import annotations

from pathlib import Path

import typer

from gateway.commands.common import err, fail

secrets_app = typer.Typer(help="Create the secrets Bastion needs.", no_args_is_help=True)


@secrets_app.command("create-master-key")
def create_master_key(path: Path) -> None:
    """Write a new random master key (base64, mode 0600) to PATH."""
    from gateway.credentials import create_key_file

    try:
        create_key_file(path)
    except FileExistsError:
        fail(f"{path} exists; not overwriting a master key")
    err.print(f"master key written to {path}; set BASTION_MASTER_KEY_FILE={path.resolve()}")


@secrets_app.command("create-signing-key")
def create_signing_key(path: Path) -> None:
    """Write a new Ed25519 private key (PEM, mode 0600) for audit checkpoints to PATH."""
    from compliance.signing import create_signing_key_file, fingerprint

    try:
        key = create_signing_key_file(path)
    except FileExistsError:
        fail(f"{path} exists; not overwriting a signing key")
    err.print(
        f"signing key {fingerprint(key.public_key())} written to {path}; "
        f"set BASTION_SIGNING_KEY_FILE={path.resolve()}"
    )

"""``bastion keys``: create, list and revoke API keys (the operator's way, with the master key)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from compliance.records import KEY_CREATED, KEY_REVOKED
from gateway.commands.common import ConfigOption, audit_action, err, fail, key_store
from gateway.config import ROLES

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    role: Annotated[
        list[str], typer.Option("--role", "-r", help=f"One of {', '.join(ROLES)}; repeatable.")
    ],
    subject: Annotated[
        str | None, typer.Option(help="The data subject (person) the key acts for.")
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated model allow-list for this key.")
    ] = None,
    tier: Annotated[str, typer.Option(help="Scheduling tier (see priority.tiers).")] = "standard",
    expires: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 30d, 12h, 1w (default: never).")
    ] = None,
    description: Annotated[str, typer.Option(help="A note for admins.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Create a key and print it. It is shown this once: only its hash is stored."""
    from gateway.keys import parse_duration

    try:
        lifetime = parse_duration(expires) if expires else None
    except ValueError as exc:
        fail(f"--expires: {exc}")
    unknown = [r for r in role if r not in ROLES]
    if unknown:
        fail(f"--role: unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    model_list = [m.strip() for m in models.split(",") if m.strip()] if models else None
    store = key_store(config)
    key, info = store.create(
        role,
        subject_id=subject,
        models=model_list,
        tier=tier,
        expires_in=lifetime,
        description=description,
    )
    audit_action(config, KEY_CREATED, {"key": info.as_audit_json(), "via": "cli"})
    if as_json:
        typer.echo(json.dumps({**info.as_json(), "key": key}))
        return
    typer.echo(key)
    err.print(f"key id {info.id}, roles {', '.join(info.roles)}: store it now, it is not kept.")


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option(help="Show revoked keys too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List keys (never their secrets)."""
    keys = key_store(config).all(include_revoked)
    if as_json:
        typer.echo(json.dumps([k.as_json() for k in keys]))
        return
    table = Table("id", "roles", "subject", "models", "tier", "expires", "revoked")
    for k in keys:
        table.add_row(
            k.id,
            ",".join(k.roles),
            k.subject_id or "",
            ",".join(k.models) if k.models is not None else "*",
            k.tier,
            k.expires_at.isoformat(timespec="seconds") if k.expires_at else "never",
            k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "",
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOption = None) -> None:
    """Revoke a key; every gateway process refuses it within auth.key_refresh_s."""
    info = key_store(config).revoke(key_id)
    if info is None:
        fail(f"there is no key {key_id!r}")
    audit_action(config, KEY_REVOKED, {"key_id": key_id, "via": "cli"})
    typer.echo(f"revoked {key_id}")

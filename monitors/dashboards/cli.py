"""``bastion dashboards build|push`` (also ``python -m monitors.dashboards build``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from monitors.dashboards.slo import SloSettings, load_slo_settings

# The SDK and the HTTP client load only when a command runs (about a third of a second):
# this app is mounted in `bastion`, whose other commands should not pay for them.
DEFAULT_FOLDER_UID = "bastion"
DEFAULT_FOLDER_TITLE = "Bastion"

dashboards_app = typer.Typer(
    help="Grafana dashboards and Prometheus rules as code: build the files, push to Grafana.",
    no_args_is_help=True,
)

SettingsOption = Annotated[
    Path | None,
    typer.Option(
        "--settings",
        help="YAML of SLO objectives and alert bounds (docs/dashboards.md); default: the "
        "objectives the committed files use.",
        exists=True,
        dir_okay=False,
    ),
]


def _settings(path: Path | None) -> SloSettings:
    try:
        return load_slo_settings(path)
    except (ValidationError, ValueError, OSError) as exc:
        typer.echo(f"error: {path}: {exc}", err=True)
        raise typer.Exit(2) from exc


@dashboards_app.command("build")
def build_command(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Where grafana/ and prometheus/rules/ are written.", file_okay=False
        ),
    ] = Path("dashboards"),
    settings: SettingsOption = None,
) -> None:
    """Write the dashboards' JSON and the Prometheus rule files."""
    from monitors.dashboards.build import write

    for path in write(out, _settings(settings)):
        typer.echo(str(path))


def _credential(
    token_file: Path | None, user: str | None, password_file: Path | None
) -> str | tuple[str, str]:
    if token_file is not None:
        return token_file.read_text().strip()
    if user is not None:
        if password_file is None:
            typer.echo("error: --user needs --password-file", err=True)
            raise typer.Exit(2)
        return (user, password_file.read_text().strip())
    token = os.environ.get("GRAFANA_TOKEN")
    if token:
        return token
    typer.echo("error: give --token-file, --user with --password-file, or GRAFANA_TOKEN", err=True)
    raise typer.Exit(2)


@dashboards_app.command("push")
def push_command(
    url: Annotated[
        str, typer.Option(envvar="GRAFANA_URL", help="Grafana's base URL.")
    ] = "http://127.0.0.1:3000",
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding a service-account token (Editor role or more).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="Basic-auth user (with --password-file).")
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option(help="File holding that user's password.", exists=True, dir_okay=False),
    ] = None,
    folder_uid: Annotated[str, typer.Option(help="The folder's uid.")] = DEFAULT_FOLDER_UID,
    folder_title: Annotated[str, typer.Option(help="The folder's title.")] = DEFAULT_FOLDER_TITLE,
    settings: SettingsOption = None,
) -> None:
    """Create or update a folder on a running Grafana and put every dashboard in it."""
    from monitors.dashboards.build import dashboard_json, dashboards
    from monitors.dashboards.push import PushError, connect, push

    credential = _credential(token_file, user, password_file)
    documents = {
        uid: dashboard_json(board) for uid, board in dashboards(_settings(settings)).items()
    }
    try:
        result = push(connect(url, credential), documents, folder_uid, folder_title)
    except PushError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    verb = "created" if result.folder_created else "updated"
    typer.echo(f"folder {result.folder_uid}: {verb}")
    for answer in result.dashboards:
        link = f"{url.rstrip('/')}{answer.get('url', '')}"
        typer.echo(f"{answer.get('uid')}: version {answer.get('version')} {link}")

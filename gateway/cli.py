"""The ``bastion`` command line: the top-level typer app (pyproject's ``gateway.cli:app``).

Each topic is a module of :mod:`gateway.commands` (or compliance/'s CLI modules); this
file only mounts them, in the order ``bastion --help`` lists them. A new topic is a
typer app in its own module, mounted below with ``app.add_typer(..., name=...)``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from compliance.cli import audit_app
from compliance.export_cli import compliance_app
from gateway.commands.common import load
from gateway.commands.config import config_app
from gateway.commands.dev import dev
from gateway.commands.inference import inference_app
from gateway.commands.keys import keys_app
from gateway.commands.monitor import anomalies_app, monitor_app
from gateway.commands.secrets import secrets_app
from gateway.commands.serve import serve
from monitors.dashboards.cli import dashboards_app
from monitors.events.cli import make_events_app

app = typer.Typer(
    help="Bastion: a secure, observable, compliance-ready gateway for self-hosted LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"bastion {version('bastion')}")
        except PackageNotFoundError:  # a source tree that was never installed
            typer.echo("bastion (not installed: no version)")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    pass


# Top-level commands.
app.command()(serve)
app.command()(dev)

# Topics, one typer app each.
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
app.add_typer(secrets_app, name="secrets")
app.add_typer(inference_app, name="inference")
app.add_typer(audit_app, name="audit")
app.add_typer(compliance_app, name="compliance")
# Observability topics: monitors/ knows nothing of the gateway's configuration, so each
# gets the loader that reads it.
app.add_typer(make_events_app(lambda path: load(path).events), name="events")
app.add_typer(dashboards_app, name="dashboards")
app.add_typer(monitor_app, name="monitor")
app.add_typer(anomalies_app, name="anomalies")


if __name__ == "__main__":
    app()

"""``bastion events setup``: install the index template and the lifecycle policy.

Mounted by the gateway's CLI with ``app.add_typer(make_events_app(loader), name="events")``
where ``loader(config_path)`` returns the configuration's :class:`EventSettings`, or with
the plain ``events_app`` (options and ``BASTION_ELASTICSEARCH_URL`` only). Options given on
the command line win over the configuration file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from monitors.events.cluster import Cluster, ClusterRejected, ClusterUnavailable, SetupReport
from monitors.events.settings import URL_ENV, EventSettings, cluster_auth

SettingsLoader = Callable[[Path | None], EventSettings]


async def _setup(settings: EventSettings, force: bool) -> SetupReport:
    async with Cluster(settings, cluster_auth(settings)) as cluster:
        return await cluster.ensure_setup(force=force)


def make_events_app(loader: SettingsLoader | None = None) -> typer.Typer:
    """The ``events`` command group; ``loader`` reads ``--config`` (None: options only)."""
    events_app = typer.Typer(
        help="Request events in Elasticsearch/OpenSearch.", no_args_is_help=True
    )

    @events_app.command("setup")
    def setup(
        config: Path | None = typer.Option(
            None, "--config", envvar="BASTION_CONFIG", help="Gateway configuration (YAML)."
        ),
        url: str | None = typer.Option(None, "--url", envvar=URL_ENV, help="Cluster URL."),
        username: str | None = typer.Option(None, help="Basic auth user (password from env)."),
        password_file: Path | None = typer.Option(None, help="File holding the password."),
        api_key_file: Path | None = typer.Option(None, help="File holding the API key."),
        ca_file: Path | None = typer.Option(None, help="PEM CA bundle for the cluster."),
        retention_days: int | None = typer.Option(None, min=1, help="Delete events after."),
        dataset: str | None = typer.Option(None, help="Data stream dataset part."),
        namespace: str | None = typer.Option(None, help="Data stream namespace part."),
        force: bool = typer.Option(False, help="Reinstall even when present and current."),
    ) -> None:
        """Install (or update) the index template and the lifecycle policy, and say what
        was done. Exit 1 when the cluster cannot be reached or refuses."""
        base = loader(config) if loader is not None and config is not None else EventSettings()
        overrides: dict[str, Any] = {
            key: value
            for key, value in {
                "url": url,
                "username": username,
                "password_file": password_file,
                "api_key_file": api_key_file,
                "ca_file": ca_file,
                "retention_days": retention_days,
                "dataset": dataset,
                "namespace": namespace,
            }.items()
            if value is not None
        }
        try:
            settings = EventSettings.model_validate({**base.model_dump(), **overrides})
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if settings.url is None:
            typer.echo(f"error: no cluster URL (--url, {URL_ENV} or events.url)", err=True)
            raise typer.Exit(2)
        try:
            report = asyncio.run(_setup(settings, force))
        except (ClusterUnavailable, ClusterRejected, ValueError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        for line in report.lines():
            typer.echo(line)

    return events_app


events_app = make_events_app()

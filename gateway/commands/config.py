"""``bastion config``: inspect the configuration."""

from __future__ import annotations

import typer
import yaml

from gateway.commands.common import ConfigOption, load

config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration and print it as resolved (secrets hidden)."""
    settings = load(config)
    shown = settings.model_dump(mode="json", exclude={"upstreams": {"__all__": {"api_key"}}})
    typer.echo(yaml.safe_dump(shown, sort_keys=False))

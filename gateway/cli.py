"""The ``bastion`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console

from gateway.config import CONFIG_ENV_VAR, ConfigError, Settings, load_settings

app = typer.Typer(
    help="Bastion: a secure, observable, compliance-ready gateway for self-hosted LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

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


def _fail(message: str) -> NoReturn:
    print(f"bastion: {message}", file=sys.stderr)
    raise typer.Exit(code=2)


def _load(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_server(settings: Settings, config: Path | None, log_level: str, access_log: bool) -> None:
    import importlib.util

    import uvicorn

    server = settings.server
    tls = server.tls
    options: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "log_level": log_level,
        "access_log": access_log,
        "proxy_headers": False,
        "server_header": False,
        "timeout_graceful_shutdown": 10,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "ssl_certfile": str(tls.certfile) if tls else None,
        "ssl_keyfile": str(tls.keyfile) if tls else None,
    }
    if server.workers > 1:
        # Worker processes build their own app from the same file and environment.
        if config is not None:
            os.environ[CONFIG_ENV_VAR] = str(config.resolve())
        uvicorn.run("gateway.app:create_app", factory=True, workers=server.workers, **options)
        return
    from gateway.app import build_app

    uvicorn.run(build_app(settings), **options)


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "warning",
    access_log: Annotated[bool, typer.Option(help="Log every request line.")] = False,
) -> None:
    """Run the gateway."""
    server = {"host": host, "port": port, "workers": workers}
    overrides = {k: v for k, v in server.items() if v is not None}
    settings = _load(config, server=overrides or None)
    _configure_logging(log_level)
    _run_server(settings, config, log_level, access_log)


def _discover_models(upstream: str) -> list[str]:
    url = upstream.rstrip("/") + "/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            listing = json.load(response)
        return [m["id"] for m in listing["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        _fail(f"cannot list the models of {url} ({exc}); name them with --model")


@app.command()
def dev(
    upstream: Annotated[
        str | None,
        typer.Option(help="URL of an OpenAI-compatible server (e.g. vLLM) to put behind Bastion."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(help="Model served by the upstream (default: ask its /v1/models)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port.")] = 8080,
) -> None:
    """Run the embedded default: the gateway in a development setup on one machine.

    Until the local inference tier lands, it needs --upstream: any OpenAI-compatible server.
    """
    if upstream is None:
        _fail("bastion dev needs --upstream URL (an OpenAI-compatible server, e.g. vLLM)")
    models = model or _discover_models(upstream)
    document = {
        "dev": True,
        "server": {"host": host, "port": port},
        "upstreams": [{"name": "dev", "url": upstream, "models": models}],
    }
    config_dir = Path(tempfile.mkdtemp(prefix="bastion-dev-"))
    config_path = config_dir / "bastion.yaml"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    settings = _load(config_path)
    err.print(f"[bold green]Bastion dev gateway[/] on http://{host}:{port}/v1")
    err.print(f"  upstream {upstream} serving {', '.join(models)}; config in {config_path}")
    err.print("  Ctrl-C stops it.")
    _configure_logging("warning")
    _run_server(settings, config_path, "warning", access_log=False)


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration and print it as resolved (secrets hidden)."""
    settings = _load(config)
    shown = settings.model_dump(mode="json", exclude={"upstreams": {"__all__": {"api_key"}}})
    typer.echo(yaml.safe_dump(shown, sort_keys=False))


if __name__ == "__main__":
    app()

"""``bastion serve``: run the gateway (one process, or uvicorn's workers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.commands.common import ConfigOption, configure_logging, fail, load, prepare_store
from gateway.config import CONFIG_ENV_VAR, ConfigError, Settings


def run_server(settings: Settings, config: Path | None, log_level: str, access_log: bool) -> None:
    """Check secrets and schema, then run uvicorn with the gateway until it stops."""
    import importlib.util

    import uvicorn

    from gateway.ratelimit import check_workers_rate_limits

    try:
        check_workers_rate_limits(settings, settings.server.workers)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
    prepare_store(settings)
    if settings.watermark.enabled:
        from gateway.watermark_check import load_watermark_keys

        try:
            load_watermark_keys(settings.watermark)
        except ConfigError as exc:
            fail(f"configuration error: {exc}")

    from gateway.tls import LISTENER_PROTOCOL, TLSConfigError, uvicorn_options

    server = settings.server
    tls = server.tls
    http_parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    options: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "log_level": log_level,
        "access_log": access_log,
        "proxy_headers": False,
        "server_header": False,
        "timeout_graceful_shutdown": 10,
        # gateway.listener bounds a request's head by it (uvicorn's h11 as well).
        "h11_max_incomplete_event_size": server.max_header_bytes,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        # httptools through gateway.listener (writes coalesced per loop turn), else h11.
        "http": LISTENER_PROTOCOL if http_parser == "httptools" else "h11",
    }
    if tls is not None:
        try:
            options.update(uvicorn_options(tls, http_parser))
        except TLSConfigError as exc:
            fail(f"configuration error: {exc}")
    if server.workers > 1:
        # Worker processes build their own app from the same file and environment.
        if config is not None:
            os.environ[CONFIG_ENV_VAR] = str(config.resolve())
        uvicorn.run("gateway.app:create_app", factory=True, workers=server.workers, **options)
        return
    from gateway.app import build_app

    uvicorn.run(build_app(settings), **options)


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
    settings = load(config, server=overrides or None)
    configure_logging(log_level)
    run_server(settings, config, log_level, access_log)

"""``bastion serve``: run the gateway (one process, or uvicorn's workers)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.commands.common import ConfigOption, configure_logging, fail, load, prepare_store
from gateway.config import CONFIG_ENV_VAR, ConfigError, Settings

if TYPE_CHECKING:
    import uvicorn


def run_server(
    settings: Settings,
    config: Path | None,
    log_level: str | None,
    access_log: bool,
    on_server: Callable[[uvicorn.Server], None] | None = None,
) -> None:
    """Check secrets and schema, then run uvicorn with the gateway until it stops.

    ``log_level`` (the command line's) wins over ``logging.level``; ``access_log`` adds
    uvicorn's own request lines to the gateway's access log. ``on_server`` receives the
    (one-process) server before it starts, so that a caller can stop it
    (``should_exit``) from a signal handler at any moment of its start-up.
    """
    import importlib.util

    import uvicorn

    from monitors.logs import configure_logging, uvicorn_log_options

    if log_level is not None:
        logging_settings = settings.logging.model_copy(update={"level": log_level.lower()})
        settings = settings.model_copy(update={"logging": logging_settings})
    configure_logging(settings.logging, dev=settings.dev)

    from gateway.ratelimit import check_workers_rate_limits
    from gateway.uvicorn_pin import UvicornMismatch, check_uvicorn

    try:
        check_workers_rate_limits(settings, settings.server.workers)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
    try:
        check_uvicorn()  # gateway/listener.py's copies of uvicorn code
    except UvicornMismatch as exc:
        fail(str(exc))
    prepare_store(settings)
    from gateway.listener import BODY_TIMEOUT_ENV

    # The listener reads it in every worker (gateway/listener.py).
    os.environ[BODY_TIMEOUT_ENV] = str(settings.server.body_timeout_s)
    if settings.watermark.enabled:
        from gateway.watermark.keys import load_watermark_keys

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
        **uvicorn_log_options(settings.logging, dev=settings.dev, uvicorn_access=access_log),
        "proxy_headers": False,
        "server_header": False,
        "timeout_graceful_shutdown": server.shutdown_grace_s,
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
        # One /metrics for all workers: their metric files' directory must be in the
        # environment before uvicorn spawns them (monitors/multiprocess.py says why).
        from monitors.multiprocess import MultiprocessDirError, prepare_multiprocess_dir

        try:
            directory = prepare_multiprocess_dir(None)
        except MultiprocessDirError as exc:
            fail(f"metrics: {exc}")
        if server.metrics_listen:
            from monitors.metrics_listener import serve_metrics_listener

            serve_metrics_listener(server.metrics_listen, directory)
        uvicorn.run("gateway.app:create_app", factory=True, workers=server.workers, **options)
        return
    if server.metrics_listen:
        from monitors.metrics_listener import serve_metrics_listener

        serve_metrics_listener(server.metrics_listen, None)
    from gateway.app import build_app

    # uvicorn.run(app, **options), with the server object in hand.
    uvicorn_config = uvicorn.Config(build_app(settings), **options)
    server_ = uvicorn.Server(uvicorn_config)
    if on_server is not None:
        on_server(server_)
    with contextlib.suppress(KeyboardInterrupt):
        server_.run()
    if not server_.started and not server_.should_exit:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run


def with_dev_secrets(settings: Settings, config: Path | None) -> Settings:
    """A ``dev: true`` configuration that names no secrets gets them beside its file.

    In the folder of the configuration file (``.bastion/`` without one), created once
    (:func:`gateway.credentials.ensure_dev_secrets`) and then found again by every
    command given the same configuration; their paths are put in the environment, so
    that uvicorn's workers read the same. Other settings are returned unchanged.
    """
    from gateway.credentials import DEV_SECRETS_DIR, ensure_dev_secrets

    need_master = settings.master_key is None and settings.master_key_file is None
    need_signing = settings.audit.enabled and settings.signing_key_file is None
    if not settings.dev or not (need_master or need_signing):
        return settings
    named = config if config is not None else os.environ.get(CONFIG_ENV_VAR)
    directory = Path(named).absolute().parent if named else DEV_SECRETS_DIR
    secrets = ensure_dev_secrets(directory, master=need_master, signing=need_signing)
    for path in secrets.created:
        logging.getLogger("bastion.credentials").warning("dev setup: created %s", path)
    update: dict[str, Path] = {}
    if need_master:
        update["master_key_file"] = secrets.master_key_file
        os.environ["BASTION_MASTER_KEY_FILE"] = str(secrets.master_key_file)
    if need_signing:
        update["signing_key_file"] = secrets.signing_key_file
        os.environ["BASTION_SIGNING_KEY_FILE"] = str(secrets.signing_key_file)
    return settings.model_copy(update=update)


def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning, error (default: logging.level).")
    ] = None,
    access_log: Annotated[
        bool, typer.Option(help="uvicorn's request lines too (the access log has one each).")
    ] = False,
) -> None:
    """Run the gateway."""
    server = {"host": host, "port": port, "workers": workers}
    overrides = {k: v for k, v in server.items() if v is not None}
    settings = load(config, server=overrides or None)
    configure_logging(log_level or settings.logging.level)
    run_server(with_dev_secrets(settings, config), config, log_level, access_log)

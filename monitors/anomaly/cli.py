"""``bastion monitor`` (the scorer as its own process) and ``bastion anomalies list``.

The gateway's CLI mounts :data:`monitor_app` and :data:`anomalies_app` (or apps made by
:func:`make_apps` with its own loader, e.g. one built on the gateway's configuration).
The default loader takes the database from ``--database-url``/``BASTION_DATABASE_URL``
(or the YAML's ``database_url``), the ``anomaly:`` section of the YAML named by
``--config``/``BASTION_CONFIG``, and the model's MAC key from the master key
(``BASTION_MASTER_KEY`` or ``BASTION_MASTER_KEY_FILE``), derived as the gateway derives
its keys (HKDF-SHA256, info ``bastion/anomaly-model/v1``).

``bastion monitor`` holds the ``anomaly-scorer`` lease while it runs (a gateway with
``anomaly.score_in_process`` then only records events), prints each flag as a JSON line,
and hands it to the loader's callbacks. Exit status: 0, or 2 for a usage or
configuration error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import ValidationError
from sqlalchemy import Engine, create_engine

from monitors.anomaly import store
from monitors.anomaly.features import FAMILIES
from monitors.anomaly.monitor import FlagCallback, deliver
from monitors.anomaly.scorer import AnomalyScorer, detector_status, iso
from monitors.anomaly.settings import AnomalySettings

DEFAULT_DATABASE_URL = "sqlite:///bastion.db"


@dataclass
class MonitorContext:
    engine: Engine
    settings: AnomalySettings
    mac_key: bytes
    on_flag: list[FlagCallback] = field(default_factory=list)
    lifespan: Callable[[], AbstractAsyncContextManager[Any]] | None = None
    """Entered around the monitor's loop, in its event loop: e.g. the audit trail that
    the ``on_flag`` callbacks write to, started and stopped."""


Loader = Callable[[Path | None, str | None], MonitorContext]
"""``(config file, database URL option)`` -> what the commands need."""


def _fail(message: str) -> NoReturn:
    print(f"bastion: {message}", file=sys.stderr)
    raise typer.Exit(code=2)


def model_mac_key(master_key: bytes) -> bytes:
    """The key of the models' MAC: gateway.credentials.derive_key(master, "anomaly-model")."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"bastion/anomaly-model/v1"
    ).derive(master_key)


def _master_key() -> bytes:
    text = os.environ.get("BASTION_MASTER_KEY")
    path = os.environ.get("BASTION_MASTER_KEY_FILE")
    if text is None and path:
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except OSError as exc:
            _fail(f"cannot read BASTION_MASTER_KEY_FILE: {exc}")
    if not text:
        _fail("the master key is needed (BASTION_MASTER_KEY or BASTION_MASTER_KEY_FILE)")
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        _fail("the master key is not base64")
    if len(key) != 32:
        _fail("the master key must be 32 bytes")
    return key


def default_loader(config: Path | None, database_url: str | None) -> MonitorContext:
    document: dict[str, Any] = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            _fail(f"configuration error: cannot read {config}: {exc}")
        document = loaded if isinstance(loaded, dict) else {}
    try:
        settings = AnomalySettings(**(document.get("anomaly") or {}))
    except ValidationError as exc:
        _fail(f"configuration error in anomaly: {exc.errors()[0]['msg']}")
    url = database_url or document.get("database_url") or DEFAULT_DATABASE_URL
    for prefix in ("postgresql://", "postgres://"):  # psycopg 3, as gateway/store.py
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url.removeprefix(prefix)
    args = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    return MonitorContext(create_engine(url, **args), settings, model_mac_key(_master_key()))


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="BASTION_CONFIG",
        dir_okay=False,
        help="YAML configuration (its database_url and anomaly section).",
    ),
]
DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", envvar="BASTION_DATABASE_URL", help="SQLAlchemy URL."),
]


def _print_flag(flag: dict[str, Any]) -> None:
    print(json.dumps({**flag, "time": iso(flag["time_us"])}, default=str), flush=True)


async def _run(context: MonitorContext, once: bool) -> int:
    scorer = AnomalyScorer(context.engine, context.settings, context.mac_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    callbacks = [_print_flag, *context.on_flag]
    lifespan = context.lifespan() if context.lifespan else contextlib.nullcontext()
    async with lifespan:
        return await _loop(scorer, context, once, stop, callbacks)


async def _loop(
    scorer: AnomalyScorer,
    context: MonitorContext,
    once: bool,
    stop: asyncio.Event,
    callbacks: list[FlagCallback],
) -> int:
    held_before = None
    try:
        while True:
            result = await asyncio.to_thread(scorer.tick)
            if result.held != held_before:
                state = "holds" if result.held else "waits for"
                print(f"bastion monitor: {state} the anomaly-scorer lease", file=sys.stderr)
                held_before = result.held
            await deliver(result.flags, callbacks)
            if once or stop.is_set():
                return 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(context.settings.window_s / 3, 10.0))
    finally:
        await asyncio.to_thread(scorer.release)


def make_apps(loader: Loader = default_loader) -> tuple[typer.Typer, typer.Typer]:
    """``(monitor_app, anomalies_app)`` reading their context through ``loader``."""
    monitor_app = typer.Typer(
        help="Score recorded requests for anomalies, as its own process (one at a time).",
        invoke_without_command=True,
    )
    anomalies_app = typer.Typer(help="The anomaly detector's flags.", no_args_is_help=True)

    @monitor_app.callback()
    def monitor(
        config: ConfigOption = None,
        database_url: DatabaseOption = None,
        once: Annotated[bool, typer.Option(help="One scoring pass, then exit.")] = False,
    ) -> None:
        context = loader(config, database_url)
        try:
            raise typer.Exit(code=asyncio.run(_run(context, once)))
        finally:
            context.engine.dispose()

    @anomalies_app.callback()
    def anomalies() -> None:
        """The anomaly detector's flags."""

    @anomalies_app.command("list")
    def list_anomalies(
        since: Annotated[str | None, typer.Option(help="ISO 8601 time.")] = None,
        until: Annotated[str | None, typer.Option(help="ISO 8601 time.")] = None,
        key: Annotated[str | None, typer.Option(help="API key id.")] = None,
        model: Annotated[str | None, typer.Option(help="Model.")] = None,
        family: Annotated[str | None, typer.Option(help=", ".join(FAMILIES))] = None,
        limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
        as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
        config: ConfigOption = None,
        database_url: DatabaseOption = None,
    ) -> None:
        if family is not None and family not in FAMILIES:
            _fail(f"--family: one of {', '.join(FAMILIES)}")
        where = store.AnomalyFilter(
            since_us=_parse_time(since, "--since"),
            until_us=_parse_time(until, "--until"),
            key_id=key,
            model=model,
            family=family,
        )
        context = loader(config, database_url)
        try:
            rows, _ = store.query_anomalies(context.engine, where, limit)
            status = detector_status(context.engine, context.settings)
        finally:
            context.engine.dispose()
        if as_json:
            for row in rows:
                print(json.dumps({**row, "time": iso(row["time_us"])}, default=str))
            return
        print(
            f"detector: {status['state']}"
            + (
                f" (model version {status['model_version']})"
                if status["state"] == "active"
                else f" ({status['windows']}/{status['windows_needed']} windows)"
            )
        )
        for row in rows:
            top = row["explanation"].get("features") or [{}]
            print(
                f"{iso(row['time_us'])}  {row['key_id']:<16} {row['model'] or '-':<20} "
                f"{row['family']:<8} {row['score']:7.2f}  {top[0].get('text', '')}"
            )

    return monitor_app, anomalies_app


def _parse_time(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"{option}: not an ISO 8601 time")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1_000_000)


monitor_app, anomalies_app = make_apps()

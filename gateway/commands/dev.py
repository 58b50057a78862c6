"""``bastion dev``: the embedded default (gateway + local vLLM tier + SQLite) on one machine."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.commands.common import err, fail, load, open_keys
from gateway.commands.dev_run import StopOnSignal, announce_when_ready
from gateway.commands.inference import install_progress, report_launch_error, tier_watermark_env
from gateway.commands.serve import run_server
from gateway.config import CONFIG_ENV_VAR, Settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def _discover_models(upstream: str) -> list[str]:
    url = upstream.rstrip("/") + "/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            listing = json.load(response)
        return [m["id"] for m in listing["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"cannot list the models of {url} ({exc}); name them with --model")


def dev(
    upstream: Annotated[
        str | None,
        typer.Option(
            help="Put Bastion in front of this OpenAI-compatible server instead of starting "
            "a local vLLM tier."
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(help="With --upstream: its models (default: ask its /v1/models)."),
    ] = None,
    model_dir: Annotated[
        Path | None,
        typer.Option(
            help="Serve this model directory (default: the dev model, built if missing).",
            file_okay=False,
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help=f"Listen address (default: dev.yaml's, {DEFAULT_HOST}).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help=f"Listen port (default: dev.yaml's, {DEFAULT_PORT}).")
    ] = None,
    inference_port: Annotated[int, typer.Option(help="The local vLLM tier's port.")] = 8000,
    inference_venv: Annotated[
        Path, typer.Option(help="vLLM's virtual environment (installed if missing).")
    ] = Path(".venv-inference"),
) -> None:
    """Run the embedded default: gateway + local vLLM tier + SQLite on one machine.

    Sets up what is missing (vLLM's environment, the dev model, secrets under .bastion/),
    starts the tier with the watermark, then the gateway, and prints the URL and the dev
    admin key once both answer. .bastion/dev.yaml is written once and then kept: edit it.
    Ctrl-C (or SIGTERM) stops both, at any moment.
    """
    with StopOnSignal() as stop:
        try:
            layout = prepare_layout(
                upstream, model, model_dir, host, port, inference_port, inference_venv
            )
            _run(layout, stop)
        except KeyboardInterrupt:
            err.print("stopped")


@dataclass(frozen=True)
class DevLayout:
    """What ``bastion dev`` prepared: its configuration, settings and admin key."""

    config_path: Path
    settings: Settings
    admin_key: str
    served: str
    notes: tuple[str, ...]
    embedded: bool


def prepare_layout(
    upstream: str | None,
    model: list[str] | None,
    model_dir: Path | None,
    host: str | None,
    port: int | None,
    inference_port: int,
    inference_venv: Path,
) -> DevLayout:
    """Everything but starting: secrets, the store, dev.yaml, the admin key (and, without
    ``upstream``, vLLM's environment, the dev model and the watermark key)."""
    from gateway import dev_setup
    from gateway.credentials import ensure_dev_secrets

    dev_setup.STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    notes: list[str] = []
    secrets = ensure_dev_secrets(dev_setup.STATE_DIR)
    for created in secrets.created:
        what = "master key" if created == secrets.master_key_file else "audit signing key"
        err.print(f"  dev setup: created the {what} in {created}", highlight=False, soft_wrap=True)
    listen = (host or DEFAULT_HOST, port or DEFAULT_PORT)
    if upstream is not None:
        models = model or _discover_models(upstream)
        generated = dev_setup.gateway_only_document(*listen, upstream, models)
    else:
        if model:
            fail("--model names an --upstream's models; use --model-dir for a local model")
        generated = _prepare_embedded(*listen, model_dir, inference_port, inference_venv)
    try:
        written = dev_setup.write_config(generated, embedded=upstream is None)
    except ValueError as exc:
        fail(f"configuration error: {exc}")
    config_path = written.path
    if not written.created and written.added:
        notes.append(f"added to {config_path}: {', '.join(written.added)}")
    # Options given on the command line win over the file for this start.
    server = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    overrides: dict[str, Any] = {"server": server} if server else {}
    if upstream is not None and written.document.get("watermark", {}).get("enabled"):
        overrides["watermark"] = {"enabled": False}  # no local tier marks what it writes
        notes.append("watermark off: --upstream does not run the local tier")
    settings = load(config_path, **overrides)
    if upstream is not None:
        served = f"upstream {upstream} serving {', '.join(settings.models())}"
    else:
        served = (
            f"local vLLM tier on :{settings.inference.port} serving "
            f"{', '.join(settings.inference.served_models())}"
        )
    store, hasher = open_keys(config_path, create=True)
    admin_key, minted = dev_setup.dev_admin_key(store, hasher)
    store.engine.dispose()
    if minted:
        notes.append("a new dev admin key; earlier dev admin keys are revoked")
    return DevLayout(
        config_path, settings, admin_key, served, tuple(notes), embedded=upstream is None
    )


def _prepare_embedded(
    host: str, port: int, model_dir: Path | None, inference_port: int, venv_dir: Path
) -> dict[str, Any]:
    """Install vLLM's environment, build the dev model and create keys, as needed."""
    from gateway import dev_setup
    from inference.dev_model import build_dev_model
    from inference.environment import InstallError, install, is_installed, python_of

    venv_dir = venv_dir.absolute()
    if not is_installed(venv_dir):
        err.print(f"setting up vLLM's environment in {venv_dir} (once; a few minutes)")
        with err.status("installing") as status:
            try:
                took = install(venv_dir, on_progress=install_progress(status))
            except InstallError as exc:
                for line in exc.tail[-20:]:
                    err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
                fail(str(exc), code=1)
        err.print(f"  vLLM installed in {took:.0f} s")
    dev_model = model_dir is None
    if model_dir is None:
        model_dir = dev_setup.DEV_MODEL_DIR
        if not (model_dir / "config.json").is_file():
            with err.status("building the dev model") as status:
                build_dev_model(model_dir, on_step=lambda what: status.update(what))
            err.print(f"  dev model built in {model_dir}")
    elif not (model_dir / "config.json").is_file():
        fail(f"--model-dir: {model_dir} is not a model directory (no config.json)")
    if dev_setup.ensure_watermark_keys():
        err.print(f"  watermark key created in {dev_setup.WATERMARK_KEYS_FILE}")
    name = dev_setup.DEV_MODEL_NAME if dev_model else (model_dir.resolve().name or "model")
    return dev_setup.embedded_document(
        host,
        port,
        python=python_of(venv_dir),
        model_dir=model_dir,
        model_name=name,
        inference_port=inference_port,
        dev_model=dev_model,
    )


def _run(layout: DevLayout, stop: StopOnSignal) -> None:
    """The tier first (until healthy, when embedded), then the gateway; the banner once
    the gateway answers ready; the first signal stops both."""
    from gateway.commands.common import configure_logging

    settings = layout.settings
    server = settings.server
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(server.host, server.host)
    url = f"http://{host}:{server.port}"

    def banner(problem: str | None) -> None:
        err.print(f"[bold green]Bastion dev gateway[/] on {url}/v1")
        err.print(f"  {layout.served}", soft_wrap=True)
        err.print(
            f"  config in {layout.config_path} (yours to edit: kept across starts); "
            f"other commands: export {CONFIG_ENV_VAR}={layout.config_path.absolute()}",
            soft_wrap=True,
            highlight=False,
        )
        for note in layout.notes:
            err.print(f"  {note}", soft_wrap=True, highlight=False)
        err.print(f"  admin key: [bold]{layout.admin_key}[/]", soft_wrap=True)
        if problem is not None:
            err.print(f"  [yellow]not ready yet[/]: {problem}", soft_wrap=True)
        err.print("  Ctrl-C stops it.")

    def on_server(uvicorn_server: Any) -> None:
        stop.attach(uvicorn_server)
        announce_when_ready(f"{url}/readyz", banner, stop)

    configure_logging("warning")
    if layout.embedded:
        _run_with_tier(settings, layout.config_path, on_server)
    else:
        run_server(settings, layout.config_path, None, False, on_server)
    if stop.requested.is_set():
        err.print("stopped")


def _run_with_tier(settings: Settings, config_path: Path, on_server: Any) -> None:
    """vLLM first (until healthy), then the gateway; leaving stops vLLM."""
    from inference.launch import running_tier
    from inference.supervisor import LaunchError

    try:
        with running_tier(
            settings.inference, err, tier_watermark_env(settings.inference, settings.watermark)
        ):
            run_server(settings, config_path, None, False, on_server)
    except LaunchError as exc:
        report_launch_error(exc, settings.inference.python)

"""``bastion dev``: the embedded default (gateway + local vLLM tier + SQLite) on one machine."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from gateway.commands.common import configure_logging, err, fail, key_store, load
from gateway.commands.inference import report_launch_error, tier_watermark_env
from gateway.commands.serve import run_server
from gateway.config import Settings


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
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port.")] = 8080,
    inference_port: Annotated[int, typer.Option(help="The local vLLM tier's port.")] = 8000,
    inference_venv: Annotated[
        Path, typer.Option(help="vLLM's virtual environment (installed if missing).")
    ] = Path(".venv-inference"),
) -> None:
    """Run the embedded default: gateway + local vLLM tier + SQLite on one machine.

    Sets up what is missing (vLLM's environment, the dev model, secrets under .bastion/),
    starts the tier with the watermark, then the gateway, and prints the URL and a freshly
    minted admin key. Ctrl-C stops both.
    """
    from gateway import dev_setup

    dev_setup.STATE_DIR.mkdir(exist_ok=True)
    config_path = dev_setup.CONFIG_FILE
    if upstream is not None:
        models = model or _discover_models(upstream)
        document = dev_setup.gateway_only_document(host, port, upstream, models)
        served = f"upstream {upstream} serving {', '.join(models)}"
    else:
        if model:
            fail("--model names an --upstream's models; use --model-dir for a local model")
        document = _prepare_embedded(
            host, port, model_dir, inference_port, inference_venv.absolute()
        )
        model_name = document["upstreams"][0]["models"][0]
        served = f"local vLLM tier on :{inference_port} serving {model_name}"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    settings = load(config_path)
    admin_key, _ = key_store(config_path).create(["admin"], description="bastion dev")

    def banner() -> None:
        err.print(f"[bold green]Bastion dev gateway[/] on http://{host}:{port}/v1")
        err.print(f"  {served}; config in {config_path}", soft_wrap=True)
        err.print(f"  admin key (shown once): [bold]{admin_key}[/]", soft_wrap=True)
        err.print("  Ctrl-C stops it.")

    configure_logging("warning")
    if upstream is not None:
        banner()
        run_server(settings, config_path, "warning", access_log=False)
        return
    _run_with_tier(settings, config_path, banner)


def _prepare_embedded(
    host: str, port: int, model_dir: Path | None, inference_port: int, venv_dir: Path
) -> dict[str, Any]:
    """Install vLLM's environment, build the dev model and create keys, as needed."""
    from gateway import dev_setup
    from inference.dev_model import build_dev_model
    from inference.environment import InstallError, install, is_installed, python_of

    if not is_installed(venv_dir):
        err.print(f"setting up vLLM's environment in {venv_dir} (once; a few minutes)")
        with err.status("installing") as status:
            try:
                took = install(venv_dir, on_progress=lambda line: status.update(line))
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


def _run_with_tier(settings: Settings, config_path: Path, banner: Callable[[], None]) -> None:
    """vLLM first (until healthy), then the gateway; Ctrl-C or SIGTERM stops both."""
    from inference.launch import interrupt_on_sigterm, running_tier
    from inference.supervisor import LaunchError

    try:
        with (
            interrupt_on_sigterm(),
            running_tier(
                settings.inference, err, tier_watermark_env(settings.inference, settings.watermark)
            ),
        ):
            banner()
            run_server(settings, config_path, "warning", access_log=False)
    except KeyboardInterrupt:
        err.print("stopped")
    except LaunchError as exc:
        report_launch_error(exc, settings.inference.python)

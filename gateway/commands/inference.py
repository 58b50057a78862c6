"""``bastion inference``: install, build a dev model for, and run the vLLM tier."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from gateway.commands.common import ConfigOption, err, fail
from gateway.config import ConfigError

inference_app = typer.Typer(help="Run the vLLM inference tier.", no_args_is_help=True)

HEARTBEAT_S = 10.0


def install_progress(
    status: Any, console: Console = err, clock: Callable[[], float] = time.monotonic
) -> Callable[[str], None]:
    """Where the install's progress lines go (``inference.environment.install``).

    On a terminal they are the spinner's text. Elsewhere (a log file, CI, ``make dev``
    piped) the spinner shows nothing, so each step is printed when it starts, and the
    latest line at least every :data:`HEARTBEAT_S`: a long install is never silent.
    """
    if console.is_terminal:
        return lambda line: status.update(line)
    last_step: list[str | None] = [None]
    last_print = [clock()]

    def report(line: str) -> None:
        step = line.split(": ", 1)[0]
        now = clock()
        if step != last_step[0] or now - last_print[0] >= HEARTBEAT_S:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
            last_step[0], last_print[0] = step, now

    return report


def tier_watermark_env(inference: Any, watermark: Any) -> dict[str, str]:
    """The processor's variables when the tier watermarks (checked before vLLM starts)."""
    from inference.launch import watermark_environment
    from inference.supervisor import LaunchError

    if not inference.watermark:
        return {}
    try:
        return watermark_environment(
            watermark.keys_file, watermark.generation_key_id, watermark.gamma, watermark.delta
        )
    except LaunchError as exc:
        fail(f"configuration error: {exc}")


def report_launch_error(exc: Any, python: Path) -> NoReturn:
    """vLLM's last output lines, then the one-line reason; exit 1."""
    if exc.tail:
        err.print(f"[bold]last lines of {python} -m vllm:[/]")
        for line in exc.tail[-20:]:
            err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    fail(str(exc), code=1)


@inference_app.command("serve")
def inference_serve(config: ConfigOption = None) -> None:
    """Start vLLM's OpenAI server from the `inference:` settings; Ctrl-C stops it."""
    from gateway.config import load_inference_settings
    from inference.launch import serve_tier
    from inference.supervisor import LaunchError

    try:
        tier = load_inference_settings(config)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
    extra_env = tier_watermark_env(tier.inference, tier.watermark)
    try:
        serve_tier(tier.inference, err, extra_env)
    except LaunchError as exc:
        report_launch_error(exc, tier.inference.python)


@inference_app.command("install")
def inference_install(
    venv_dir: Annotated[Path, typer.Argument(help="Where vLLM's virtual environment goes.")] = Path(
        ".venv-inference"
    ),
) -> None:
    """Create vLLM's own environment (CPU build; for development and CI), once."""
    from inference.environment import InstallError, install, python_of

    with err.status(f"setting up {venv_dir}") as status:
        try:
            took = install(venv_dir, on_progress=install_progress(status))
        except InstallError as exc:
            for line in exc.tail[-20:]:
                err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
            fail(str(exc), code=1)
    done = f"installed in {took:.0f} s" if took else "already installed"
    err.print(f"[bold green]{venv_dir}[/]: {done}; inference.python: {python_of(venv_dir)}")


@inference_app.command("build-dev-model")
def inference_build_dev_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the model directory.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.", min=0)] = 0,
    force: Annotated[bool, typer.Option(help="Replace a dev model already there.")] = False,
) -> None:
    """Build a tiny random Llama and its tokenizer, offline and deterministically."""
    from inference.dev_model import DevModelExists, build_dev_model

    with err.status("building the dev model") as status:

        def step(what: str) -> None:
            status.update(what)
            err.print(f"  {what}", highlight=False)

        try:
            build_dev_model(directory, seed=seed, force=force, on_step=step)
        except DevModelExists as exc:
            fail(str(exc))
    err.print(
        f"[bold green]dev model[/] (seed {seed}) in {directory}; serve it with "
        f"inference.model: {directory}",
        soft_wrap=True,
    )

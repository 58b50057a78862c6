"""From the ``inference:`` settings to a running vLLM OpenAI-compatible server.

:func:`vllm_command` is the pure part (settings in, argument list out); :func:`serve_tier`
starts that command under a :class:`~inference.supervisor.ServerProcess`, shows its
output and a spinner until ``/health`` answers, and stops it on Ctrl-C or SIGTERM. No
torch or vLLM import here: vLLM lives in its own virtual environment (``inference.python``),
since the gateway's dependencies pin versions vLLM cannot share.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.text import Text

from inference.settings import InferenceSettings
from inference.supervisor import LaunchError, ServerExited, ServerProcess, StartupTimeout
from inference.watermark_keys import KEYS_ENV_VAR, KeyFileError, load_secrets
from inference.watermark_keys import generation_key_id as generation_key_id_of

# vLLM's ``vllm`` console script looks up an installed distribution named "vllm", which
# CPU builds published under another name lack; the module entry point works for all.
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
WATERMARK_PROCESSOR = "inference.vllm_watermark:WatermarkLogitsProcessor"
OUTPUT_PREFIX = "vllm | "
# uvicorn's access line for a successful health probe (ours, every 5 s): not shown on the
# console, where it drowned everything else; still kept in the tail shown on failure.
HEALTH_PROBE_LINE = re.compile(r'"GET /health HTTP/1\.[01]" 200\b')


def shown(line: str) -> bool:
    """Whether a line of vLLM's output goes to the console."""
    return HEALTH_PROBE_LINE.search(line) is None


def _show(console: Console, line: str) -> None:
    if shown(line):
        console.print(Text.assemble((OUTPUT_PREFIX, "dim"), line), soft_wrap=True, highlight=False)


def vllm_command(settings: InferenceSettings) -> list[str]:
    """vLLM's server command line for ``settings``, interpreter first."""
    command = [
        str(settings.python),
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        str(settings.model),
        "--served-model-name",
        settings.served_name(),
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--dtype",
        settings.dtype,
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
    ]
    if settings.quantization is not None:
        command += ["--quantization", settings.quantization]
    if settings.max_num_batched_tokens is not None:
        command += ["--max-num-batched-tokens", str(settings.max_num_batched_tokens)]
    if settings.max_model_len is not None:
        command += ["--max-model-len", str(settings.max_model_len)]
    if settings.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.enforce_eager:
        command.append("--enforce-eager")
    if settings.lora_adapters:
        command += ["--enable-lora", "--lora-modules"]
        command += [f"{adapter.name}={adapter.path}" for adapter in settings.lora_adapters]
    if settings.priority_scheduling:
        command += ["--scheduling-policy", "priority"]
    if settings.watermark:
        command += ["--logits-processors", WATERMARK_PROCESSOR]
    return command + list(settings.extra_args)


def vllm_environment(
    settings: InferenceSettings, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The child's environment: ``base`` (default: ours) plus what a private tier needs.

    Usage statistics and Hugging Face Hub look-ups are off unless the operator set them
    (the model is a local directory and nothing should leave the house); output is
    unbuffered so that lines arrive as they are written. With the watermark, the source
    tree holding ``inference/`` goes on PYTHONPATH, so vLLM's interpreter finds the
    processor; an installed (site-packages) Bastion must instead be installed into vLLM's
    environment too, since putting the gateway's site-packages first would shadow vLLM's.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    source_root = Path(__file__).resolve().parent.parent
    if settings.watermark and source_root.name not in ("site-packages", "dist-packages"):
        paths = [str(source_root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def base_url(settings: InferenceSettings) -> str:
    """Where the server answers on this machine (a wildcard listen address → loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def check_files(settings: InferenceSettings) -> None:
    """Raise :class:`LaunchError` naming the field when something to start from is missing."""
    python = settings.python
    if not python.is_file() or not os.access(python, os.X_OK):
        raise LaunchError(
            f"inference.python: no interpreter at {python}; vLLM runs from its own virtual "
            "environment (README, 'Inference tier')"
        )
    if not (settings.model / "config.json").is_file():
        raise LaunchError(
            f"inference.model: {settings.model} is not a model directory (no config.json); "
            f"`bastion inference build-dev-model {settings.model}` builds a tiny one"
        )
    for i, adapter in enumerate(settings.lora_adapters):
        if not (adapter.path / "adapter_config.json").is_file():
            raise LaunchError(
                f"inference.lora_adapters.{i}.path: {adapter.path} is not a LoRA adapter "
                "(no adapter_config.json)"
            )


def watermark_environment(
    keys_file: Path | None,
    generation_key_id: str | None,
    gamma: float,
    delta: float,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What the watermark processor reads, from the ``watermark:`` settings.

    The keys are checked here, before vLLM starts, so a missing or bad key file is one
    clear line rather than a traceback from vLLM's engine process. The secrets themselves
    stay in the file (or in ``BASTION_WATERMARK_KEYS``, which the child inherits).
    """
    environ = os.environ if environ is None else environ
    try:
        secrets = load_secrets(keys_file, environ, "watermark.keys_file")
        if not secrets:
            raise KeyFileError(
                f"inference.watermark: no watermark keys; set watermark.keys_file or {KEYS_ENV_VAR}"
            )
        generation_key_id_of(secrets, generation_key_id, "watermark.generation_key_id")
    except KeyFileError as exc:
        raise LaunchError(str(exc)) from exc
    env = {"BASTION_WATERMARK__GAMMA": repr(gamma), "BASTION_WATERMARK__DELTA": repr(delta)}
    if keys_file is not None:
        env["BASTION_WATERMARK__KEYS_FILE"] = str(keys_file.resolve())
    if generation_key_id is not None:
        env["BASTION_WATERMARK__GENERATION_KEY_ID"] = generation_key_id
    return env


@contextlib.contextmanager
def running_tier(
    settings: InferenceSettings, console: Console, extra_env: Mapping[str, str] | None = None
) -> Iterator[ServerProcess]:
    """vLLM started and healthy for the ``with`` block, stopped (group and all) after it.

    Raises :class:`LaunchError` (with the server's last output lines) if it cannot start
    or does not become ready in time. vLLM's output is shown line by line, prefixed.
    """
    check_files(settings)
    command = vllm_command(settings)
    url = base_url(settings)
    server = ServerProcess(
        command,
        f"{url}/health",
        env={**vllm_environment(settings), **(extra_env or {})},
        on_output=lambda line: _show(console, line),
    )
    if server.healthy():
        raise LaunchError(f"inference.port: something already answers at {url}/health")
    timeout = settings.startup_timeout_s
    try:
        console.print(f"starting vLLM: {' '.join(command)}", soft_wrap=True, highlight=False)
        server.start()
        with console.status(f"waiting for {url}/health") as status:
            try:
                took = server.wait_ready(
                    timeout,
                    on_wait=lambda s: status.update(
                        f"waiting for {url}/health: {s:.0f} s (timeout {timeout:g} s)"
                    ),
                )
            except ServerExited as exc:
                raise LaunchError(
                    f"vLLM exited with status {exc.returncode} before it was ready", exc.tail
                ) from exc
            except StartupTimeout as exc:
                raise LaunchError(f"{exc} (inference.startup_timeout_s)", exc.tail) from exc
        names = ", ".join(settings.served_models())
        console.print(
            f"[bold green]vLLM ready[/] in {took:.1f} s on [bold]{url}/v1[/] serving {names}",
            soft_wrap=True,
        )
        yield server
    finally:
        if server.running():
            console.print("stopping vLLM")
        with _kill_on_signal(server):
            server.stop(settings.stop_grace_s)


def serve_tier(
    settings: InferenceSettings, console: Console, extra_env: Mapping[str, str] | None = None
) -> None:
    """Start vLLM, wait for ``/health``, run until Ctrl-C or SIGTERM, stop it cleanly.

    Returns after a requested stop; raises :class:`LaunchError` (with the server's last
    output lines) if it cannot start, does not become ready in time, or exits by itself.
    """
    with interrupt_on_sigterm():
        try:
            with running_tier(settings, console, extra_env) as server:
                console.print("Ctrl-C stops it.")
                returncode = server.wait()
                raise LaunchError(
                    f"vLLM exited with status {returncode} while serving", server.tail()
                )
        except KeyboardInterrupt:
            pass  # a requested stop; running_tier has stopped vLLM


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM (a service manager's stop) is handled like Ctrl-C."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _kill_on_signal(server: ServerProcess) -> Iterator[None]:
    """While stopping gracefully, a second Ctrl-C or SIGTERM kills the group at once."""

    def kill(signum: int, frame: FrameType | None) -> None:
        server.kill()

    previous = {sig: signal.signal(sig, kill) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

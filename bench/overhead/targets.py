"""What is measured: a target's endpoints and servers; the static upstream, nginx and LiteLLM.

A target is started once (its ``start_*`` function) and then measured; Bastion's
variants start in :mod:`bench.overhead.bastion`.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.overhead.bodies import (
    MODEL_JSON,
    MODEL_SSE,
    chat_completion_body,
    models_body,
    nginx_parts,
    nginx_quote,
    render,
    sse_body,
)
from bench.overhead.paths import API_KEY, PROXY_TEMPLATE, UPSTREAM_TEMPLATE
from bench.overhead.processes import Proc, Processes, wait_ready
from tests.support import free_port


class SkipTarget(Exception):
    """The target cannot run here (not installed / not implemented yet)."""


@dataclass
class Endpoint:
    """Where one scenario of a target is sent, and the model name to ask for."""

    port: int
    model: str
    api_key: str = API_KEY
    path: str = "/v1/chat/completions"
    tls: ssl.SSLContext | None = None
    """https, with this context for the script's own requests (wrk does not verify)."""

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.path}"


@dataclass
class Target:
    name: str
    chat: Endpoint
    stream: Endpoint
    procs: list[Proc] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # goes into the results file
    verify: Callable[[], str | None] | None = None
    """Run once after the first good preflight: None if the setup is what it claims, else
    what is wrong (the target then fails before it is measured)."""


@dataclass
class Ctx:
    args: argparse.Namespace
    workdir: Path
    processes: Processes
    json_port: int
    sse_port: int
    gateway_cpu: int | None
    load_cpu: int | None
    redis_url: str | None = None  # the private Redis, once started


def user_directive() -> str:
    return "user root;" if os.geteuid() == 0 else ""


def nginx_prefix(ctx: Ctx, name: str) -> Path:
    prefix = ctx.workdir / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    return prefix


def start_nginx(
    ctx: Ctx, name: str, template: Path, values: dict[str, str], cpu: int | None
) -> Proc:
    prefix = nginx_prefix(ctx, name)
    conf = render(
        template,
        prefix / "nginx.conf",
        {"PREFIX": str(prefix), "USER_DIRECTIVE": user_directive(), **values},
    )
    test = subprocess.run(
        ["nginx", "-t", "-q", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
    )
    if test.returncode != 0:
        raise RuntimeError(f"nginx -t failed for {name}: {test.stderr.strip()}")
    cmd = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return ctx.processes.start(name, cmd, cpu)


def start_upstream(ctx: Ctx) -> Proc:
    parts = nginx_parts(sse_body())
    sse_sets = "\n            ".join(
        f"set $sse_{i} '{nginx_quote(part)}';" for i, part in enumerate(parts)
    )
    proc = start_nginx(
        ctx,
        "upstream-nginx",
        UPSTREAM_TEMPLATE,
        {
            "JSON_PORT": str(ctx.json_port),
            "SSE_PORT": str(ctx.sse_port),
            "CHAT_BODY": nginx_quote(chat_completion_body()),
            "SSE_SETS": sse_sets,
            "SSE_VARS": "".join(f"${{sse_{i}}}" for i in range(len(parts))),
            "MODELS_BODY": nginx_quote(models_body()),
        },
        ctx.load_cpu,
    )
    wait_ready(proc, ctx.json_port, "/health", 15)
    wait_ready(proc, ctx.sse_port, "/health", 15)
    return proc


def start_direct(ctx: Ctx) -> Target:
    return Target("direct", Endpoint(ctx.json_port, MODEL_JSON), Endpoint(ctx.sse_port, MODEL_SSE))


def start_nginx_proxy(ctx: Ctx) -> Target:
    pj, ps = free_port(), free_port()
    proc = start_nginx(
        ctx,
        "nginx-proxy",
        PROXY_TEMPLATE,
        {
            "JSON_PORT": str(ctx.json_port),
            "SSE_PORT": str(ctx.sse_port),
            "PROXY_JSON_PORT": str(pj),
            "PROXY_SSE_PORT": str(ps),
        },
        ctx.gateway_cpu,
    )
    target = Target("nginx", Endpoint(pj, MODEL_JSON), Endpoint(ps, MODEL_SSE), [proc])
    wait_ready(proc, pj, "/health", 15)
    wait_ready(proc, ps, "/health", 15)
    return target


def clean_env(drop_prefixes: tuple[str, ...]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(drop_prefixes)}
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def start_litellm(ctx: Ctx) -> Target:
    exe = ctx.args.litellm_venv / "bin" / "litellm"
    if not exe.exists():
        raise SkipTarget(f"{exe} not found: run `bash bench/setup_litellm.sh` first")
    port = free_port()
    cfg = ctx.workdir / "litellm.yaml"
    models = []
    for name, upstream_port in ((MODEL_JSON, ctx.json_port), (MODEL_SSE, ctx.sse_port)):
        models.append(
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "sk-dummy-upstream-key",
                },
            }
        )
    config = {
        "model_list": models,
        "litellm_settings": {
            "set_verbose": False,
            "json_logs": False,
            "drop_params": True,
        },
        "general_settings": {"master_key": API_KEY},
    }
    cfg.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
    env = clean_env(("LITELLM", "DATABASE_URL", "DIRECT_URL", "REDIS", "OPENAI", "STORE_MODEL"))
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "JSON_LOGS": "False",
        }
    )
    cmd = [
        str(exe),
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    proc = ctx.processes.start("litellm", cmd, ctx.gateway_cpu, env=env, cwd=ctx.workdir)
    target = Target("litellm", Endpoint(port, MODEL_JSON), Endpoint(port, MODEL_SSE), [proc])
    wait_ready(proc, port, "/health/liveliness", ctx.args.startup_timeout)
    return target

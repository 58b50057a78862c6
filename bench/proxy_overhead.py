#!/usr/bin/env python3
"""Proxy overhead benchmark: Bastion vs. a plain nginx reverse proxy vs. LiteLLM's proxy.

Run by hand (not by CI), from the repository root:

    .venv/bin/python bench/proxy_overhead.py                 # everything, 10 s per measurement
    .venv/bin/python bench/proxy_overhead.py --quick         # 3 s per measurement
    .venv/bin/python bench/proxy_overhead.py --targets direct,nginx,bastion --no-stream

Every target forwards to the same static upstream (nginx answering fixed OpenAI-shaped
bodies as fast as it can), so what is measured is the cost of the proxy itself. The gateway
under test is pinned to one core, wrk and the static upstream to the other. All numbers are
measured in this run; nothing is hard-coded. See bench/README.md.

Bastion runs three times: bare (no auth, no rate limits), as deployed on plain HTTP (key
check, in-memory rate limits) and with the whole access chain (TLS, key check, model
allow-lists, rate limits in Redis); the difference to the bare one is the access chain's cost.

On a noisy machine, `--shared-core` measures the proxies' high concurrency all at once on
the gateway core, so that the machine's slow spells hit them alike and their throughput
ratio is their cost ratio; every measurement also reports the proxy's CPU time per request.

Needs: nginx and wrk on PATH (apt-get install nginx wrk), taskset (util-linux), for the
LiteLLM target bench/.venv-litellm (bash bench/setup_litellm.sh), for bastion-secure
redis-server on PATH (or a running Redis at --redis-url) and trustme (a dev dependency of the
project). Otherwise only the standard library is used here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import functools
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LITELLM_VENV = BENCH_DIR / ".venv-litellm"
PROJECT_VENV = REPO_ROOT / ".venv"
WRK_SCRIPT = BENCH_DIR / "wrk_chat.lua"
UPSTREAM_TEMPLATE = BENCH_DIR / "nginx_upstream.conf.in"
PROXY_TEMPLATE = BENCH_DIR / "nginx_proxy.conf.in"

ALL_TARGETS = ("direct", "nginx", "litellm", "bastion-bare", "bastion", "bastion-secure")
GATEWAYS = ("nginx", "litellm", "bastion-bare", "bastion", "bastion-secure")
BASTIONS = ("bastion-bare", "bastion", "bastion-secure")
# Gateways checked against the project's targets, and what each one runs.
VERDICT_TARGETS = ("bastion", "bastion-secure")
CHAIN_BASE = "bastion-bare"  # the access chain's cost is measured against this one
CHAIN_VARIANTS = ("bastion-secure", "bastion")
VARIANT_WHAT = {
    "bastion-bare": "bare proxy: no TLS, no auth, no rate limits",
    "bastion": "plain HTTP: key check + RBAC + in-memory rate limits",
    "bastion-secure": "TLS + key check + RBAC with allow-lists + rate limits in Redis",
}
TW = 14  # width of the target column
MODEL_JSON = "bench-model"  # served by the JSON upstream
MODEL_SSE = "bench-model-stream"  # served by the SSE upstream
# LiteLLM's master key, also sent to direct/nginx (ignored); Bastion gets a key of its own
# when its auth is on (see start_bastion).
API_KEY = "sk-bench-master-key-0123456789"
SCENARIOS = ("chat", "stream")

# Targets from docs (checked by the verdict); not used to produce any measured number.
TARGET_ADDED_P50_MS = 1.0
TARGET_RATIO_VS_LITELLM = 40.0
TARGET_CHAIN_ADDED_P50_MS = 0.3  # access chain vs bastion-bare, p50 at c=1
TARGET_CHAIN_RPS_COST = 0.20  # access chain vs bastion-bare: 1 - rps ratio at c=32

# Where Bastion's Redis rate limiter keeps a key's buckets (gateway/ratelimit.py); the
# benchmark looks there once to be sure the limiter really went to Redis.
REDIS_BUCKET_PREFIX = "bastion:rl:"
PRIVATE_REDIS = "private"

ANSWER = (
    "Bastion is a gateway that sits between clients and self-hosted language models."
    " It routes requests, checks health, retries failed upstreams and streams tokens back"
    " as they arrive."
)
# The stream sends the answer one word per event, as a model would (roughly) one token.
_WORDS = ANSWER.split(" ")
ANSWER_PIECES = [_WORDS[0], *(" " + w for w in _WORDS[1:])]


# --------------------------------------------------------------------------- bodies


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def chat_completion_body() -> str:
    """A realistic non-streaming chat.completion object with usage."""
    return _dumps(
        {
            "id": "chatcmpl-bench0000000000000000000001",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL_JSON,
            "system_fingerprint": "fp_bench0001",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 42,
                "completion_tokens": len(ANSWER_PIECES),
                "total_tokens": 42 + len(ANSWER_PIECES),
            },
        }
    )


def sse_body() -> str:
    """A fixed SSE stream: a role chunk, content chunks, a finish chunk, then [DONE]."""
    base = {
        "id": "chatcmpl-bench0000000000000000000002",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL_SSE,
        "system_fingerprint": "fp_bench0001",
    }

    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return "data: " + _dumps({**base, "choices": [choice]}) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": piece}, None) for piece in ANSWER_PIECES]
    events.append(chunk({}, "stop"))
    events.append("data: [DONE]\n\n")
    return "".join(events)


def models_body() -> str:
    return _dumps(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "bench"}
                for m in (MODEL_JSON, MODEL_SSE)
            ],
        }
    )


def request_body(model: str, stream: bool) -> str:
    return _dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "In two sentences, what does an LLM gateway do?"},
            ],
            "max_tokens": 128,
            "temperature": 0,
            "stream": stream,
        }
    )


def nginx_quote(text: str) -> str:
    """Make text safe inside a single-quoted nginx string (newlines become \\n escapes)."""
    for bad in ("'", "\\", "$"):
        if bad in text:
            raise ValueError(f"body contains {bad!r}, which the nginx template cannot hold")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def nginx_parts(text: str, limit: int = 3000) -> list[str]:
    """Split text at newlines into pieces whose nginx-quoted form stays under limit bytes
    (nginx rejects a config token longer than 4 KiB)."""
    parts: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        if len(nginx_quote(line)) > limit:
            raise ValueError("a single line of the body is too long for nginx")
        if current and len(nginx_quote(current + line)) > limit:
            parts.append(current)
            current = ""
        current += line
    if current:
        parts.append(current)
    return parts


def render(template: Path, out: Path, values: dict[str, str]) -> Path:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    leftover = re.findall(r"@[A-Z_]+@", code)
    if leftover:
        raise ValueError(f"unrendered placeholders in {template.name}: {leftover}")
    out.write_text(text)
    return out


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_prefix(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


@dataclass
class Proc:
    """A server started in its own process group, stopped with the whole group."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        if self.popen.poll() is not None:
            self._reap_group()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=grace_s)
        self._reap_group()

    def _reap_group(self) -> None:
        # Children that outlived their leader (e.g. uvicorn workers) still share the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Every server this run starts; stop_all() runs in the finally of main()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        cpu: int | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                [*pin_prefix(cpu), *cmd],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(cwd) if cwd else None,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping {proc.name}: {exc}", file=sys.stderr)
        self.procs.clear()


def http_request(
    url_host: str,
    port: int,
    method: str,
    path: str,
    body: str | None = None,
    timeout: float = 10.0,
    api_key: str = API_KEY,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(url_host, port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {api_key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(
            method, path, body=body.encode() if body is not None else None, headers=headers
        )
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def wait_ready(
    proc: Proc,
    port: int,
    path: str,
    timeout_s: float,
    api_key: str = API_KEY,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Poll GET path until it answers 2xx; fail early if the process died or answers 4xx
    (an answer that will not change by waiting). With tls, over https, verified by it."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not proc.alive():
            tail = proc.log_tail()
            last_line = next((x for x in reversed(tail.splitlines()) if x.strip()), "")
            raise RuntimeError(
                f"{proc.name} exited with status {proc.popen.returncode} before it was ready:"
                f" {last_line.strip()}\nlog tail:\n{tail}"
            )
        try:
            status, _, data = http_request(
                "127.0.0.1", port, "GET", path, timeout=2.0, api_key=api_key, tls=tls
            )
            if 200 <= status < 300:
                return
            last = f"HTTP {status}: {data[:300].decode(errors='replace')}"
            if 400 <= status < 500:
                raise RuntimeError(f"{proc.name}: GET {path} answered {last}")
        except ssl.SSLCertVerificationError as exc:  # waiting will not fix the certificate
            raise RuntimeError(f"{proc.name}: TLS certificate not accepted: {exc}") from exc
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise RuntimeError(
        f"{proc.name} not ready on :{port}{path} after {timeout_s:.0f}s ({last}); log tail:\n"
        f"{proc.log_tail()}"
    )


# --------------------------------------------------------------------------- targets


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


def bastion_runnable() -> str | None:
    """None if `bastion serve` looks runnable, else why not."""
    exe = PROJECT_VENV / "bin" / "bastion"
    if not (REPO_ROOT / "gateway" / "cli.py").exists():
        return "gateway/cli.py does not exist yet"
    if not exe.exists():
        return f"{exe} not found (pip install -e '.[gateway]')"
    probe = subprocess.run(
        [str(exe), "serve", "--help"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    if probe.returncode != 0:
        err = (probe.stderr or probe.stdout).strip().splitlines()
        return f"`bastion serve --help` failed: {err[-1] if err else probe.returncode}"
    return None


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def bastion_cli(args: list[str], env: dict[str, str], cwd: Path) -> str:
    exe = PROJECT_VENV / "bin" / "bastion"
    p = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    if p.returncode != 0:
        raise RuntimeError(f"`bastion {' '.join(args)}` failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def bastion_resolved(cfg: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """The settings as `bastion config check` resolves them ({} if it cannot say)."""
    try:
        out = bastion_cli(["config", "check", "--config", str(cfg)], env, cwd)
    except RuntimeError as exc:
        if "No such command" in str(exc):
            return {}
        raise
    try:
        import yaml  # in the project venv, as a gateway dependency
    except ImportError:
        return {}
    doc = yaml.safe_load(out)
    return doc if isinstance(doc, dict) else {}


def redis_command(url: str, *args: str, timeout: float = 2.0) -> Any:
    """One command to a Redis server in its wire protocol (RESP 2); the decoded reply.
    (The script sticks to the standard library, and needs only PING and EXISTS.)"""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "redis":
        raise ValueError(f"only redis:// URLs are supported here, not {url!r}")
    commands: list[tuple[str, ...]] = []
    if u.password:
        commands.append(("AUTH", *((u.username,) if u.username else ()), u.password))
    db = u.path.strip("/")
    if db and db != "0":
        commands.append(("SELECT", db))
    commands.append(args)
    address = (u.hostname or "127.0.0.1", u.port or 6379)
    with socket.create_connection(address, timeout=timeout) as sock:
        reader = sock.makefile("rb")
        reply: Any = None
        for command in commands:
            out = [b"*%d\r\n" % len(command)]
            for arg in command:
                data = arg.encode()
                out.append(b"$%d\r\n%s\r\n" % (len(data), data))
            sock.sendall(b"".join(out))
            reply = _resp_reply(reader)
        return reply


def _resp_reply(reader: Any) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2].decode(errors="replace")
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(f"Redis answered: {rest}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else reader.read(n + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_reply(reader) for _ in range(n)]
    raise OSError(f"unexpected reply from Redis: {line[:80]!r}")


def check_redis_bucket(name: str, redis_url: str, bucket: str) -> str | None:
    """After a request: None if the key's rate-limit bucket is in Redis, else the problem."""
    try:
        found = redis_command(redis_url, "EXISTS", bucket)
    except (OSError, RuntimeError, ValueError) as exc:
        return f"cannot ask Redis whether the rate limiter used it: {exc}"
    if found != 1:
        return f"no rate-limit bucket {bucket!r} in Redis after a request"
    print(f"  {name}: the key's rate-limit bucket is in Redis", flush=True)
    return None


def tls_material(directory: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A throw-away CA, a certificate for 127.0.0.1 signed by it (chain and key files), and
    a client context that trusts that CA only (host name checked)."""
    try:
        import trustme  # a dev dependency of the project, in its venv
    except ImportError as exc:
        raise SkipTarget(f"trustme is not installed ({exc}); pip install trustme") from exc
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    keyfile.touch(mode=0o600)
    keyfile.write_bytes(cert.private_key_pem.bytes())
    client = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    return certfile, keyfile, client


def bastion_notes(resolved: dict[str, Any]) -> list[str]:
    """What the resolved configuration turns on, in words (printed and kept in the results)."""

    def section(key: str) -> dict[str, Any]:
        value = resolved.get(key)
        return value if isinstance(value, dict) else {}

    notes = ["TLS on the listener" if section("server").get("tls") else "plain HTTP"]
    auth = section("auth")
    if auth.get("enabled"):
        allow = f", model allow-lists {auth['role_models']}" if auth.get("role_models") else ""
        notes.append(f"auth on, with an API key of role app{allow}")
    elif auth:
        notes.append("auth OFF")
    limits = section("rate_limits")
    if limits.get("enabled"):
        redis_url = resolved.get("redis_url")
        where = (
            f"in Redis ({redis_url}, failure mode {limits.get('redis_failure_mode')})"
            if redis_url
            else "in memory"
        )
        notes.append(
            f"rate limits on, {where}, at {limits.get('requests_per_second')} requests/s"
            f" and {limits.get('tokens_per_minute')} tokens/min per key"
        )
    elif limits:
        notes.append("rate limits OFF")
    return notes


def private_redis(ctx: Ctx) -> str:
    """A Redis server of this run's own, on the load core like the static upstream (an
    unpinned one would share the gateway's core at random); started once, kept for the
    rounds, stopped with everything else."""
    if ctx.redis_url is None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SkipTarget(
                "no redis-server on PATH (apt-get install redis-server), or name a running"
                " one with --redis-url redis://HOST:PORT/0"
            )
        port = free_port()
        cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly"]
        ctx.processes.start("redis", [*cmd, "no"], ctx.load_cpu)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_command(url, "PING")
                break
            except (OSError, RuntimeError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        ctx.redis_url = url
        print(f"  private redis-server on :{port}, pinned with the load", flush=True)
    return ctx.redis_url


def start_bastion(ctx: Ctx, name: str) -> Target:
    """One Bastion variant (VARIANT_WHAT), configured as a deployment would be.

    Every variant: `bastion serve --workers 1`, a fresh master key, the store (sqlite) in
    the temp dir, the two static upstreams, everything else at Bastion's defaults.
    bastion-bare: dev, auth and rate limits off. bastion: auth on (a key is created) and
    in-memory rate limits far above what the benchmark sends. bastion-secure: TLS with a
    throw-away certificate, auth on with model allow-lists (role and key), rate limits in
    Redis, failing closed so a Redis problem shows up as errors rather than as an
    unlimited (and cheaper) gateway. --bastion-extra is merged into every variant.
    """
    why = bastion_runnable()
    if why:
        raise SkipTarget(why)
    redis_url = ctx.args.redis_url
    if name == "bastion-secure":
        if redis_url == PRIVATE_REDIS:
            redis_url = private_redis(ctx)
        try:
            redis_command(redis_url, "PING")
        except (OSError, RuntimeError, ValueError) as exc:
            raise SkipTarget(
                f"no Redis at {redis_url} ({exc}); start one: redis-server --daemonize yes"
                " --bind 127.0.0.1 --port 6379 --save '' --appendonly no"
            ) from exc
    port = free_port()
    cwd = ctx.workdir / name
    cwd.mkdir(exist_ok=True)
    cfg = cwd / "bastion.yaml"
    env = clean_env(("BASTION_",))
    # A production start needs a master key (32 random bytes, base64) and, with the audit
    # log on (the default), its Ed25519 signing key: fresh ones per run.
    env["BASTION_MASTER_KEY"] = base64.b64encode(os.urandom(32)).decode()
    signing_key = cwd / "signing.pem"
    if not signing_key.exists():
        bastion_cli(["secrets", "create-signing-key", str(signing_key)], env, cwd)
    env["BASTION_SIGNING_KEY_FILE"] = str(signing_key)
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "workers": 1},
        "upstreams": [
            {
                "name": "static-json",
                "url": f"http://127.0.0.1:{ctx.json_port}",
                "models": [MODEL_JSON],
            },
            {
                "name": "static-sse",
                "url": f"http://127.0.0.1:{ctx.sse_port}",
                "models": [MODEL_SSE],
            },
        ],
        "health_check": {"enabled": True, "path": "/health"},
        "database_url": f"sqlite:///{cwd / 'bastion.db'}",
    }
    # The limiter runs on every request and never throttles.
    never_throttle = {"requests_per_second": 1e6, "tokens_per_minute": 10**12}
    client_tls: ssl.SSLContext | None = None
    key_models: list[str] = []
    if name == "bastion-bare":
        config.update(dev=True, auth={"enabled": False}, rate_limits={"enabled": False})
    elif name == "bastion":
        config["rate_limits"] = dict(never_throttle)
    elif name == "bastion-secure":
        certfile, keyfile, client_tls = tls_material(cwd)
        config["server"]["tls"] = {"certfile": str(certfile), "keyfile": str(keyfile)}
        key_models = [MODEL_JSON, MODEL_SSE]
        config["auth"] = {"role_models": {"app": key_models}}
        config["rate_limits"] = {**never_throttle, "redis_failure_mode": "closed"}
        config["redis_url"] = redis_url
    else:
        raise ValueError(f"unknown Bastion variant {name!r}")
    config = deep_merge(config, ctx.args.bastion_extra)
    cfg.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
    resolved = bastion_resolved(cfg, env, cwd)  # also validates the file
    notes = bastion_notes(resolved)
    # The client follows the resolved config (--bastion-extra may turn TLS on or off).
    server = resolved.get("server")
    if not (isinstance(server, dict) and server.get("tls")):
        client_tls = None
    elif client_tls is None:  # a certificate from --bastion-extra: not checked
        client_tls = ssl.create_default_context()
        client_tls.check_hostname = False
        client_tls.verify_mode = ssl.CERT_NONE
    if ctx.args.bastion_extra:
        notes.append(f"--bastion-extra {json.dumps(ctx.args.bastion_extra)}")

    api_key, key_id = API_KEY, None
    auth = resolved.get("auth")
    if isinstance(auth, dict) and auth.get("enabled"):
        create = ["keys", "create", "--role", "app", "--description", "proxy_overhead benchmark"]
        if key_models:
            create += ["--models", ",".join(key_models)]
        out = bastion_cli([*create, "--json", "--config", str(cfg)], env, cwd)
        created = json.loads(out.strip().splitlines()[-1])
        api_key, key_id = created["key"], created["id"]
        if key_models:
            notes.append(f"the key itself is limited to {', '.join(key_models)}")
    for note in notes:
        print(f"  {name}: {note}", flush=True)

    verify = None
    limits = resolved.get("rate_limits")
    resolved_redis = resolved.get("redis_url")
    if key_id and resolved_redis and isinstance(limits, dict) and limits.get("enabled"):
        verify = functools.partial(
            check_redis_bucket, name, resolved_redis, REDIS_BUCKET_PREFIX + key_id
        )

    cmd = [
        str(PROJECT_VENV / "bin" / "bastion"),
        "serve",
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = ctx.processes.start(name, cmd, ctx.gateway_cpu, env=env, cwd=cwd)
    target = Target(
        name,
        Endpoint(port, MODEL_JSON, api_key, tls=client_tls),
        Endpoint(port, MODEL_SSE, api_key, tls=client_tls),
        [proc],
        {"what": VARIANT_WHAT[name], "config": config, "notes": notes},
        verify,
    )
    wait_ready(proc, port, "/readyz", ctx.args.startup_timeout, api_key, client_tls)
    return target


class SkipTarget(Exception):
    """The target cannot run here (not installed / not implemented yet)."""


STARTERS: dict[str, Callable[[Ctx], Target]] = {
    "direct": start_direct,
    "nginx": start_nginx_proxy,
    "litellm": start_litellm,
    **{name: functools.partial(start_bastion, name=name) for name in BASTIONS},
}


# --------------------------------------------------------------------------- checks


def preflight(endpoint: Endpoint, stream: bool) -> str | None:
    """Send one request; None if the answer is a correct chat completion, else the problem."""
    try:
        status, headers, data = http_request(
            "127.0.0.1",
            endpoint.port,
            "POST",
            endpoint.path,
            request_body(endpoint.model, stream),
            timeout=30,
            api_key=endpoint.api_key,
            tls=endpoint.tls,
        )
    except OSError as exc:
        return f"request failed: {type(exc).__name__}: {exc}"
    text = data.decode(errors="replace")
    if status != 200:
        return f"HTTP {status}: {text[:300]}"
    try:
        if not stream:
            obj = json.loads(text)
            content = obj["choices"][0]["message"]["content"]
            if content != ANSWER:
                return f"unexpected content {content!r}"
            return None
        ctype = headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            return f"content-type {ctype!r} is not text/event-stream"
        pieces: list[str] = []
        done = False
        for line in text.splitlines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                return f"error event: {payload[:300]}"
            for choice in event.get("choices", []):
                pieces.append((choice.get("delta") or {}).get("content") or "")
        if not done:
            return f"stream did not end with [DONE]: {text[-300:]!r}"
        if "".join(pieces) != ANSWER:
            return f"streamed content differs: {''.join(pieces)!r}"
        return None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"malformed answer ({type(exc).__name__}: {exc}): {text[:300]!r}"


# --------------------------------------------------------------------------- wrk


def process_group_cpu_s(pgids: set[int], proc_root: Path = Path("/proc")) -> float:
    """CPU seconds (user + system) used so far by the live processes of these groups.

    Read from /proc/PID/stat (Linux): fields 5 (pgrp), 14 (utime) and 15 (stime), the
    latter two in clock ticks. A process that exits between two readings takes its time
    with it, so this is for servers that stay up while measured.
    """
    tick = os.sysconf("SC_CLK_TCK")
    ticks = 0
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone, or not ours to read
            continue
        # The command name (field 2) is in parentheses and may hold spaces or ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) in pgids:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / tick


def run_wrk(
    ctx: Ctx,
    endpoint: Endpoint,
    stream: bool,
    connections: int,
    duration_s: int,
    procs: list[Proc] | None = None,
) -> dict[str, Any]:
    """One wrk measurement; with `procs` (the proxy's servers, each the leader of its
    process group) also the CPU time the proxy spent per request while it ran."""
    env = dict(os.environ)
    env["BENCH_BODY"] = request_body(endpoint.model, stream)
    env["BENCH_API_KEY"] = endpoint.api_key
    cmd = [
        *pin_prefix(ctx.load_cpu),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={ctx.args.wrk_timeout}s",
        "-s",
        str(WRK_SCRIPT),
        endpoint.url,
    ]
    load_before = os.getloadavg()[0]
    pgids = {p.popen.pid for p in procs or ()}
    cpu_before = process_group_cpu_s(pgids) if pgids else 0.0
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=duration_s + ctx.args.wrk_timeout + 60
    )
    cpu_s = process_group_cpu_s(pgids) - cpu_before if pgids else None
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed (status {proc.returncode}): {proc.stderr.strip()} {proc.stdout.strip()}"
        )
    raw = json.loads(line.split(" ", 1)[1])
    secs = raw["duration_us"] / 1e6
    errors = raw["errors"]
    n_err = sum(errors.values())
    lat = {k: v / 1000.0 for k, v in raw["latency_us"].items()}  # ms
    return {
        "connections": connections,
        "duration_s": round(secs, 3),
        "requests": raw["requests"],
        "rps": raw["requests"] / secs if secs else 0.0,
        "ok_rps": (raw["requests"] - errors["status"]) / secs if secs else 0.0,
        "bytes": raw["bytes"],
        "errors": errors,
        "error_total": n_err,
        "latency_ms": lat,
        "loadavg_1m_before": load_before,
        # The proxy's CPU time per answered request: at the high concurrency the proxy is
        # CPU-bound, so this is the inverse of its throughput without the idle gaps.
        "cpu_s": cpu_s,
        "cpu_us_per_request": cpu_s / raw["requests"] * 1e6
        if cpu_s is not None and raw["requests"]
        else None,
    }


# --------------------------------------------------------------------------- the run


def print_run(name: str, scenario: str, r: dict[str, Any], how: str = "") -> None:
    lat = r["latency_ms"]
    flag = f"  !!! {r['error_total']} ERRORS {r['errors']}" if r["error_total"] else ""
    cpu = r["cpu_us_per_request"]
    cpu_note = "" if cpu is None else f", CPU {cpu:.1f} us/request"
    print(
        f"  {name}/{scenario} c={r['connections']}{how}: {r['rps']:.1f} rps,"
        f" p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms{cpu_note}{flag}",
        flush=True,
    )


def measure_target(
    ctx: Ctx,
    target: Target,
    scenarios: list[str],
    first: bool = True,
    levels: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Every scenario of one target at c=1 and at the high concurrency (or at `levels`).
    `first`: the target was just started (preflight, setup check and warm-up); later
    rounds of --interleave measure the same running servers again."""
    args = ctx.args
    levels = levels or (1, args.connections)
    out: dict[str, Any] = {}
    verify = target.verify if first else None
    for scenario in scenarios:
        stream = scenario == "stream"
        endpoint = target.stream if stream else target.chat
        problem = preflight(endpoint, stream) if first else None
        if problem:
            print(f"  !!! {target.name}/{scenario}: preflight FAILED: {problem}", flush=True)
            out[scenario] = {"error": f"preflight failed: {problem}"}
            continue
        if verify is not None:
            problem, verify = verify(), None
            if problem:
                raise RuntimeError(f"{target.name} is not set up as intended: {problem}")
        if first and args.warmup > 0:
            warm = run_wrk(ctx, endpoint, stream, args.connections, args.warmup)
            print(
                f"  {target.name}/{scenario}: warm-up {warm['requests']} requests"
                f" ({warm['rps']:.0f} rps, {warm['error_total']} errors)",
                flush=True,
            )
        res: dict[str, Any] = {}
        for conns in levels:
            r = run_wrk(ctx, endpoint, stream, conns, args.duration, target.procs)
            res[f"c{conns}"] = r
            print_run(target.name, scenario, r)
        out[scenario] = res
    return out


def measure_together(
    ctx: Ctx, targets: list[Target], scenario: str
) -> dict[str, dict[str, Any] | Exception]:
    """--shared-core: the high concurrency on every target at once, one wrk each.

    The targets' servers share the gateway core, so each gets about an equal share of it
    and a slow spell of the machine hits all of them in the same seconds: the ratio of
    their throughputs is the ratio of their CPU costs per request, and it holds still
    where measurements taken one after the other drift apart."""
    stream = scenario == "stream"

    def one(target: Target) -> dict[str, Any] | Exception:
        endpoint = target.stream if stream else target.chat
        try:
            return run_wrk(
                ctx, endpoint, stream, ctx.args.connections, ctx.args.duration, target.procs
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        return dict(zip((t.name for t in targets), pool.map(one, targets), strict=True))


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the rounds of one (target, scenario, concurrency): medians, errors summed."""
    cpus = [r.get("cpu_us_per_request") for r in runs]
    per_round_cpu = cpus if all(c is not None for c in cpus) else None
    if len(runs) == 1:
        return {**runs[0], "per_round_rps": [runs[0]["rps"]], "per_round_cpu_us": per_round_cpu}
    lat_keys = runs[0]["latency_ms"].keys()
    errors = {k: sum(r["errors"][k] for r in runs) for k in runs[0]["errors"]}
    return {
        "connections": runs[0]["connections"],
        "rounds": len(runs),
        "duration_s": sum(r["duration_s"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "rps": statistics.median(r["rps"] for r in runs),
        "ok_rps": statistics.median(r["ok_rps"] for r in runs),
        "bytes": sum(r["bytes"] for r in runs),
        "errors": errors,
        "error_total": sum(errors.values()),
        "latency_ms": {k: statistics.median(r["latency_ms"][k] for r in runs) for k in lat_keys},
        "cpu_us_per_request": None if per_round_cpu is None else statistics.median(per_round_cpu),
        "per_round_rps": [r["rps"] for r in runs],
        "per_round_cpu_us": per_round_cpu,
        "per_round_loadavg_1m_before": [r.get("loadavg_1m_before") for r in runs],
    }


def combine_rounds(rounds: list[dict[str, Any]], conns: int) -> dict[str, Any]:
    """rounds: [{scenario: {cN: result} | {error}}] for one target."""
    combined: dict[str, Any] = {}
    for scenario in SCENARIOS:
        per = [r[scenario] for r in rounds if scenario in r]
        if not per:
            continue
        good = [p for p in per if "error" not in p]
        if len(good) < len(per):
            combined[scenario] = {"error": next(p["error"] for p in per if "error" in p)}
            continue
        combined[scenario] = {
            key: median_runs([p[key] for p in good]) for key in ("c1", f"c{conns}")
        }
    return combined


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio_str(ratio: float) -> str:
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def error_str(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in errors.items() if v) or "none"


def pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.3g}%"


def get(results: dict[str, Any], target: str, scenario: str, key: str) -> dict[str, Any] | None:
    entry = results.get(target, {})
    if "error" in entry or "skipped" in entry:
        return None
    sc = entry.get(scenario)
    if not sc or "error" in sc:
        return None
    value = sc.get(key)
    return value if isinstance(value, dict) else None


def derive(results: dict[str, Any], scenario: str, conns: int) -> dict[str, Any]:
    """Gateway overheads vs direct and throughput ratios, for one scenario."""
    hi = f"c{conns}"
    out: dict[str, Any] = {}
    d1 = get(results, "direct", scenario, "c1")
    dhi = get(results, "direct", scenario, hi)
    for gw in GATEWAYS:
        g1 = get(results, gw, scenario, "c1")
        ghi = get(results, gw, scenario, hi)
        if g1 is None or ghi is None:
            continue
        entry: dict[str, Any] = {}
        if d1 is not None:
            entry["added_p50_c1_ms"] = g1["latency_ms"]["p50"] - d1["latency_ms"]["p50"]
            entry["added_p99_c1_ms"] = g1["latency_ms"]["p99"] - d1["latency_ms"]["p99"]
        if dhi is not None:
            entry[f"added_p50_{hi}_ms"] = ghi["latency_ms"]["p50"] - dhi["latency_ms"]["p50"]
            entry["rps_ratio_vs_direct"] = ghi["rps"] / dhi["rps"] if dhi["rps"] else None
        for other in ("nginx", "litellm"):
            if other == gw:
                continue
            o = get(results, other, scenario, hi)
            if o is not None and o["rps"]:
                entry[f"rps_ratio_vs_{other}"] = ghi["rps"] / o["rps"]
        if entry:
            out[gw] = entry
    return out


def paired_costs(variant_rps: list[float] | None, bare_rps: list[float] | None) -> list[float]:
    """1 - variant / bare, round by round; empty unless both have the same rounds."""
    if not variant_rps or not bare_rps or len(variant_rps) != len(bare_rps):
        return []
    return [1 - v / b for v, b in zip(variant_rps, bare_rps, strict=True) if b]


def access_chain(results: dict[str, Any], scenario: str, conns: int) -> dict[str, Any]:
    """What the access chain costs: each CHAIN_VARIANTS target against bastion-bare."""
    hi = f"c{conns}"
    b1 = get(results, CHAIN_BASE, scenario, "c1")
    bhi = get(results, CHAIN_BASE, scenario, hi)
    out: dict[str, Any] = {}
    if b1 is None or bhi is None:
        return out
    for variant in CHAIN_VARIANTS:
        v1 = get(results, variant, scenario, "c1")
        vhi = get(results, variant, scenario, hi)
        if v1 is None or vhi is None:
            continue
        notes = results[variant].get("setup", {}).get("notes", [])
        extra = any(n.startswith("--bastion-extra") for n in notes)
        vcpu, bcpu = vhi.get("cpu_us_per_request"), bhi.get("cpu_us_per_request")
        out[variant] = {
            "against": CHAIN_BASE,
            "what": VARIANT_WHAT[variant] + (" (changed by --bastion-extra)" if extra else ""),
            "added_p50_c1_ms": v1["latency_ms"]["p50"] - b1["latency_ms"]["p50"],
            "added_p99_c1_ms": v1["latency_ms"]["p99"] - b1["latency_ms"]["p99"],
            f"added_p50_{hi}_ms": vhi["latency_ms"]["p50"] - bhi["latency_ms"]["p50"],
            f"rps_{hi}": vhi["rps"],
            f"rps_{hi}_bare": bhi["rps"],
            # The share of the bare proxy's throughput that the access chain costs.
            f"rps_cost_{hi}": 1 - vhi["rps"] / bhi["rps"] if bhi["rps"] else None,
            # Round i of the variant against round i of the bare proxy: with --interleave
            # the two ran seconds apart, on the same servers.
            f"rps_cost_{hi}_per_round": paired_costs(
                vhi.get("per_round_rps"), bhi.get("per_round_rps")
            ),
            # The extra CPU time per request, the cost the machine's speed moves least.
            f"cpu_cost_{hi}": vcpu / bcpu - 1 if vcpu is not None and bcpu else None,
            f"cpu_us_per_request_{hi}": vcpu,
            f"cpu_us_per_request_{hi}_bare": bcpu,
            "had_errors": any(r["error_total"] for r in (b1, bhi, v1, vhi)),
        }
    return out


def print_tables(results: dict[str, Any], scenario: str, conns: int, title: str) -> None:
    hi = f"c{conns}"
    print()
    print(title)
    header = (
        f"{'target':<{TW}} {'rps@' + str(conns):>10} {'p50@1':>9} {'p99@1':>9}"
        f" {'p50@' + str(conns):>9} {'p99@' + str(conns):>9}  errors"
    )
    print(header)
    print("-" * len(header) + "--------")
    for target in ALL_TARGETS:
        if target not in results:
            continue
        entry = results[target]
        if "skipped" in entry or "error" in entry:
            if "skipped" in entry:
                why = f"skipped: {entry['skipped']}"
            else:
                why = f"!!! FAILED: {entry['error'].splitlines()[0] if entry['error'] else ''}"
            print(f"{target:<{TW}} ({why})"[:160])
            continue
        sc = entry.get(scenario)
        if sc is None:
            continue
        if "error" in sc:
            print(f"{target:<{TW}} !!! FAILED: {sc['error']}"[:160])
            continue
        r1, rh = sc["c1"], sc[hi]
        n_err = r1["error_total"] + rh["error_total"]
        err = (
            "0"
            if n_err == 0
            else f"{n_err}  !!! ERRORS: c=1 {error_str(r1['errors'])};"
            f" c={conns} {error_str(rh['errors'])}"
        )
        print(
            f"{target:<{TW}} {rh['rps']:>10.1f} {r1['latency_ms']['p50']:>9.3f}"
            f" {r1['latency_ms']['p99']:>9.3f} {rh['latency_ms']['p50']:>9.3f}"
            f" {rh['latency_ms']['p99']:>9.3f}  {err}"
        )
    print("(rps: requests/s, wrk -t1; latencies in ms; @1 = 1 connection)")

    derived = derive(results, scenario, conns)
    if derived:
        print()
        header = (
            f"{'gateway':<{TW}} {'+p50@1 ms':>10} {'+p99@1 ms':>10}"
            f" {'+p50@' + str(conns) + ' ms':>11} {'rps/direct':>11}"
            f"  throughput ratios (rps@{conns})"
        )
        print(header)
        print("-" * 110)
        for gw, d in derived.items():
            ratios = []
            for other in ("nginx", "litellm"):
                key = f"rps_ratio_vs_{other}"
                if d.get(key) is not None:
                    ratios.append(f"{gw}/{other} = {ratio_str(d[key])}")
            print(
                f"{gw:<{TW}} {fmt(d.get('added_p50_c1_ms')):>10}"
                f" {fmt(d.get('added_p99_c1_ms')):>10} {fmt(d.get(f'added_p50_{hi}_ms')):>11}"
                f" {pct(d.get('rps_ratio_vs_direct')):>11}  {'  '.join(ratios)}"
            )
        print("(+: added over direct, ms; rps/direct: rps@" + str(conns) + " as % of direct)")

    chain = access_chain(results, scenario, conns)
    if chain:
        print()
        header = (
            f"{'access chain':<{TW}} {'+p50@1 ms':>10} {'+p99@1 ms':>10}"
            f" {'+p50@' + str(conns) + ' ms':>11} {'rps@' + str(conns) + ' cost':>12}"
            f" {'CPU/req':>8}  what"
        )
        print(header)
        print("-" * 110)
        for variant, c in chain.items():
            cost = c[f"rps_cost_{hi}"]
            cpu = c[f"cpu_cost_{hi}"]
            print(
                f"{variant:<{TW}} {fmt(c['added_p50_c1_ms']):>10} {fmt(c['added_p99_c1_ms']):>10}"
                f" {fmt(c[f'added_p50_{hi}_ms']):>11}"
                f" {'-' if cost is None else f'{cost * 100:.1f}%':>12}"
                f" {'-' if cpu is None else f'{cpu * 100:+.1f}%':>8}  {c['what']}"
                f"{'  !!! ERRORS' if c['had_errors'] else ''}"
            )
        print(
            f"(against {CHAIN_BASE}, {VARIANT_WHAT[CHAIN_BASE]}; cost: 1 - rps@{conns}"
            f" / rps@{conns} of {CHAIN_BASE}; CPU/req: the gateway's CPU time per request"
            f" at c={conns} over {CHAIN_BASE}'s)"
        )


def verdict(results: dict[str, Any], conns: int, target: str = "bastion") -> dict[str, Any]:
    """The project's targets for one Bastion target, non-streaming, against direct/LiteLLM."""
    d = derive(results, "chat", conns).get(target, {})
    added = d.get("added_p50_c1_ms")
    ratio = d.get("rps_ratio_vs_litellm")
    runs = [get(results, target, "chat", k) for k in ("c1", f"c{conns}")]
    had_errors = any(r is not None and r["error_total"] for r in runs)
    return {
        "target": target,
        "added_p50_c1_ms": added,
        "added_p50_c1_target_ms": TARGET_ADDED_P50_MS,
        # A run with errors passes nothing: a fast error is not a fast proxy.
        "added_p50_c1_pass": None
        if added is None
        else added <= TARGET_ADDED_P50_MS and not had_errors,
        f"rps_c{conns}_vs_litellm": ratio,
        "rps_vs_litellm_target": TARGET_RATIO_VS_LITELLM,
        "rps_vs_litellm_pass": None
        if ratio is None
        else ratio >= TARGET_RATIO_VS_LITELLM and not had_errors,
        "bastion_had_errors": bool(had_errors),
    }


def chain_verdict(results: dict[str, Any], conns: int) -> dict[str, Any]:
    """The access chain's targets (non-streaming), for each variant against bastion-bare."""
    hi = f"c{conns}"
    out: dict[str, Any] = {}
    for variant, c in access_chain(results, "chat", conns).items():
        added, cost, bad = c["added_p50_c1_ms"], c[f"rps_cost_{hi}"], c["had_errors"]
        out[variant] = {
            **c,
            "added_p50_c1_target_ms": TARGET_CHAIN_ADDED_P50_MS,
            "added_p50_c1_pass": added <= TARGET_CHAIN_ADDED_P50_MS and not bad,
            "rps_cost_target": TARGET_CHAIN_RPS_COST,
            "rps_cost_pass": None if cost is None else cost <= TARGET_CHAIN_RPS_COST and not bad,
        }
    return out


def verdict_word(ok: bool | None, had_errors: bool) -> str:
    if ok is None:
        return "n/a (not measured)"
    if had_errors:
        return "FAIL (errors during the run)"
    return "PASS" if ok else "FAIL"


def print_verdict(v: dict[str, Any], conns: int) -> None:
    name, bad = v["target"], v["bastion_had_errors"]
    added = v["added_p50_c1_ms"]
    print(
        f"  {name}: added p50 at c=1 vs direct: {fmt(added)} ms"
        f" (target <= {TARGET_ADDED_P50_MS:g} ms): {verdict_word(v['added_p50_c1_pass'], bad)}"
    )
    ratio = v[f"rps_c{conns}_vs_litellm"]
    shown = "-" if ratio is None else f"{ratio:.1f}x"
    print(
        f"  {name}: rps@{conns} / LiteLLM rps@{conns}: {shown}"
        f" (target >= {TARGET_RATIO_VS_LITELLM:g}x): {verdict_word(v['rps_vs_litellm_pass'], bad)}"
    )
    if bad:
        print(f"  !!! {name} had errors during the measurement: the numbers above are suspect.")


def print_chain_verdict(chain: dict[str, Any], conns: int, shared_core: bool = False) -> None:
    hi = f"c{conns}"
    print(f"Access chain (non-streaming), against {CHAIN_BASE} ({VARIANT_WHAT[CHAIN_BASE]}):")
    if not chain:
        print(f"  n/a (not measured: needs {CHAIN_BASE} and {' or '.join(CHAIN_VARIANTS)})")
    for variant, c in chain.items():
        bad = c["had_errors"]
        cost = c[f"rps_cost_{hi}"]
        print(f"  {variant} ({c['what']}):")
        print(
            f"    added p50 at c=1: {fmt(c['added_p50_c1_ms'])} ms"
            f" (target <= {TARGET_CHAIN_ADDED_P50_MS:g} ms):"
            f" {verdict_word(c['added_p50_c1_pass'], bad)}"
        )
        how = ", side by side on one core" if shared_core else ""
        print(
            f"    throughput cost at c={conns}{how}:"
            f" {'-' if cost is None else f'{cost * 100:.1f}%'}"
            f" ({c[f'rps_{hi}']:.0f} vs {c[f'rps_{hi}_bare']:.0f} rps;"
            f" target <= {TARGET_CHAIN_RPS_COST * 100:g}%): {verdict_word(c['rps_cost_pass'], bad)}"
        )
        per_round = c[f"rps_cost_{hi}_per_round"]
        if len(per_round) > 1:
            shown = ", ".join(f"{x * 100:.1f}" for x in per_round)
            print(f"      per round: {shown} % (median {statistics.median(per_round) * 100:.1f} %)")
        cpu = c[f"cpu_cost_{hi}"]
        if cpu is not None:
            print(
                f"      CPU time per request at c={conns}: {cpu * 100:+.1f}%"
                f" ({c[f'cpu_us_per_request_{hi}']:.1f} vs"
                f" {c[f'cpu_us_per_request_{hi}_bare']:.1f} us)"
            )
        if bad:
            print(f"    !!! errors during the measurement of {variant} or {CHAIN_BASE}")


def cmd_output(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (p.stdout + p.stderr).strip()
    return text.splitlines()[0] if text else f"unavailable (status {p.returncode})"


def pkg_version(python: Path, pkg: str) -> str:
    if not python.exists():
        return "not installed"
    code = f"import importlib.metadata as m; print(m.version({pkg!r}))"
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
    try:
        p = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return p.stdout.strip() if p.returncode == 0 else "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment_info(args: argparse.Namespace) -> dict[str, Any]:
    targets = args.target_list
    info: dict[str, Any] = {
        "nginx": cmd_output(["nginx", "-v"]),
        "wrk": cmd_output(["wrk", "-v"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    if "litellm" in targets:
        info["litellm"] = pkg_version(args.litellm_venv / "bin" / "python", "litellm")
        info["litellm_uvicorn"] = pkg_version(args.litellm_venv / "bin" / "python", "uvicorn")
    if any(t in BASTIONS for t in targets):
        py = PROJECT_VENV / "bin" / "python"
        info["bastion"] = pkg_version(py, "bastion")
        info["bastion_uvicorn"] = pkg_version(py, "uvicorn")
        info["bastion_git"] = cmd_output(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"]
        )
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure the latency/throughput a gateway adds over a static upstream.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    p.add_argument("--quick", action="store_true", help="3 s per measurement, 1 s warm-up")
    p.add_argument("--warmup", type=int, default=3, help="warm-up seconds per target/scenario")
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    p.add_argument("--connections", type=int, default=32, help="the high concurrency level")
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure stream: true requests (secondary table)",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat everything; report medians")
    p.add_argument(
        "--shared-core",
        action="store_true",
        help="measure the proxies' high concurrency all at once, every proxy's servers on"
        " the gateway core (one wrk each): the throughputs then compare CPU cost per request"
        " in the same seconds; implies --interleave (c=1 stays one target at a time)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="start every target once and keep it up: each round measures each target in"
        " turn on the same servers (warm-up in the first round only), so a slow spell of the"
        " machine hits every target alike; use with many short rounds",
    )
    p.add_argument("--gateway-cpu", type=int, default=0, help="core for the proxy under test")
    p.add_argument("--load-cpu", type=int, default=1, help="core for wrk and the static upstream")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--wrk-timeout", type=int, default=30, help="wrk per-request timeout, s")
    p.add_argument(
        "--startup-timeout", type=float, default=180, help="seconds to wait for a server"
    )
    p.add_argument(
        "--json-out", type=Path, default=None, help="results file (default bench/results/)"
    )
    p.add_argument(
        "--litellm-venv", type=Path, default=LITELLM_VENV, help="venv made by setup_litellm.sh"
    )
    p.add_argument(
        "--bastion-extra",
        type=json.loads,
        default={},
        metavar="JSON",
        help="merged into the generated config of every Bastion variant,"
        ' e.g. \'{"server": {"upstream_transport": "aiohttp"}}\'',
    )
    p.add_argument(
        "--redis-url",
        default=PRIVATE_REDIS,
        help="Redis for bastion-secure's rate limits: 'private' (default) starts a"
        " redis-server of the run's own, pinned to the load core; or a running one's URL",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs of the run")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3, 1
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        p.error(f"--targets: unknown {unknown}; choose from {','.join(ALL_TARGETS)}")
    args.target_list = [t for t in ALL_TARGETS if t in targets]  # fixed order
    if args.shared_core:
        args.interleave = True
    if args.duration < 1 or args.rounds < 1 or args.connections < 2:
        p.error("--duration and --rounds must be >= 1, --connections >= 2")
    return args


def check_tools(args: argparse.Namespace) -> None:
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None]
    if not args.no_pin and shutil.which("taskset") is None:
        missing.append("taskset")
    if missing:
        sys.exit(
            f"proxy_overhead: missing {', '.join(missing)}; install with "
            "`apt-get install -y nginx wrk util-linux` (do not start the nginx service)"
        )


def measure_shared_round(
    ctx: Ctx,
    live: dict[str, Target],
    rounds: dict[str, list[dict[str, Any]]],
    status: dict[str, dict[str, str]],
    scenarios: list[str],
) -> None:
    """--shared-core: this round's high-concurrency figures of every live proxy, taken
    together (measure_together) and filed into the round measure_target began."""
    hi = f"c{ctx.args.connections}"
    for scenario in scenarios:
        group = [
            t
            for name, t in live.items()
            if t.procs
            and name not in status
            and rounds[name]
            and "error" not in rounds[name][-1].get(scenario, {"error": ""})
        ]
        if not group:
            continue
        names = ", ".join(t.name for t in group)
        print(f"\n[{names}] c={ctx.args.connections} at once, sharing one core", flush=True)
        for name, r in measure_together(ctx, group, scenario).items():
            if isinstance(r, Exception):
                print(f"  !!! {name} FAILED: {r}", flush=True)
                status[name] = {"error": str(r)}
                rounds[name].pop()  # this round has no high-concurrency figure
                for proc in live.pop(name).procs:
                    ctx.processes.stop(proc)
                continue
            rounds[name][-1][scenario][hi] = r
            print_run(name, scenario, r, " (shared core)")


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same path as Ctrl-C: stop everything, keep partial results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools(args)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    # Ctrl-C must reach the cleanup even when started in the background (where SIGINT is
    # ignored by default).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    gateway_cpu: int | None = args.gateway_cpu
    load_cpu: int | None = args.load_cpu
    ncpu = len(os.sched_getaffinity(0))
    if args.no_pin or ncpu < 2:
        if not args.no_pin:
            print(f"warning: only {ncpu} CPU(s) usable: not pinning", file=sys.stderr)
        gateway_cpu = load_cpu = None

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    processes = Processes(workdir)
    ctx = Ctx(args, workdir, processes, free_port(), free_port(), gateway_cpu, load_cpu)
    scenarios = ["chat", "stream"] if args.stream else ["chat"]
    info = environment_info(args)

    print("Bastion proxy overhead benchmark")
    for key in ("nginx", "wrk", "litellm", "bastion", "python", "cpu", "cpus", "kernel"):
        if key in info:
            print(f"  {key:<8} {info[key]}")
    pin = (
        "no pinning"
        if gateway_cpu is None
        else f"gateway on CPU {gateway_cpu}; wrk + static upstream on CPU {load_cpu}"
    )
    print(
        f"  run      {args.duration}s per measurement, {args.warmup}s warm-up,"
        f" c=1 and c={args.connections}, rounds={args.rounds}"
        f"{' (interleaved: targets started once)' if args.interleave else ''},"
        f" scenarios={scenarios}; {pin}"
    )
    print(f"  workdir  {workdir}")
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(
            f"  WARNING: load average is {load1:.2f} before the run: something else is using"
            " the CPUs, expect noisy numbers (see --rounds)"
        )

    rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in args.target_list}
    status: dict[str, dict[str, str]] = {}
    setup: dict[str, dict[str, Any]] = {}
    interrupted = False
    try:
        try:
            upstream = start_upstream(ctx)
        except (RuntimeError, OSError, ValueError) as exc:
            print(f"!!! could not start the static upstream: {exc}", file=sys.stderr)
            return 1
        print(f"  static upstream: JSON on :{ctx.json_port}, SSE on :{ctx.sse_port}")
        live: dict[str, Target] = {}  # --interleave: started once, measured every round
        for rnd in range(args.rounds):
            for name in args.target_list:
                if name in status:  # skipped or failed in an earlier round
                    continue
                print(f"\n[{name}] round {rnd + 1}/{args.rounds}", flush=True)
                target: Target | None = live.get(name)
                first = target is None
                try:
                    if target is None:
                        t0 = time.monotonic()
                        target = STARTERS[name](ctx)
                        if target.procs:
                            print(f"  started in {time.monotonic() - t0:.1f}s", flush=True)
                        if target.info:
                            setup[name] = target.info
                        if args.interleave:
                            live[name] = target
                    # --shared-core: the proxies' high concurrency comes after the round.
                    levels = (1,) if args.shared_core and target.procs else None
                    rounds[name].append(measure_target(ctx, target, scenarios, first, levels))
                except SkipTarget as exc:
                    print(f"  SKIPPED {name}: {exc}", flush=True)
                    status[name] = {"skipped": str(exc)}
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    print(f"  !!! {name} FAILED: {exc}", flush=True)
                    status[name] = {"error": str(exc)}
                finally:
                    if target is not None and (not args.interleave or name in status):
                        live.pop(name, None)
                        for proc in target.procs:
                            processes.stop(proc)
                if not upstream.alive():
                    raise RuntimeError(f"static upstream died; log:\n{upstream.log_tail()}")
            if args.shared_core:
                measure_shared_round(ctx, live, rounds, status, scenarios)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything", file=sys.stderr)
    finally:
        processes.stop_all()
        if args.keep_tmp:
            print(f"  configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results: dict[str, Any] = {}
    for name in args.target_list:
        if name in status and not rounds[name]:
            results[name] = status[name]
        elif rounds[name]:
            results[name] = combine_rounds(rounds[name], args.connections)
            if name in status:
                results[name]["error"] = status[name].get("error", "")
        elif interrupted:
            results[name] = {"skipped": "not measured (interrupted)"}
        if name in setup and name in results:
            results[name]["setup"] = setup[name]

    title_rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    if args.shared_core:
        title_rounds += (
            f"; the proxies' c={args.connections} measured all at once on one core"
            " (--shared-core): each rps@32 is a share of that core, compare ratios"
        )
    print_tables(
        results,
        "chat",
        args.connections,
        f"Non-streaming chat completions ({args.duration}s each{title_rounds})",
    )
    if args.stream:
        print_tables(
            results,
            "stream",
            args.connections,
            f"Streaming chat completions, stream: true, full SSE body ({args.duration}s each"
            f"{title_rounds})",
        )
    verdicts = {t: verdict(results, args.connections, t) for t in VERDICT_TARGETS}
    chain = chain_verdict(results, args.connections)
    shown = [t for t in VERDICT_TARGETS if t in args.target_list]
    if shown:
        print()
        print("Verdict (non-streaming), against direct and LiteLLM:")
        for t in shown:
            print_verdict(verdicts[t], args.connections)
    if CHAIN_BASE in args.target_list and any(t in args.target_list for t in CHAIN_VARIANTS):
        print()
        print_chain_verdict(chain, args.connections, args.shared_core)

    flagged = [
        f"{t}/{s}/{k}: {r['error_total']} errors ({error_str(r['errors'])})"
        for t in results
        for s in SCENARIOS
        for k in ("c1", f"c{args.connections}")
        if (r := get(results, t, s, k)) and r["error_total"]
    ]
    failed = [
        f"{t}: {e['error'].splitlines()[0]} (details above)"
        for t, e in results.items()
        if e.get("error")
    ]
    failed += [
        f"{t}/{s}: {results[t][s]['error']}"
        for t in results
        for s in SCENARIOS
        if isinstance(results[t].get(s), dict) and "error" in results[t][s]
    ]
    if flagged or failed:
        print("\n!!! PROBLEMS IN THIS RUN (numbers of the affected targets are not trustworthy):")
        for line in flagged + failed:
            print(f"!!!   {line}"[:300])

    info["loadavg_end"] = os.getloadavg()
    report = {
        "benchmark": "proxy_overhead",
        "timestamp": stamp,
        "interrupted": interrupted,
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": [1, args.connections],
            "rounds": args.rounds,
            "interleave": args.interleave,
            "shared_core": args.shared_core,
            "targets": args.target_list,
            "scenarios": scenarios,
            "gateway_cpu": gateway_cpu,
            "load_cpu": load_cpu,
            "wrk_threads": 1,
            "wrk_timeout_s": args.wrk_timeout,
            "request_body": json.loads(request_body(MODEL_JSON, False)),
        },
        "environment": info,
        "results": results,
        "derived": {s: derive(results, s, args.connections) for s in scenarios},
        "access_chain": {s: access_chain(results, s, args.connections) for s in scenarios},
        "verdict": verdicts["bastion"],
        "verdict_secure": verdicts["bastion-secure"],
        "verdict_access_chain": chain,
        "problems": flagged + failed,
    }
    out = args.json_out or RESULTS_DIR / f"proxy_overhead-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {out}")
    if interrupted:
        return 130
    return 1 if (flagged or failed) else 0


if __name__ == "__main__":
    sys.exit(main())

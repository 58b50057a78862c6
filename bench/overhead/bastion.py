"""Bastion's variants (bench.overhead.catalog.VARIANT_WHAT), each configured as a
deployment would be, started with ``bastion serve --workers 1`` on the gateway core."""

from __future__ import annotations

import base64
import functools
import json
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

from bench.overhead.bodies import MODEL_JSON, MODEL_SSE
from bench.overhead.catalog import FEATURE_BASE, FEATURE_OFF, VARIANT_WHAT
from bench.overhead.paths import API_KEY, PROJECT_VENV, REPO_ROOT
from bench.overhead.processes import wait_ready
from bench.overhead.redis_wire import (
    REDIS_BUCKET_PREFIX,
    check_redis_bucket,
    private_redis,
    redis_command,
)
from bench.overhead.targets import Ctx, Endpoint, SkipTarget, Target, clean_env
from tests.support import deep_merge, free_port

PRIVATE_REDIS = "private"
"""--redis-url's default: a redis-server of the run's own."""


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


def bastion_cli(args: list[str], env: dict[str, str], cwd: Path) -> str:
    exe = PROJECT_VENV / "bin" / "bastion"
    p = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    if p.returncode != 0:
        raise RuntimeError(f"`bastion {' '.join(args)}` failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def create_store(database_url: str, env: dict[str, str], cwd: Path) -> None:
    """The gateway's database, made as `bastion serve` makes it at start-up: `bastion keys`
    works only on a store that exists."""
    code = "import sys; from gateway.store import make_engine, migrate;"
    code += " migrate(make_engine(sys.argv[1]))"
    python = PROJECT_VENV / "bin" / "python"
    p = subprocess.run(
        [str(python), "-c", code, database_url],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    if p.returncode != 0:
        raise RuntimeError(f"cannot create the store {database_url}: {p.stderr.strip()[-500:]}")


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
    features = []
    for key, label in (("audit", "audit"), ("guards", "guards")):
        if key in resolved:
            features.append(f"{label} {'on' if section(key).get('enabled') else 'OFF'}")
    if "logging" in resolved:
        features.append(f"access log {'on' if section('logging').get('access_log') else 'OFF'}")
    if features:
        notes.append(", ".join(features) + "; metrics on (no setting turns them off)")
    return notes


def start_bastion(ctx: Ctx, name: str) -> Target:
    """One Bastion variant (VARIANT_WHAT), configured as a deployment would be.

    Every variant: `bastion serve --workers 1`, a fresh master key, the store (sqlite) in
    the temp dir, the two static upstreams, everything else at Bastion's defaults.
    bastion-bare: dev, auth and rate limits off. bastion: auth on (a key is created) and
    in-memory rate limits far above what the benchmark sends. bastion-secure: TLS with a
    throw-away certificate, auth on with model allow-lists (role and key), rate limits in
    Redis, failing closed so a Redis problem shows up as errors rather than as an
    unlimited (and cheaper) gateway; audit, guards, metrics and the access log at their
    defaults (on). bastion-secure-no-*: bastion-secure with one feature switched off
    (catalog.FEATURE_OFF). --bastion-extra is merged into every variant.
    """
    why = bastion_runnable()
    if why:
        raise SkipTarget(why)
    base = FEATURE_BASE if name in FEATURE_OFF else name
    redis_url = ctx.args.redis_url
    if base == "bastion-secure":
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
    if base == "bastion-bare":
        config.update(dev=True, auth={"enabled": False}, rate_limits={"enabled": False})
    elif base == "bastion":
        config["rate_limits"] = dict(never_throttle)
    elif base == "bastion-secure":
        certfile, keyfile, client_tls = tls_material(cwd)
        config["server"]["tls"] = {"certfile": str(certfile), "keyfile": str(keyfile)}
        key_models = [MODEL_JSON, MODEL_SSE]
        config["auth"] = {"role_models": {"app": key_models}}
        config["rate_limits"] = {**never_throttle, "redis_failure_mode": "closed"}
        config["redis_url"] = redis_url
    else:
        raise ValueError(f"unknown Bastion variant {name!r}")
    if name in FEATURE_OFF:
        config = deep_merge(config, FEATURE_OFF[name][1])
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
        create_store(str(config["database_url"]), env, cwd)
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

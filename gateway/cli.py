"""The ``bastion`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from compliance.cli import audit_app
from compliance.export_cli import compliance_app
from compliance.records import KEY_CREATED, KEY_REVOKED
from gateway.config import (
    CONFIG_ENV_VAR,
    ROLES,
    ConfigError,
    Settings,
    StoreSettings,
    load_settings,
    load_store_settings,
)

app = typer.Typer(
    help="Bastion: a secure, observable, compliance-ready gateway for self-hosted LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
secrets_app = typer.Typer(help="Create the secrets Bastion needs.", no_args_is_help=True)
app.add_typer(secrets_app, name="secrets")
inference_app = typer.Typer(help="Run the vLLM inference tier.", no_args_is_help=True)
app.add_typer(inference_app, name="inference")
app.add_typer(audit_app, name="audit")
app.add_typer(compliance_app, name="compliance")

err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"YAML configuration file (default: ${CONFIG_ENV_VAR}).",
        dir_okay=False,
    ),
]


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"bastion: {message}", file=sys.stderr)
    raise typer.Exit(code=code)


def _load(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _prepare_store(settings: StoreSettings) -> None:
    """Check the secrets and bring the database schema up to date, once, before workers."""
    from gateway.credentials import load_audit_signing_key, load_master_key
    from gateway.store import make_engine, migrate

    try:
        load_master_key(settings)
        if isinstance(settings, Settings) and settings.audit.enabled:
            load_audit_signing_key(settings)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")
    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
    except SQLAlchemyError as exc:
        _fail(f"database {engine.url.render_as_string()}: {type(exc).__name__}: {exc.args[0]}")
    finally:
        engine.dispose()


def _run_server(settings: Settings, config: Path | None, log_level: str, access_log: bool) -> None:
    import importlib.util

    import uvicorn

    _prepare_store(settings)
    if settings.watermark.enabled:
        from gateway.watermark_check import load_watermark_keys

        try:
            load_watermark_keys(settings.watermark)
        except ConfigError as exc:
            _fail(f"configuration error: {exc}")

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
            _fail(f"configuration error: {exc}")
    if server.workers > 1:
        # Worker processes build their own app from the same file and environment.
        if config is not None:
            os.environ[CONFIG_ENV_VAR] = str(config.resolve())
        uvicorn.run("gateway.app:create_app", factory=True, workers=server.workers, **options)
        return
    from gateway.app import build_app

    uvicorn.run(build_app(settings), **options)


@app.command()
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
    settings = _load(config, server=overrides or None)
    _configure_logging(log_level)
    _run_server(settings, config, log_level, access_log)


def _discover_models(upstream: str) -> list[str]:
    url = upstream.rstrip("/") + "/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            listing = json.load(response)
        return [m["id"] for m in listing["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        _fail(f"cannot list the models of {url} ({exc}); name them with --model")


@app.command()
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
            _fail("--model names an --upstream's models; use --model-dir for a local model")
        document = _prepare_embedded(
            host, port, model_dir, inference_port, inference_venv.absolute()
        )
        model_name = document["upstreams"][0]["models"][0]
        served = f"local vLLM tier on :{inference_port} serving {model_name}"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    settings = _load(config_path)
    admin_key, _ = _key_store(config_path).create(["admin"], description="bastion dev")

    def banner() -> None:
        err.print(f"[bold green]Bastion dev gateway[/] on http://{host}:{port}/v1")
        err.print(f"  {served}; config in {config_path}", soft_wrap=True)
        err.print(f"  admin key (shown once): [bold]{admin_key}[/]", soft_wrap=True)
        err.print("  Ctrl-C stops it.")

    _configure_logging("warning")
    if upstream is not None:
        banner()
        _run_server(settings, config_path, "warning", access_log=False)
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
                _fail(str(exc), code=1)
        err.print(f"  vLLM installed in {took:.0f} s")
    dev_model = model_dir is None
    if model_dir is None:
        model_dir = dev_setup.DEV_MODEL_DIR
        if not (model_dir / "config.json").is_file():
            with err.status("building the dev model") as status:
                build_dev_model(model_dir, on_step=lambda what: status.update(what))
            err.print(f"  dev model built in {model_dir}")
    elif not (model_dir / "config.json").is_file():
        _fail(f"--model-dir: {model_dir} is not a model directory (no config.json)")
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
                settings.inference, err, _tier_watermark_env(settings.inference, settings.watermark)
            ),
        ):
            banner()
            _run_server(settings, config_path, "warning", access_log=False)
    except KeyboardInterrupt:
        err.print("stopped")
    except LaunchError as exc:
        _report_launch_error(exc, settings.inference.python)


def _tier_watermark_env(inference: Any, watermark: Any) -> dict[str, str]:
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
        _fail(f"configuration error: {exc}")


def _report_launch_error(exc: Any, python: Path) -> NoReturn:
    if exc.tail:
        err.print(f"[bold]last lines of {python} -m vllm:[/]")
        for line in exc.tail[-20:]:
            err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    _fail(str(exc), code=1)


def _key_store(config: Path | None) -> Any:
    from gateway.credentials import derive_key, load_master_key
    from gateway.keys import KeyHasher, KeyStore
    from gateway.store import make_engine

    try:
        settings = load_store_settings(config)
        pepper = derive_key(load_master_key(settings), "api-key-pepper")
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")
    _prepare_store(settings)
    return KeyStore(make_engine(settings.database_url), KeyHasher(pepper))


def _audit_action(config: Path | None, kind: str, detail: dict[str, Any]) -> None:
    """Record an administrative action taken from the CLI in the audit log.

    A short chain of its own (one entry and a signed final checkpoint). Without a
    signing key (a store-only set-up) the action is done but not recorded: say so.
    """
    from compliance.appender import ChainAppender
    from compliance.keyring import KeyRing
    from compliance.records import AuditRecord
    from gateway.credentials import load_audit_signing_key, load_master_key
    from gateway.store import make_engine

    settings = load_store_settings(config)
    try:
        signing_key = load_audit_signing_key(settings)
        master_key = load_master_key(settings)
    except ConfigError as exc:
        err.print(f"[yellow]not recorded in the audit log[/]: {exc}", soft_wrap=True)
        return
    engine = make_engine(settings.database_url)
    try:
        appender = ChainAppender(engine, KeyRing(engine, master_key), signing_key)
        appender.append(AuditRecord(kind=kind, key_id=None, route="cli", status=0, detail=detail))
        appender.close()
    finally:
        engine.dispose()


@keys_app.command("create")
def keys_create(
    role: Annotated[
        list[str], typer.Option("--role", "-r", help=f"One of {', '.join(ROLES)}; repeatable.")
    ],
    subject: Annotated[
        str | None, typer.Option(help="The data subject (person) the key acts for.")
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated model allow-list for this key.")
    ] = None,
    tier: Annotated[str, typer.Option(help="Scheduling tier (see priority.tiers).")] = "standard",
    expires: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 30d, 12h, 1w (default: never).")
    ] = None,
    description: Annotated[str, typer.Option(help="A note for admins.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Create a key and print it. It is shown this once: only its hash is stored."""
    from gateway.keys import parse_duration

    try:
        lifetime = parse_duration(expires) if expires else None
    except ValueError as exc:
        _fail(f"--expires: {exc}")
    unknown = [r for r in role if r not in ROLES]
    if unknown:
        _fail(f"--role: unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    model_list = [m.strip() for m in models.split(",") if m.strip()] if models else None
    store = _key_store(config)
    key, info = store.create(
        role,
        subject_id=subject,
        models=model_list,
        tier=tier,
        expires_in=lifetime,
        description=description,
    )
    described = {k: v for k, v in info.as_json().items() if k != "subject"}
    _audit_action(config, KEY_CREATED, {"key": described, "via": "cli"})
    if as_json:
        typer.echo(json.dumps({**info.as_json(), "key": key}))
        return
    typer.echo(key)
    err.print(f"key id {info.id}, roles {', '.join(info.roles)}: store it now, it is not kept.")


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option(help="Show revoked keys too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List keys (never their secrets)."""
    keys = _key_store(config).all(include_revoked)
    if as_json:
        typer.echo(json.dumps([k.as_json() for k in keys]))
        return
    table = Table("id", "roles", "subject", "models", "tier", "expires", "revoked")
    for k in keys:
        table.add_row(
            k.id,
            ",".join(k.roles),
            k.subject_id or "",
            ",".join(k.models) if k.models is not None else "*",
            k.tier,
            k.expires_at.isoformat(timespec="seconds") if k.expires_at else "never",
            k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "",
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOption = None) -> None:
    """Revoke a key; every gateway process refuses it within auth.key_refresh_s."""
    info = _key_store(config).revoke(key_id)
    if info is None:
        _fail(f"there is no key {key_id!r}")
    _audit_action(config, KEY_REVOKED, {"key_id": key_id, "via": "cli"})
    typer.echo(f"revoked {key_id}")


@secrets_app.command("create-master-key")
def create_master_key(path: Path) -> None:
    """Write a new random master key (base64, mode 0600) to PATH."""
    from gateway.credentials import create_key_file

    try:
        create_key_file(path)
    except FileExistsError:
        _fail(f"{path} exists; not overwriting a master key")
    err.print(f"master key written to {path}; set BASTION_MASTER_KEY_FILE={path.resolve()}")


@secrets_app.command("create-signing-key")
def create_signing_key(path: Path) -> None:
    """Write a new Ed25519 private key (PEM, mode 0600) for audit checkpoints to PATH."""
    from compliance.signing import create_signing_key_file, fingerprint

    try:
        key = create_signing_key_file(path)
    except FileExistsError:
        _fail(f"{path} exists; not overwriting a signing key")
    err.print(
        f"signing key {fingerprint(key.public_key())} written to {path}; "
        f"set BASTION_SIGNING_KEY_FILE={path.resolve()}"
    )


@inference_app.command("serve")
def inference_serve(config: ConfigOption = None) -> None:
    """Start vLLM's OpenAI server from the `inference:` settings; Ctrl-C stops it."""
    from gateway.config import load_inference_settings
    from inference.launch import serve_tier
    from inference.supervisor import LaunchError

    try:
        tier = load_inference_settings(config)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")
    extra_env = _tier_watermark_env(tier.inference, tier.watermark)
    try:
        serve_tier(tier.inference, err, extra_env)
    except LaunchError as exc:
        _report_launch_error(exc, tier.inference.python)


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
            took = install(venv_dir, on_progress=lambda line: status.update(line))
        except InstallError as exc:
            for line in exc.tail[-20:]:
                err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
            _fail(str(exc), code=1)
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
            _fail(str(exc))
    err.print(
        f"[bold green]dev model[/] (seed {seed}) in {directory}; serve it with "
        f"inference.model: {directory}",
        soft_wrap=True,
    )


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration and print it as resolved (secrets hidden)."""
    settings = _load(config)
    shown = settings.model_dump(mode="json", exclude={"upstreams": {"__all__": {"api_key"}}})
    typer.echo(yaml.safe_dump(shown, sort_keys=False))


if __name__ == "__main__":
    app()

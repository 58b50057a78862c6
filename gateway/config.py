"""Bastion's configuration: one YAML file, every field overridable by ``BASTION_*`` variables.

Precedence, highest first: explicit overrides (CLI flags), environment variables
(``BASTION_SERVER__PORT=9000``; lists and objects as JSON, ``BASTION_UPSTREAMS='[...]'``),
the YAML file (``--config`` or ``BASTION_CONFIG``), defaults.

Everything is validated at start-up; :func:`load_settings` turns the first problem into a
:class:`ConfigError` whose message is one line naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gateway.config_paths import resolve_relative_paths
from gateway.guards.settings import GuardSettings
from inference.settings import InferenceSettings
from monitors.anomaly.settings import AnomalySettings
from monitors.events.settings import EventSettings
from monitors.logs import LoggingSettings
from monitors.metrics_listener import parse_listen

CONFIG_ENV_VAR = "BASTION_CONFIG"

PositiveSeconds = Annotated[float, Field(gt=0, le=3600)]


class ConfigError(Exception):
    """The configuration cannot be used; ``str(err)`` is one line naming the field."""


class Section(BaseModel):
    """A configuration section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Mozilla's "intermediate" TLS 1.2 cipher suites (ssl-config.mozilla.org, guideline 5.7);
# TLS 1.3 suites are fixed by OpenSSL and all strong.
MOZILLA_INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)

Role = Literal["admin", "model_admin", "data_scientist", "app", "auditor"]
ROLES: tuple[Role, ...] = ("admin", "model_admin", "data_scientist", "app", "auditor")


class TLSSettings(Section):
    """TLS on the listener: TLS 1.2 and 1.3 only, Mozilla intermediate ciphers."""

    certfile: FilePath
    keyfile: FilePath
    ciphers: str = MOZILLA_INTERMEDIATE_CIPHERS
    client_ca: FilePath | None = None
    """Mutual TLS: client certificates must be signed by this CA (PEM bundle)."""
    client_cert: Literal["none", "optional", "required"] = "none"
    hsts_max_age_s: int = Field(default=31_536_000, ge=0)
    """``Strict-Transport-Security`` on every TLS response; 0 sends none."""

    @model_validator(mode="after")
    def _client_ca_for_mtls(self) -> Self:
        if self.client_cert != "none" and self.client_ca is None:
            raise ValueError("client_ca is required when client_cert is optional or required")
        return self


class UpstreamTLSSettings(Section):
    """TLS towards an ``https://`` upstream."""

    verify: bool = True
    ca_file: FilePath | None = None
    """CA bundle that signed the upstream's certificate (default: the system's)."""
    client_certfile: FilePath | None = None
    client_keyfile: FilePath | None = None

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.client_certfile is None) != (self.client_keyfile is None):
            raise ValueError("client_certfile and client_keyfile go together")
        return self


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=256)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """The most a request's head (target and headers) may take: a larger one is answered
    431 and its connection closed, before the rest of it is read."""
    shutdown_grace_s: PositiveSeconds = 10.0
    """On SIGTERM, how long in-flight calls (streams) may take to finish before they are
    cut; a rollout's terminationGracePeriodSeconds must be longer."""
    body_timeout_s: PositiveSeconds = 30.0
    """A request body must arrive within this (408 after it): a client sending a byte now
    and then cannot hold a connection for good."""
    metrics_listen: str | None = None
    """An internal ``host:port`` serving only ``/metrics``, every worker summed, without a
    key (for a Prometheus on a private network); None: only the keyed ``/metrics``."""

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    max_json_depth: int = Field(default=64, ge=4, le=200)
    """The deepest nesting of arrays and objects a model call's body may have (400 past
    it). Well under the audit encoder's 254, so whatever is forwarded can be recorded."""
    tls: TLSSettings | None = None
    expose_upstream_header: bool = True
    """Send ``x-bastion-upstream`` (the serving upstream's name) on proxied responses."""
    gc_young_threshold: int = Field(default=10_000, ge=100, le=10_000_000)
    """Python's first garbage-collector threshold while serving (Python's default: 700).

    A collection of the young generation starts whenever this many more container
    objects have been allocated than freed. 32 requests in flight hold more than 700
    between them, so at Python's default the collector walks them again and again,
    though the requests' objects are freed by reference counting anyway."""


class UpstreamSettings(Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    url: AnyHttpUrl
    models: list[str] = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    api_key: str | None = Field(default=None, repr=False)
    tls: UpstreamTLSSettings = UpstreamTLSSettings()

    @field_validator("models")
    @classmethod
    def _models_are_names(cls, models: list[str]) -> list[str]:
        for model in models:
            if not model or model != model.strip():
                raise ValueError(f"model name {model!r} is empty or has surrounding spaces")
        if len(set(models)) != len(models):
            raise ValueError("lists a model twice")
        return models

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")


class TimeoutSettings(Section):
    connect_s: PositiveSeconds = 2.0
    read_s: PositiveSeconds = 60.0
    """Longest silence between two reads from an upstream before the request times out."""


class HealthCheckSettings(Section):
    enabled: bool = True
    path: str = Field(default="/health", pattern=r"^/")
    interval_s: PositiveSeconds = 5.0
    timeout_s: PositiveSeconds = 2.0
    unhealthy_after: int = Field(default=2, ge=1)
    healthy_after: int = Field(default=1, ge=1)


class CircuitBreakerSettings(Section):
    failure_threshold: int = Field(default=5, ge=1)
    open_s: PositiveSeconds = 10.0


class RetrySettings(Section):
    max_attempts: int = Field(default=2, ge=1, le=10)


class CertificatePrincipal(Section):
    """A client certificate subject (RFC 4514, e.g. ``CN=app-1,O=Bank``) acting as a key."""

    subject: str = Field(min_length=1)
    roles: list[Role] = Field(min_length=1)
    subject_id: str | None = None
    models: list[str] | None = None
    tier: str = "standard"


class AuthSettings(Section):
    enabled: bool = True
    """Off only in a dev setup: every caller is then an anonymous admin."""
    key_refresh_s: PositiveSeconds = 1.0
    """How often each process re-reads changed keys: revocation takes effect within this."""
    client_certificates: list[CertificatePrincipal] = []
    role_models: dict[Role, list[str]] = {}
    """Per-role model allow-lists; a role not listed may use every model ("*" = all)."""


class RateLimitSettings(Section):
    """Token buckets per key: requests per second and (estimated) tokens per minute."""

    enabled: bool = True
    requests_per_second: float = Field(default=10.0, gt=0)
    burst: int | None = Field(default=None, ge=1)
    """Bucket size for requests (default: requests_per_second, at least 1)."""
    tokens_per_minute: int = Field(default=100_000, ge=1)
    redis_failure_mode: Literal["open", "closed"] = "open"
    """When Redis is unreachable: let requests through (open) or refuse them (closed)."""
    redis_timeout_s: float = Field(default=0.25, gt=0, le=60)
    """How long a check waits for Redis before the failure mode answers instead."""
    response_headers: Literal["always", "on_refusal"] = "always"
    """``x-ratelimit-*`` on every answer, as OpenAI does (``always``), or only on 429s;
    six headers on every answer cost about 4 % of the gateway's instructions per request
    (bench/README.md, chain_instructions.py)."""


class PrioritySettings(Section):
    """A key's tier becomes vLLM's ``priority`` field (lower is served first)."""

    enabled: bool = True
    tiers: dict[str, int] = {"critical": -10, "standard": 0, "batch": 10}


class CanarySettings(Section):
    model: str = Field(min_length=1)
    version: str = Field(min_length=1)
    share: float = Field(gt=0, lt=1)


class WatermarkSettings(Section):
    """The Kirchenbauer watermark's detector (inference/watermark.py holds the scheme).

    Keys come from ``keys_file`` and ``BASTION_WATERMARK_KEYS``, never from the YAML.
    """

    enabled: bool = False
    """Score answers (``x-bastion-watermark``) and serve ``POST /v1/watermark/detect``."""
    gamma: float = Field(default=0.25, gt=0, lt=1)
    """Green share of the vocabulary; must match the inference tier's."""
    delta: float = Field(default=2.0, ge=0, le=20)
    """Logit bias on green tokens at generation (the inference tier's; not used to detect)."""
    z_threshold: float = Field(default=4.0, gt=0)
    """z at or above which a text is watermarked (4: one false positive in ~20,000)."""
    keys_file: FilePath | None = None
    """``key_id: base64 secret`` lines, or a JSON object ``{"key_id": "base64"}``."""
    generation_key_id: str | None = None
    """The key id the inference tier watermarks with (default: the last one listed)."""
    tokenizers: dict[str, Path] = {}
    """Model name -> its directory holding ``tokenizer.json`` (or that file itself)."""

    @field_validator("tokenizers")
    @classmethod
    def _tokenizer_files(cls, tokenizers: dict[str, Path]) -> dict[str, Path]:
        for model, path in tokenizers.items():
            if not path.is_file() and not (path / "tokenizer.json").is_file():
                raise ValueError(f"{model}: no tokenizer.json in {path}")
        return tokenizers


class AuditSettings(Section):
    """The tamper-evident audit log (compliance/; docs/audit.md)."""

    enabled: bool = True
    """One entry per model call and per administrative action (off: logged as a warning)."""
    payloads: bool = True
    """Keep each call's request and answer, encrypted under its subject's data key."""
    checkpoint_every_entries: int = Field(default=1000, ge=1)
    """Sign the chain head after this many entries..."""
    checkpoint_every_s: float = Field(default=10.0, gt=0)
    """... or once the oldest unsigned entry is this old."""
    queue_size: int = Field(default=10_000, ge=1)
    """Entries waiting for their commit; a full queue makes new calls wait (backpressure)."""
    retention_days: int = Field(default=90, ge=1)
    """Older entries are removed (the EU AI Act asks for >= 180): by the gateway on its
    schedule, and by ``bastion audit retention``."""
    retention_interval_s: float = Field(default=3600.0, ge=0)
    """How often the gateway applies retention (one process of all those sharing the
    database at a time, behind a lease); 0: never, run ``bastion audit retention``."""


class AdminSettings(Section):
    """``admin:`` in the configuration."""

    allow_privileged_keys: bool = False
    """Let ``POST /admin/keys`` mint auditor and admin keys, and keys for subjects that
    already have audit entries (separation of duties: by default only the CLI, which
    holds the master key, may)."""


class StoreSettings(BaseSettings):
    """What the stores and secrets need: enough for ``bastion keys`` without upstreams."""

    model_config = SettingsConfigDict(
        env_prefix="BASTION_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    dev: bool = False
    """A development setup: lets ``bastion serve`` start without production secrets."""
    database_url: str = "sqlite:///bastion.db"
    """SQLAlchemy URL of the store (keys, audit, privacy ledger); ``postgresql://`` works."""
    redis_url: str | None = None
    elasticsearch_url: str | None = None
    master_key: SecretStr | None = Field(default=None, repr=False)
    """32 random bytes, base64; from BASTION_MASTER_KEY only (never the YAML)."""
    master_key_file: Path | None = None
    signing_key_file: Path | None = None
    """Ed25519 private key, PEM: audit checkpoints, exports, receipts (BASTION_SIGNING_KEY_FILE)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML document arrives as init kwargs (see load_settings); environment
        # variables must win over it and CLI overrides over both, so the YAML part is
        # passed under a private key and re-ordered here.
        assert isinstance(init_settings, InitSettingsSource)
        kwargs = dict(init_settings.init_kwargs)
        yaml_doc = kwargs.pop("__yaml__", {})
        overrides = InitSettingsSource(settings_cls, init_kwargs=kwargs)
        from_yaml = InitSettingsSource(settings_cls, init_kwargs=yaml_doc)
        return (overrides, env_settings, from_yaml)


class Settings(StoreSettings):
    """The whole validated configuration, read once at start-up and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="BASTION_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    upstreams: list[UpstreamSettings] = Field(min_length=1)
    timeouts: TimeoutSettings = TimeoutSettings()
    health_check: HealthCheckSettings = HealthCheckSettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    retry: RetrySettings = RetrySettings()
    canaries: list[CanarySettings] = []
    auth: AuthSettings = AuthSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    priority: PrioritySettings = PrioritySettings()
    watermark: WatermarkSettings = WatermarkSettings()
    inference: InferenceSettings = InferenceSettings()
    """The vLLM tier that ``bastion inference serve`` starts (inference/settings.py)."""
    audit: AuditSettings = AuditSettings()
    admin: AdminSettings = AdminSettings()
    anomaly: AnomalySettings = AnomalySettings()
    """Anomaly detection over the request events (monitors/anomaly, docs/anomaly.md)."""
    guards: GuardSettings = GuardSettings()
    """Input and output guards (gateway/guards/settings.py, docs/guards.md); on by default."""
    logging: LoggingSettings = LoggingSettings()
    """Structured logs and the access log (monitors/logs.py)."""
    events: EventSettings = EventSettings()
    """Request events shipped to Elasticsearch/OpenSearch (monitors/events/settings.py);
    ``BASTION_ELASTICSEARCH_URL`` (``elasticsearch_url``) sets ``events.url``."""

    @model_validator(mode="after")
    def _events_url(self) -> Self:
        if self.elasticsearch_url and self.events.url is None:
            events = self.events.model_copy(update={"url": self.elasticsearch_url})
            object.__setattr__(self, "events", EventSettings.model_validate(events.model_dump()))
        return self

    @model_validator(mode="after")
    def _check_references(self) -> Self:
        if not self.auth.enabled and not self.dev:
            raise ValueError("auth.enabled: authentication can be off only in a dev setup")

        names = [u.name for u in self.upstreams]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"upstreams: duplicate name {duplicates[0]!r}")
        served = self.models()
        seen: set[str] = set()
        for i, canary in enumerate(self.canaries):
            for field in ("model", "version"):
                if getattr(canary, field) not in served:
                    raise ValueError(
                        f"canaries.{i}.{field}: model {getattr(canary, field)!r} "
                        "is not served by any upstream"
                    )
            if canary.model == canary.version:
                raise ValueError(f"canaries.{i}.version: must differ from the model")
            if canary.model in seen:
                raise ValueError(f"canaries.{i}.model: {canary.model!r} has two canaries")
            seen.add(canary.model)
        return self

    def models(self) -> list[str]:
        """Every model name served by some upstream, in configuration order."""
        return list(dict.fromkeys(m for u in self.upstreams for m in u.models))


class InferenceTierSettings(StoreSettings):
    """Only what ``bastion inference serve`` needs: a GPU host's YAML may hold nothing else."""

    inference: InferenceSettings = InferenceSettings()
    watermark: WatermarkSettings = WatermarkSettings()
    """Read for the generating key, gamma and delta when ``inference.watermark`` is on."""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return document


def _describe(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    message = first["msg"]
    if kind == "field_error":  # a section's validator naming a field inside it
        ctx = first.get("ctx", {})
        location = ".".join(p for p in (location, ctx["field"]) if p)
        message = ctx["reason"]
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "is required"
    elif kind == "path_not_file":
        message = f"file not found: {first.get('input')}"
    elif kind == "too_short" and location.endswith("models"):
        message = "must list at least one model"
    elif kind == "too_short" and location == "upstreams":
        message = "at least one upstream is required"
    elif kind.startswith("url"):
        message = f"not a valid http(s) URL ({message}): {first.get('input')!r}"
    message = message.removeprefix("Value error, ")
    if not location:
        return message
    return f"{location}: {message}"


SECRET_FIELDS = ("master_key",)


SettingsT = TypeVar("SettingsT", bound=StoreSettings)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read, merge and validate the configuration, or raise :class:`ConfigError`."""
    return _load(Settings, path, overrides)


def load_store_settings(path: str | Path | None = None) -> StoreSettings:
    """Only the store and secret settings (other sections are not checked)."""
    return _load(StoreSettings, path, {})


def load_inference_settings(path: str | Path | None = None) -> InferenceTierSettings:
    """The ``inference:`` and ``watermark:`` sections (with ``BASTION_*``); others unchecked."""
    return _load(InferenceTierSettings, path, {})


def _load(cls: type[SettingsT], path: str | Path | None, overrides: dict[str, Any]) -> SettingsT:
    config_path = path if path is not None else os.environ.get(CONFIG_ENV_VAR)
    yaml_doc = _read_yaml(Path(config_path)) if config_path else {}
    if config_path:  # paths in a file are relative to the file, not to where one stands
        yaml_doc = resolve_relative_paths(cls, yaml_doc, Path(config_path).absolute().parent)
    for field in SECRET_FIELDS:
        if field in yaml_doc:
            raise ConfigError(
                f"{field}: secrets are never read from the YAML; "
                f"set BASTION_{field.upper()} or BASTION_{field.upper()}_FILE"
            )
    clean = {key: value for key, value in overrides.items() if value is not None}
    try:
        return cls(__yaml__=yaml_doc, **clean)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc

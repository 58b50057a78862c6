"""``events:`` settings, and the credentials that never come from the YAML.

Secrets (a password, an API key) are read from the environment or from files named in
the settings, at start-up, by :func:`cluster_auth`: the settings object never holds
them, so a YAML file cannot carry one and ``repr(settings)`` cannot print one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PASSWORD_ENV = "BASTION_ELASTICSEARCH_PASSWORD"
API_KEY_ENV = "BASTION_ELASTICSEARCH_API_KEY"
URL_ENV = "BASTION_ELASTICSEARCH_URL"

# Elasticsearch's data stream naming scheme is <type>-<dataset>-<namespace>; the
# template's pattern is <type>-<dataset>-*, so one template serves every namespace.
_NAME_PART = re.compile(r"^[a-z0-9][a-z0-9._]*$")


class EventSettings(BaseModel):
    """Shipping request events to Elasticsearch/OpenSearch (``url: null`` turns it off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    """Cluster URL, e.g. ``https://es.internal:9200`` (env ``BASTION_ELASTICSEARCH_URL``)."""
    username: str | None = None
    """Basic auth user; the password comes from ``BASTION_ELASTICSEARCH_PASSWORD`` or
    ``password_file``."""
    password_file: Path | None = None
    api_key_file: Path | None = None
    """A file holding the base64 ``id:key`` API key (or ``BASTION_ELASTICSEARCH_API_KEY``)."""
    ca_file: Path | None = None
    """PEM bundle to verify the cluster's certificate (default: the system's)."""
    dataset: str = "bastion.gateway"
    namespace: str = "default"
    retention_days: int = Field(default=30, ge=1, le=3650)
    batch_size: int = Field(default=500, ge=1, le=10_000)
    flush_interval_s: float = Field(default=1.0, gt=0, le=60)
    queue_size: int = Field(default=10_000, ge=1, le=1_000_000)
    spool_dir: Path = Path(".bastion/events-spool")
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    """Per gateway worker process: each writes its own spool under ``spool_dir``."""
    payloads: bool = False
    """Ship prompts and answers (``bastion.payload``); needs ``include_subject``."""
    include_subject: bool = False
    """Ship the subject id as ``user.id`` (needed for erasure to find documents)."""
    include_client_ip: bool = False
    include_user_agent: bool = False
    timeout_s: float = Field(default=10.0, gt=0, le=300)

    @field_validator("dataset", "namespace")
    @classmethod
    def _name_part(cls, value: str) -> str:
        if not _NAME_PART.match(value) or "-" in value:
            raise ValueError("lower-case letters, digits, '.' and '_' only (no '-')")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _payloads_need_subject(self) -> EventSettings:
        # Prompts without a subject id could never be found again by an erasure.
        if self.payloads and not self.include_subject:
            raise ValueError(
                "events.payloads needs events.include_subject: true, so that erasing a "
                "subject can find their prompts and answers in the cluster"
            )
        return self

    @property
    def data_stream(self) -> str:
        """Where documents go: ``logs-bastion.gateway-default``."""
        return f"logs-{self.dataset}-{self.namespace}"

    @property
    def index_pattern(self) -> str:
        """What the template, the lifecycle policy, erasure and the data view match."""
        return f"logs-{self.dataset}-*"

    @property
    def template_name(self) -> str:
        return f"logs-{self.dataset}"

    @property
    def policy_name(self) -> str:
        return f"logs-{self.dataset}-retention"


@dataclass(frozen=True, slots=True)
class ClusterAuth:
    """What goes into the Authorization header (never logged, never in repr)."""

    header: str | None = None

    def __repr__(self) -> str:
        return f"ClusterAuth(header={'set' if self.header else None})"


def _secret(env_name: str, path: Path | None, environ: Mapping[str, str]) -> str | None:
    if environ.get(env_name):
        return environ[env_name].strip()
    if path is not None:
        return path.read_text().strip()
    return None


def cluster_auth(settings: EventSettings, environ: Mapping[str, str] | None = None) -> ClusterAuth:
    """The Authorization header from the environment or the files the settings name.

    An API key wins over basic auth. Raises ValueError naming what is missing.
    """
    import base64

    env = os.environ if environ is None else environ
    api_key = _secret(API_KEY_ENV, settings.api_key_file, env)
    if api_key:
        return ClusterAuth(f"ApiKey {api_key}")
    if settings.username:
        password = _secret(PASSWORD_ENV, settings.password_file, env)
        if password is None:
            raise ValueError(
                f"events.username is set but no password: set {PASSWORD_ENV} or "
                "events.password_file"
            )
        token = base64.b64encode(f"{settings.username}:{password}".encode()).decode()
        return ClusterAuth(f"Basic {token}")
    return ClusterAuth(None)

"""The record of one request through the gateway: defined once, read by every consumer.

The gateway fills one :class:`RequestEvent` per request on its way through (model calls
through their call context, every other answer through the observer middleware) and
hands it to the event sinks when the answer is complete: the audit entry's metadata, the
Prometheus metrics, the documents shipped to Elasticsearch/OpenSearch, the access log
and the anomaly detector's features all read this object, so nothing is computed twice.

Privacy: ``subject_id``, ``client_ip``, ``user_agent`` and ``payload`` are personal data.
Metrics never use them as labels; shipped events and logs leave them out unless a
setting says otherwise (``events.include_subject``, ``events.payloads``, ``logging.debug``).

Times are seconds (floats) measured with ``time.perf_counter`` relative to ``started``,
except ``time_us`` (wall clock, microseconds since the epoch, when the request arrived).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

RateLimitOutcome = Literal["off", "allowed", "limited", "unavailable", "failed_open"]
"""What the rate limiter said: not consulted (off), allowed, refused (429), refused
because its backend was down and it fails closed (503), allowed although the backend
was down (failed_open)."""

CutReason = Literal["client_gone", "upstream_failed", "guard_blocked"]

GuardAction = Literal["pass", "flag", "redact", "block", "error"]


@dataclass(slots=True, frozen=True)
class GuardVerdict:
    """One scanner's verdict on one request or answer."""

    scanner: str
    stage: Literal["input", "output"]
    action: GuardAction
    score: float = 0.0
    latency_s: float = 0.0


@dataclass(slots=True)
class RequestEvent:
    """Everything the gateway knows about one request, filled in as it goes."""

    time_us: int
    """Wall clock when the request arrived (microseconds since the epoch)."""
    request_id: str
    """The gateway's own id, unique per request."""
    route: str
    """The route template (``/v1/chat/completions``, ``/privacy/subjects/{subject_id}``),
    or ``other`` for a path no route serves: never the raw path (it may hold ids)."""
    method: str = "POST"
    client_request_id: str | None = None
    """The client's ``x-request-id``, when it sent one (bounded in length and characters)."""
    kind: Literal["model_call", "api", "refusal"] = "model_call"
    """model_call: reached a model route; api: any other route; refusal: refused before
    a route ran (401, unknown path...)."""

    # who
    key_id: str | None = None
    roles: tuple[str, ...] = ()
    tier: str | None = None
    subject_id: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None

    # what was asked and decided
    model: str | None = None
    """The model the client asked for."""
    model_served: str | None = None
    """The model the request went to (a canary's version may differ)."""
    upstream: str | None = None
    stream: bool = False
    ratelimit: RateLimitOutcome = "off"
    ratelimit_bucket: Literal["requests", "tokens", "quota"] | None = None
    """The bucket that ran dry, when the rate limiter refused."""
    guard_verdicts: list[GuardVerdict] = field(default_factory=list)

    # how it ended
    status: int = 0
    error_type: str | None = None
    """The OpenAI error ``code`` (``rate_limit_exceeded``, ``invalid_api_key``...)."""
    auth_failure: str | None = None
    """Why a 401: missing, malformed, unknown, revoked or expired."""
    cut: CutReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    watermark: Literal["watermarked", "absent"] | None = None
    watermark_z: float | None = None
    watermark_key: str | None = None
    """The id of the key whose watermark was found (only when watermarked)."""
    repetition_rate: float | None = None
    """Share of repeated word 4-grams in the answer (0 = none repeated): degeneration."""

    # timings, seconds
    duration_s: float = 0.0
    ttft_s: float | None = None
    """Time to the first byte of the answer sent to the client."""
    upstream_s: float | None = None
    """From sending the request upstream to its answer's end (all attempts)."""
    queue_wait_s: float | None = None
    """From arrival to the request leaving for the upstream: the body read, checks,
    admission and input guards (the gateway holds no queue of its own)."""
    retries: int = 0

    payload: dict[str, Any] | None = None
    """Prompt and answer, only when a setting asks for payloads in events."""

    @property
    def gateway_s(self) -> float | None:
        """The gateway's own time: the total less the upstream's."""
        if self.upstream_s is None:
            return None
        return max(self.duration_s - self.upstream_s, 0.0)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (OpenTelemetry's time_per_output_token)."""
        if self.ttft_s is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return max(self.duration_s - self.ttft_s, 0.0) / (self.completion_tokens - 1)

    @property
    def status_class(self) -> str:
        return f"{self.status // 100}xx" if self.status else "none"

    @property
    def role(self) -> str | None:
        """The roles as one bounded label value (sorted, comma-joined)."""
        return ",".join(sorted(self.roles)) or None

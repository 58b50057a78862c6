"""Every Bastion Prometheus metric, defined once on prometheus_client's default registry.

Python imports a module once per process, so defining the metrics at module level here is
safe; defining them next to their users risks a second registration (``Duplicated
timeseries``) when code is reloaded or a module is imported under two names. New metrics
belong in this file, with help text, named ``bastion_<area>_<what>[_<unit>]``.

Several workers (``bastion serve --workers N``) share one exposition through
prometheus_client's multiprocess mode (:mod:`monitors.multiprocess`): counters and
histograms are summed over every worker that ever ran; each gauge says how its workers'
values combine (``multiprocess_mode``). The ``live*`` modes drop a worker's value when it
exits, so a dead worker's in-flight count or breaker state does not linger. Info and Enum
metrics do not work in that mode: build information is a gauge set to 1.

Label values are bounded: ``route`` is a route template, ``model`` a configured model or
``other`` (:func:`model_label`), ``status_class`` ``2xx``..``5xx``, ``upstream`` a configured
upstream's name; never a key, a subject, a prompt or a raw path.

Where OpenTelemetry's GenAI semantic conventions define the same measure, the help text
names it (``gen_ai.server.time_to_first_token``...), so a reader can map one onto the other.
"""

from __future__ import annotations

import platform
from collections.abc import Collection
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram

# Resolve 5 ms to 2 minutes: a cached answer's few milliseconds and a long reasoning
# model's generation both land inside a bucket (the contract's list, dashboards use it).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# The gateway's own time and a scanner's are usually below a millisecond: the same list
# with finer buckets underneath (every bound of the list above is still there).
FINE_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, *DURATION_BUCKETS)
# Per output token: a GPU decodes one in 5-100 ms, a CPU tier in hundreds.
TOKEN_TIME_BUCKETS = (0.001, 0.0025, *DURATION_BUCKETS)
RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0)

OTHER = "other"
"""The label value of anything outside a bounded list (models, routes, upstreams)."""
NONE = "none"
"""The label value when the request never named one (a 401 before the body was read)."""

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
AUTH_FAILURE_REASONS = ("missing", "malformed", "unknown", "revoked", "expired", "forbidden")
RATELIMIT_BUCKETS = ("requests", "tokens", "quota")
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "status", "mid_stream")
TOKEN_TYPES = ("input", "output", "cached_input")


def model_label(model: str | None, configured: Collection[str]) -> str:
    """The ``model`` label: a configured model as is, ``other`` for anything else.

    A client chooses the model string, so it may not become a label as sent: ten
    thousand made-up names would be ten thousand series. ``none`` when there is none.
    """
    if model is None:
        return NONE
    return model if model in configured else OTHER


# --- requests ------------------------------------------------------------------------

REQUESTS = Counter(
    "bastion_requests_total",
    "Requests answered, by route template, model (configured, else 'other', 'none' when "
    "no model was named) and status class; refusals (401, 403, 429) included.",
    ["route", "model", "status_class"],
)
REQUEST_DURATION = Histogram(
    "bastion_request_duration_seconds",
    "Time from a request's arrival to its answer's last byte, in seconds "
    "(OpenTelemetry gen_ai.server.request.duration on model routes).",
    ["route", "model"],
    buckets=DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "bastion_time_to_first_token_seconds",
    "Time from a model call's arrival to the first byte of its answer sent to the client, "
    "in seconds (OpenTelemetry gen_ai.server.time_to_first_token).",
    ["model"],
    buckets=DURATION_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "bastion_time_per_output_token_seconds",
    "Time per output token after the first: (duration - time to first token) / "
    "(output tokens - 1), in seconds (OpenTelemetry gen_ai.server.time_per_output_token).",
    ["model"],
    buckets=TOKEN_TIME_BUCKETS,
)
GATEWAY_OVERHEAD = Histogram(
    "bastion_gateway_overhead_seconds",
    "The gateway's own time on a forwarded request: total duration less the upstream's, "
    "in seconds.",
    ["route"],
    buckets=FINE_DURATION_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "bastion_upstream_duration_seconds",
    "Time from sending a request upstream to the end of its answer, all attempts, in "
    "seconds (OpenTelemetry gen_ai.client.operation.duration, as seen by the gateway).",
    ["upstream", "model"],
    buckets=DURATION_BUCKETS,
)
TOKENS = Counter(
    "bastion_tokens_total",
    "Tokens by model and type: input (prompt), output (completion), cached_input (the "
    "prompt's tokens served from the prefix cache, also counted in input); OpenTelemetry "
    "gen_ai.client.token.usage with gen_ai.token.type.",
    ["model", "type"],
)
REQUESTS_IN_FLIGHT = Gauge(
    "bastion_requests_in_flight",
    "Requests being served now, by route template (summed over live workers).",
    ["route"],
    multiprocess_mode="livesum",
)

# --- upstreams -----------------------------------------------------------------------

UPSTREAM_ERRORS = Counter(
    "bastion_upstream_errors_total",
    "Failed upstream attempts by kind: connect (refused or reset before an answer), "
    "timeout, status (a 5xx answer), mid_stream (the answer broke after it started).",
    ["upstream", "kind"],
)
UPSTREAM_RETRIES = Counter(
    "bastion_upstream_retries_total",
    "Attempts sent to another upstream after one failed before the first byte.",
    ["upstream"],
)
UPSTREAM_BREAKER_STATE = Gauge(
    "bastion_upstream_breaker_state",
    "Circuit breaker state: 0 closed, 1 half-open, 2 open (the most open any live "
    "worker's breaker is).",
    ["upstream"],
    multiprocess_mode="livemax",
)
UPSTREAM_UP = Gauge(
    "bastion_upstream_up",
    "1 when the upstream's health checks pass, 0 when they fail (0 if any live worker "
    "sees it down).",
    ["upstream"],
    multiprocess_mode="livemin",
)

# --- refusals ------------------------------------------------------------------------

RATELIMIT_REFUSALS = Counter(
    "bastion_ratelimit_refusals_total",
    "Requests refused with 429 by the rate limits, by the bucket that was empty "
    "(requests, tokens, quota) and the key's tier.",
    ["bucket", "tier"],
)
RATELIMIT_BACKEND_ERRORS = Counter(
    "bastion_ratelimit_backend_errors_total",
    "Rate-limit backend (Redis) calls that failed; each one was answered by the "
    "configured failure mode (open: allowed, closed: refused with 503).",
)
RATELIMIT_BACKEND_UP = Gauge(
    "bastion_ratelimit_backend_up",
    "1 when the last call to the rate limits' shared backend (backend=redis) succeeded, "
    "0 when it failed (the most recent call of any live worker). Absent when the limits "
    "are kept in memory: there is no backend to be down.",
    ["backend"],
    multiprocess_mode="livemostrecent",
)
AUTH_FAILURES = Counter(
    "bastion_auth_failures_total",
    "Requests refused by authentication (401: missing, malformed, unknown, revoked, "
    "expired key) or authorization (403: forbidden).",
    ["reason"],
)

# --- answers -------------------------------------------------------------------------

WATERMARK_VERDICTS = Counter(
    "bastion_watermark_verdicts_total",
    "Proxied chat/completions answers scored for the inference tier's watermark, by "
    "verdict: watermarked (z at or above watermark.z_threshold) or absent. A drop in the "
    "watermarked share means answers no longer come from the watermarking tier.",
    ["verdict"],
)
OUTPUT_REPETITION = Histogram(
    "bastion_output_repetition_ratio",
    "Share of repeated word 4-grams in an answer (0 none, 1 all): a degeneration signal.",
    ["model"],
    buckets=RATIO_BUCKETS,
)
GUARD_VERDICTS = Counter(
    "bastion_guard_verdicts_total",
    "Guard scanner verdicts by scanner, stage (input, output) and action (pass, flag, "
    "redact, block, error).",
    ["scanner", "stage", "action"],
)
GUARD_SCAN_DURATION = Histogram(
    "bastion_guard_scan_duration_seconds",
    "Time one guard scanner took on one request or answer, in seconds.",
    ["scanner", "stage"],
    buckets=FINE_DURATION_BUCKETS,
)

# --- audit trail ---------------------------------------------------------------------

AUDIT_QUEUE_DEPTH = Gauge(
    "bastion_audit_queue_depth",
    "Audit entries waiting for the writer's next commit (summed over live workers).",
    multiprocess_mode="livesum",
)
AUDIT_WRITE_DURATION = Histogram(
    "bastion_audit_write_duration_seconds",
    "Time one audit commit took (a group of entries), in seconds.",
    buckets=FINE_DURATION_BUCKETS,
)
AUDIT_WRITE_FAILURES = Counter(
    "bastion_audit_write_failures_total",
    "Audit commits that failed (each failed call was answered 503).",
)

# --- event shipping (Elasticsearch / OpenSearch) -------------------------------------

EVENTS_SENT = Counter(
    "bastion_events_sent_total",
    "Request events the search cluster accepted.",
)
EVENTS_FAILED = Counter(
    "bastion_events_failed_total",
    "Request events the cluster refused for good, by reason (the bulk item's error type, "
    "e.g. mapper_parsing_exception).",
    ["reason"],
)
EVENTS_RETRIED = Counter(
    "bastion_events_retried_total",
    "Request events sent again after a 429 or a connection error.",
)
EVENTS_DROPPED = Counter(
    "bastion_events_dropped_total",
    "Spooled request events dropped, oldest first, because the spool was full.",
)
EVENTS_SPOOL_EVENTS = Gauge(
    "bastion_events_spool_events",
    "Request events waiting in the on-disk spool (summed over live workers).",
    multiprocess_mode="livesum",
)
EVENTS_SPOOL_BYTES = Gauge(
    "bastion_events_spool_bytes",
    "Bytes of the on-disk spool (summed over live workers).",
    multiprocess_mode="livesum",
)
EVENTS_SPOOL_OLDEST_AGE = Gauge(
    "bastion_events_spool_oldest_age_seconds",
    "Age of the oldest spooled request event, in seconds (0 when the spool is empty; "
    "the oldest over live workers).",
    multiprocess_mode="livemax",
)
EVENT_SINK_DROPPED = Counter(
    "bastion_event_sink_dropped_total",
    "Request events an event sink dropped because its queue was full, by sink.",
    ["sink"],
)

# --- anomaly detection ---------------------------------------------------------------

ANOMALY_FLAGS = Counter(
    "bastion_anomaly_flags_total",
    "Requests or key windows the anomaly detector flagged, by feature family.",
    ["family"],
)
ANOMALY_SCORE = Histogram(
    "bastion_anomaly_score",
    "Anomaly scores of scored requests (Isolation Forest's s(x) in 0..1; above 0.5 "
    "is more isolated than usual).",
    buckets=SCORE_BUCKETS,
)

# --- build ---------------------------------------------------------------------------

BUILD_INFO = Gauge(
    "bastion_build_info",
    "Always 1; the labels say which Bastion and Python serve (a gauge: multiprocess mode "
    "has no Info metric).",
    ["version", "python"],
    multiprocess_mode="livemax",
)


def _version() -> str:
    try:
        return metadata.version("bastion")
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO.labels(_version(), platform.python_version()).set(1)

# Series whose label values are all known exist from the start, at 0: rate() and
# alert rules see a 0 instead of nothing before the first occurrence.
for _verdict in ("watermarked", "absent"):
    WATERMARK_VERDICTS.labels(_verdict)
for _reason in AUTH_FAILURE_REASONS:
    AUTH_FAILURES.labels(_reason)

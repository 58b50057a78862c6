"""The metrics event sink: one finished request's event becomes all of its observations.

:class:`MetricsSink` is the gateway's ``metrics`` event sink (``gateway.pipeline.EventSink``):
``offer(event)`` turns a :class:`~monitors.request_event.RequestEvent` into the request
counter, the duration, time-to-first-token, time-per-output-token, gateway-overhead and
upstream histograms, the token counters, the refusal counters (rate limits, auth), the
watermark verdict, the repetition ratio and the guards' verdicts and latencies.

What a request event cannot say is observed where it happens, through the small objects
at the end of this module: requests in flight (:class:`InFlight`), each failed upstream
attempt, retry, breaker transition and health check (:class:`UpstreamMetrics`), the audit
writer's queue, commits and failures (:class:`AuditMetrics`).

Cost. ``offer`` runs on the event loop once per request. Each observation of
prometheus_client is a lock and, in multiprocess mode, a write into a memory-mapped file
(a histogram: two). Label lookups (``.labels(...)``: argument checks, a tuple, a lock)
cost about as much as the write itself, so the sink keeps every child it used in one dict
keyed by its label values: a request costs one dict lookup per series, then the writes.
The measured cost per event is in docs/telemetry.md (bench/metrics_sink_cost.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from monitors import metrics as m
from monitors.metrics_batch import MetricBatch
from monitors.request_event import RequestEvent

# The auth failure's reason, from the error code the event carries. Today every 401 says
# invalid_api_key (OpenAI's code; clients see it): counted as "unknown" unless the event
# carries one of the finer codes below (what the authentication middleware knew).
AUTH_REASON_BY_CODE = {
    "missing_api_key": "missing",
    "malformed_api_key": "malformed",
    "invalid_api_key": "unknown",
    "unknown_api_key": "unknown",
    "revoked_api_key": "revoked",
    "expired_api_key": "expired",
}

# Which bucket refused a 429: OpenAI's quota code says quota; the finer codes say which
# of the two per-key buckets was empty.
RATELIMIT_BUCKET_BY_CODE = {
    "insufficient_quota": "quota",
    "requests_limit_exceeded": "requests",
    "tokens_limit_exceeded": "tokens",
}


BREAKER_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
"""``bastion_upstream_breaker_state``'s values (gateway.breaker's state names)."""


def auth_failure_reason(status: int, error_type: str | None) -> str | None:
    """The ``reason`` label of an authentication (401) or authorization (403) refusal."""
    if status == 403:
        return "forbidden"
    if status == 401:
        return AUTH_REASON_BY_CODE.get(error_type or "", "unknown")
    return None


def ratelimit_bucket(event: RequestEvent) -> str:
    """The ``bucket`` label of a rate-limit refusal (429 with ``ratelimit == "limited"``)."""
    # A ratelimit_bucket field on the event, once the gateway records one, says it best.
    bucket = getattr(event, "ratelimit_bucket", None)
    if bucket in m.RATELIMIT_BUCKETS:
        return str(bucket)
    return RATELIMIT_BUCKET_BY_CODE.get(event.error_type or "", "requests")


class _Children:
    """One metric's labelled children, made once per label values and kept.

    Label values are bounded (the sink maps them onto configured lists first), so the
    dict stays as small as the series it stands for.
    """

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child


class _Series:
    """The children one kind of request touches, looked up once per label combination."""

    __slots__ = (
        "cached", "duration", "input", "output", "overhead",
        "repetition", "requests", "tpot", "ttft", "upstream",
    )  # fmt: skip

    def __init__(self, route: str, model: str, status_class: str, upstream: str) -> None:
        self.requests = m.REQUESTS.labels(route, model, status_class)
        self.duration = m.REQUEST_DURATION.labels(route, model)
        self.overhead = m.GATEWAY_OVERHEAD.labels(route)
        self.upstream = m.UPSTREAM_DURATION.labels(upstream, model)
        self.ttft = m.TIME_TO_FIRST_TOKEN.labels(model)
        self.tpot = m.TIME_PER_OUTPUT_TOKEN.labels(model)
        self.input = m.TOKENS.labels(model, "input")
        self.output = m.TOKENS.labels(model, "output")
        self.cached = m.TOKENS.labels(model, "cached_input")
        self.repetition = m.OUTPUT_REPETITION.labels(model)


class MetricsSink:
    """``gateway.pipeline.EventSink`` named ``metrics``: Prometheus from request events.

    ``models``, ``routes`` and ``upstreams`` are the configured model names, the app's
    route templates and the upstream names: label values outside them become ``other``
    so that no client can create series.

    ``offer`` sums the event's observations in memory (:class:`MetricBatch`) and, on the
    event loop, schedules one write of everything pending ``flush_interval_s`` later;
    called outside a running loop it writes at once. So a scrape may miss the last
    ``flush_interval_s`` of requests (Prometheus sees them at the next scrape); call
    :meth:`flush` at shutdown so the last ones are written. Call it from the event
    loop's thread only (the sums are plain dicts, unlocked).
    """

    name = "metrics"

    def __init__(
        self,
        models: Collection[str],
        routes: Collection[str],
        upstreams: Collection[str] = (),
        *,
        flush_interval_s: float = 0.1,
    ) -> None:
        self._models = frozenset(models)
        self._routes = frozenset(routes)
        self._upstreams = frozenset(upstreams)
        self._interval = flush_interval_s
        self._batch = MetricBatch()
        self._scheduled: asyncio.TimerHandle | None = None
        self._series: dict[tuple[str, str, str, str], _Series] = {}
        self._ratelimit = _Children(m.RATELIMIT_REFUSALS)
        self._auth = _Children(m.AUTH_FAILURES)
        self._watermark = _Children(m.WATERMARK_VERDICTS)
        self._guard = _Children(m.GUARD_VERDICTS)
        self._guard_time = _Children(m.GUARD_SCAN_DURATION)

    def route_label(self, route: str) -> str:
        return route if route in self._routes else m.OTHER

    def upstream_label(self, upstream: str | None) -> str:
        if upstream is None:
            return m.NONE
        return upstream if upstream in self._upstreams else m.OTHER

    def offer(self, event: RequestEvent) -> None:
        """Sum everything the event says; the metrics are written by the next flush."""
        route = event.route if event.route in self._routes else m.OTHER
        model = m.model_label(event.model, self._models)
        key = (route, model, event.status_class, self.upstream_label(event.upstream))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(*key)
        batch = self._batch
        batch.inc(series.requests)
        batch.observe(series.duration, event.duration_s)
        upstream_s = event.upstream_s
        if upstream_s is not None:
            batch.observe(series.upstream, upstream_s)
            batch.observe(series.overhead, max(event.duration_s - upstream_s, 0.0))
        if event.kind == "model_call":
            self._observe_answer(event, series, batch)
        status = event.status
        if status == 429 and event.ratelimit == "limited":
            batch.inc(self._ratelimit(ratelimit_bucket(event), event.tier or m.NONE))
        elif status == 401 or status == 403:
            reason = event.auth_failure or auth_failure_reason(status, event.error_type)
            if reason is not None:
                batch.inc(self._auth(reason))
        for verdict in event.guard_verdicts:
            batch.inc(self._guard(verdict.scanner, verdict.stage, verdict.action))
            batch.observe(self._guard_time(verdict.scanner, verdict.stage), verdict.latency_s)
        if self._scheduled is None:
            self._schedule()

    def _observe_answer(self, event: RequestEvent, series: _Series, batch: MetricBatch) -> None:
        if event.ttft_s is not None:
            batch.observe(series.ttft, event.ttft_s)
        tpot = event.tpot_s
        if tpot is not None:
            batch.observe(series.tpot, tpot)
        if event.prompt_tokens:
            batch.inc(series.input, event.prompt_tokens)
        if event.completion_tokens:
            batch.inc(series.output, event.completion_tokens)
        if event.cached_tokens:
            batch.inc(series.cached, event.cached_tokens)
        if event.watermark is not None:
            batch.inc(self._watermark(event.watermark))
        if event.repetition_rate is not None:
            batch.observe(series.repetition, event.repetition_rate)

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop in this thread: nothing would flush later
            self._batch.flush()
            return
        self._scheduled = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        """Write what is pending now (the scheduled flush; also at shutdown, before a scrape)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        self._batch.flush()


class InFlight:
    """``bastion_requests_in_flight{route}``: raised while a request is served.

    ``with in_flight.track(route):`` around a request, or ``enter``/``leave`` where the
    start and the end are in different places (a stream's generator). ``route`` must be
    a template (``MetricsSink.route_label`` maps anything else to ``other``).
    """

    def __init__(self) -> None:
        self._gauges = _Children(m.REQUESTS_IN_FLIGHT)

    def enter(self, route: str) -> None:
        self._gauges(route).inc()

    def leave(self, route: str) -> None:
        self._gauges(route).dec()

    @contextmanager
    def track(self, route: str) -> Iterator[None]:
        gauge = self._gauges(route)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()


class UpstreamMetrics:
    """What the forwarder, the breakers and the health checker observe per upstream.

    Each failed attempt counts once, retried or not (the request event knows only the
    last attempt): ``error(upstream, kind)`` with kind ``connect``, ``timeout``,
    ``status`` (5xx) or ``mid_stream``; ``retry(upstream)`` when an attempt is sent again
    to another upstream (``upstream`` is the one that failed).
    """

    def __init__(self) -> None:
        self._errors = _Children(m.UPSTREAM_ERRORS)
        self._retries = _Children(m.UPSTREAM_RETRIES)
        self._breaker = _Children(m.UPSTREAM_BREAKER_STATE)
        self._up = _Children(m.UPSTREAM_UP)

    def error(self, upstream: str, kind: str) -> None:
        if kind not in m.UPSTREAM_ERROR_KINDS:
            raise ValueError(f"upstream error kind {kind!r} not in {m.UPSTREAM_ERROR_KINDS}")
        self._errors(upstream, kind).inc()

    def retry(self, upstream: str) -> None:
        self._retries(upstream).inc()

    def breaker(self, upstream: str, state: str | int) -> None:
        """The breaker's new state: ``closed``/``half_open``/``open`` or 0/1/2."""
        value = state if isinstance(state, int) else BREAKER_STATES[state]
        self._breaker(upstream).set(value)

    def health(self, upstream: str, up: bool) -> None:
        self._up(upstream).set(1 if up else 0)


class AuditMetrics:
    """The audit writer's queue depth, commit latency and failures (from its thread)."""

    def queue_depth(self, depth: int) -> None:
        m.AUDIT_QUEUE_DEPTH.set(depth)

    def write(self, seconds: float) -> None:
        m.AUDIT_WRITE_DURATION.observe(seconds)

    def failure(self) -> None:
        m.AUDIT_WRITE_FAILURES.inc()


def track_in_flight(route: str) -> Any:
    """``with track_in_flight(route):`` — the in-flight gauge of one route template."""
    return m.REQUESTS_IN_FLIGHT.labels(route).track_inprogress()

"""MetricsSink: the names and labels each kind of request event produces (one process)."""

from __future__ import annotations

import asyncio
import re
import subprocess

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from monitors import metrics as m
from monitors.metrics_batch import MetricBatch
from monitors.metrics_sink import (
    AuditMetrics,
    InFlight,
    MetricsSink,
    UpstreamMetrics,
    auth_failure_reason,
    track_in_flight,
)
from monitors.request_event import GuardVerdict, RequestEvent

CHAT = "/v1/chat/completions"
ROUTES = [CHAT, "/v1/completions", "/v1/models", "/metrics", "/privacy/subjects/{subject_id}"]
CANARY = "canary-7f3a9c"
PII_INPUT = {"scanner": "pii", "stage": "input"}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Sample values before and after: the registry is shared by every test in the process."""

    def __init__(self, *series: tuple[str, dict[str, str]]) -> None:
        self.series = series
        self.before = [value(name, **labels) for name, labels in series]

    def changes(self) -> list[float]:
        return [value(n, **lab) - b for (n, lab), b in zip(self.series, self.before, strict=True)]


def sink(model: str) -> MetricsSink:
    return MetricsSink(models=[model], routes=ROUTES, upstreams=["u1"])


def event(**fields: object) -> RequestEvent:
    base: dict[str, object] = {"time_us": 1_760_000_000_000_000, "request_id": "req-1"}
    base.update(fields)
    return RequestEvent(**base)  # type: ignore[arg-type]


def test_a_streamed_model_call_observes_every_series() -> None:
    model = "m-call"
    hist = {"route": CHAT, "model": model}
    delta = Delta(
        ("bastion_requests_total", {**hist, "status_class": "2xx"}),
        ("bastion_request_duration_seconds_count", hist),
        ("bastion_request_duration_seconds_sum", hist),
        ("bastion_request_duration_seconds_bucket", {**hist, "le": "1.0"}),
        ("bastion_request_duration_seconds_bucket", {**hist, "le": "0.75"}),
        ("bastion_time_to_first_token_seconds_count", {"model": model}),
        ("bastion_time_to_first_token_seconds_bucket", {"model": model, "le": "0.05"}),
        ("bastion_time_per_output_token_seconds_sum", {"model": model}),
        ("bastion_gateway_overhead_seconds_sum", {"route": CHAT}),
        ("bastion_upstream_duration_seconds_count", {"upstream": "u1", "model": model}),
        ("bastion_tokens_total", {"model": model, "type": "input"}),
        ("bastion_tokens_total", {"model": model, "type": "output"}),
        ("bastion_tokens_total", {"model": model, "type": "cached_input"}),
        ("bastion_watermark_verdicts_total", {"verdict": "watermarked"}),
        ("bastion_output_repetition_ratio_bucket", {"model": model, "le": "0.05"}),
        ("bastion_guard_verdicts_total", {"scanner": "pii", "stage": "input", "action": "redact"}),
        ("bastion_guard_scan_duration_seconds_bucket", {**PII_INPUT, "le": "0.001"}),
    )  # fmt: skip
    sink(model).offer(
        event(
            route=CHAT,
            model=model,
            model_served=model,
            upstream="u1",
            stream=True,
            status=200,
            prompt_tokens=12,
            completion_tokens=41,
            cached_tokens=8,
            duration_s=0.9,
            ttft_s=0.05,
            upstream_s=0.85,
            watermark="watermarked",
            repetition_rate=0.04,
            guard_verdicts=[GuardVerdict("pii", "input", "redact", 0.9, 0.0008)],
        )
    )
    changes = delta.changes()
    assert changes[0] == 1
    assert changes[1] == 1 and changes[2] == pytest.approx(0.9)
    assert changes[3] == 1 and changes[4] == 0  # 0.9 s: in le=1.0, not in le=0.75
    assert changes[5:7] == [1, 1]
    assert changes[7] == pytest.approx((0.9 - 0.05) / 40)  # time per output token
    assert changes[8] == pytest.approx(0.05)  # gateway overhead: total less upstream
    assert changes[9] == 1
    assert changes[10:13] == [12, 41, 8]
    assert changes[13:] == [1, 1, 1, 1]


def test_a_401_refusal_counts_an_auth_failure_and_nothing_of_a_model() -> None:
    model = "m-401"
    delta = Delta(
        ("bastion_requests_total", {"route": CHAT, "model": "none", "status_class": "4xx"}),
        ("bastion_auth_failures_total", {"reason": "unknown"}),
        ("bastion_auth_failures_total", {"reason": "revoked"}),
        ("bastion_time_to_first_token_seconds_count", {"model": "none"}),
        ("bastion_gateway_overhead_seconds_count", {"route": CHAT}),
    )
    s = sink(model)
    s.offer(event(route=CHAT, kind="refusal", status=401, error_type="invalid_api_key",
                  duration_s=0.0003))  # fmt: skip
    s.offer(event(route=CHAT, kind="refusal", status=401, error_type="revoked_api_key",
                  duration_s=0.0003))  # fmt: skip
    assert delta.changes() == [2, 1, 1, 0, 0]


def test_a_403_is_forbidden_and_the_other_reasons_map() -> None:
    assert auth_failure_reason(403, "model_not_allowed") == "forbidden"
    assert auth_failure_reason(403, "permission_denied") == "forbidden"
    assert auth_failure_reason(401, None) == "unknown"
    assert auth_failure_reason(401, "missing_api_key") == "missing"
    assert auth_failure_reason(401, "malformed_api_key") == "malformed"
    assert auth_failure_reason(401, "expired_api_key") == "expired"
    assert auth_failure_reason(429, "rate_limit_exceeded") is None
    for reason in m.AUTH_FAILURE_REASONS:  # every reason exists from the start
        assert (
            REGISTRY.get_sample_value("bastion_auth_failures_total", {"reason": reason}) is not None
        )


def test_a_429_counts_a_refusal_by_bucket_and_tier() -> None:
    model = "m-429"
    delta = Delta(
        ("bastion_ratelimit_refusals_total", {"bucket": "requests", "tier": "batch"}),
        ("bastion_ratelimit_refusals_total", {"bucket": "quota", "tier": "batch"}),
        ("bastion_requests_total", {"route": CHAT, "model": model, "status_class": "4xx"}),
        ("bastion_auth_failures_total", {"reason": "unknown"}),
    )
    s = sink(model)
    common = {"route": CHAT, "model": model, "tier": "batch", "status": 429}
    s.offer(event(**common, ratelimit="limited", error_type="rate_limit_exceeded"))
    s.offer(event(**common, ratelimit="limited", error_type="insufficient_quota"))
    # A 429 the upstream sent (the limiter allowed it) is no refusal of ours.
    s.offer(event(**common, ratelimit="allowed", error_type="rate_limit_exceeded"))
    assert delta.changes() == [1, 1, 3, 0]


def test_a_stream_cut_by_the_client_still_counts_its_request_and_tokens() -> None:
    model = "m-cut"
    delta = Delta(
        ("bastion_requests_total", {"route": CHAT, "model": model, "status_class": "2xx"}),
        ("bastion_tokens_total", {"model": model, "type": "output"}),
        ("bastion_time_to_first_token_seconds_count", {"model": model}),
        ("bastion_time_per_output_token_seconds_count", {"model": model}),
    )
    sink(model).offer(
        event(
            route=CHAT,
            model=model,
            upstream="u1",
            stream=True,
            status=200,
            cut="client_gone",
            completion_tokens=1,
            duration_s=2.0,
            ttft_s=0.2,
            upstream_s=2.0,
        )
    )
    # One output token: no time per output token (it is measured after the first).
    assert delta.changes() == [1, 1, 1, 0]


def test_an_upstream_failure_counts_a_5xx_and_the_attempts() -> None:
    model = "m-502"
    delta = Delta(
        ("bastion_requests_total", {"route": CHAT, "model": model, "status_class": "5xx"}),
        ("bastion_upstream_duration_seconds_count", {"upstream": "u1", "model": model}),
        ("bastion_upstream_errors_total", {"upstream": "u1", "kind": "connect"}),
        ("bastion_upstream_errors_total", {"upstream": "u1", "kind": "status"}),
        ("bastion_upstream_retries_total", {"upstream": "u1"}),
        ("bastion_time_to_first_token_seconds_count", {"model": model}),
    )
    upstreams = UpstreamMetrics()
    upstreams.error("u1", "connect")  # the forwarder, per failed attempt
    upstreams.retry("u1")
    upstreams.error("u1", "status")
    sink(model).offer(
        event(
            route=CHAT,
            model=model,
            upstream="u1",
            status=502,
            error_type="upstream_error",
            retries=1,
            duration_s=0.03,
            upstream_s=0.028,
        )
    )
    assert delta.changes() == [1, 1, 1, 1, 1, 0]
    with pytest.raises(ValueError):
        upstreams.error("u1", "made-up")


def test_breaker_health_and_audit_gauges() -> None:
    upstreams = UpstreamMetrics()
    upstreams.breaker("u-b", "open")
    assert value("bastion_upstream_breaker_state", upstream="u-b") == 2
    upstreams.breaker("u-b", "half_open")
    assert value("bastion_upstream_breaker_state", upstream="u-b") == 1
    upstreams.health("u-b", False)
    assert REGISTRY.get_sample_value("bastion_upstream_up", {"upstream": "u-b"}) == 0
    upstreams.health("u-b", True)
    assert value("bastion_upstream_up", upstream="u-b") == 1
    audit = AuditMetrics()
    failures = value("bastion_audit_write_failures_total")
    count = value("bastion_audit_write_duration_seconds_count")
    audit.queue_depth(7)
    audit.write(0.004)
    audit.failure()
    assert value("bastion_audit_queue_depth") == 7
    assert value("bastion_audit_write_duration_seconds_count") == count + 1
    assert value("bastion_audit_write_failures_total") == failures + 1


def test_labels_stay_bounded_whatever_the_client_sends() -> None:
    s = sink("m-bounded")
    s.offer(event(route="/v1/chat/completions/" + CANARY, model=CANARY, upstream=CANARY,
                  status=404, error_type="model_not_found", subject_id=CANARY,
                  client_ip=CANARY, key_id=CANARY))  # fmt: skip
    assert value("bastion_requests_total", route="other", model="other", status_class="4xx") >= 1
    text = generate_latest(REGISTRY).decode()
    assert CANARY not in text


def test_in_flight_rises_and_falls() -> None:
    flight = InFlight()
    with flight.track("/v1/embeddings"):
        assert value("bastion_requests_in_flight", route="/v1/embeddings") == 1
        flight.enter("/v1/embeddings")
        assert value("bastion_requests_in_flight", route="/v1/embeddings") == 2
        flight.leave("/v1/embeddings")
    assert value("bastion_requests_in_flight", route="/v1/embeddings") == 0
    with track_in_flight("/v1/models"):
        assert value("bastion_requests_in_flight", route="/v1/models") == 1
    assert value("bastion_requests_in_flight", route="/v1/models") == 0


async def test_on_the_event_loop_offers_are_written_by_one_later_flush() -> None:
    model = "m-batched"
    labels = {"route": CHAT, "model": model, "status_class": "2xx"}
    s = MetricsSink(models=[model], routes=ROUTES, flush_interval_s=0.05)
    for _ in range(5):
        s.offer(event(route=CHAT, model=model, status=200, duration_s=0.01))
    assert value("bastion_requests_total", **labels) == 0  # summed, not written yet
    await asyncio.sleep(0.2)
    assert value("bastion_requests_total", **labels) == 5
    s.offer(event(route=CHAT, model=model, status=200, duration_s=0.01))
    s.flush()  # at shutdown
    assert value("bastion_requests_total", **labels) == 6


def test_a_batch_writes_what_observe_would_have() -> None:
    bounds = m.DURATION_BUCKETS
    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", ["x"], buckets=bounds, registry=registry)
    batched = Histogram("batched_seconds", "b", ["x"], buckets=bounds, registry=registry)
    samples = [0.0, 0.005, 0.0051, 0.1, 0.75, 1.0, 119.0, 120.0, 121.0, 5000.0, 0.03]
    batch = MetricBatch()
    for sample in samples:
        direct.labels("a").observe(sample)
        batch.observe(batched.labels("a"), sample)
    batch.observe(batched.labels("a"), float("nan"))  # ignored
    batch.flush()
    batch.flush()  # a second flush writes nothing again

    def series(name: str) -> dict[str, float]:
        prefix = f"{name}_"
        return {
            s.name.removeprefix(prefix) + str(s.labels.get("le")): s.value
            for metric in registry.collect()
            for s in metric.samples
            if s.name.startswith(prefix) and not s.name.endswith("_created")
        }

    assert series("direct_seconds") == series("batched_seconds")
    assert series("direct_seconds")["countNone"] == len(samples)


def test_every_metric_has_help_a_unit_suffix_and_the_contract_buckets() -> None:
    names = {metric.name for metric in REGISTRY.collect() if metric.name.startswith("bastion_")}
    contract = {
        "bastion_requests", "bastion_request_duration_seconds",
        "bastion_time_to_first_token_seconds", "bastion_time_per_output_token_seconds",
        "bastion_gateway_overhead_seconds", "bastion_upstream_duration_seconds",
        "bastion_tokens", "bastion_requests_in_flight", "bastion_upstream_errors",
        "bastion_upstream_retries", "bastion_upstream_breaker_state", "bastion_upstream_up",
        "bastion_ratelimit_refusals", "bastion_auth_failures", "bastion_watermark_verdicts",
        "bastion_output_repetition_ratio", "bastion_guard_verdicts",
        "bastion_guard_scan_duration_seconds", "bastion_audit_queue_depth",
        "bastion_audit_write_duration_seconds", "bastion_audit_write_failures",
        "bastion_events_sent", "bastion_events_failed", "bastion_events_retried",
        "bastion_events_dropped", "bastion_events_spool_events", "bastion_events_spool_bytes",
        "bastion_events_spool_oldest_age_seconds", "bastion_event_sink_dropped",
        "bastion_anomaly_flags", "bastion_anomaly_score", "bastion_build_info",
        "bastion_ratelimit_backend_errors", "bastion_ratelimit_backend_up",
    }  # fmt: skip
    assert contract <= names, contract - names
    for metric in REGISTRY.collect():
        if metric.name.startswith("bastion_"):
            assert len(metric.documentation) > 20, metric.name
            if metric.type == "histogram" and metric.name.endswith("_seconds"):
                bounds = {s.labels["le"] for s in metric.samples if s.name.endswith("_bucket")}
                if bounds:
                    expected = {str(float(b)) for b in m.DURATION_BUCKETS} | {"+Inf"}
                    assert expected <= bounds, metric.name
    assert "gen_ai.server.time_to_first_token" in m.TIME_TO_FIRST_TOKEN._documentation
    assert "gen_ai.server.request.duration" in m.REQUEST_DURATION._documentation
    assert "gen_ai.client.token.usage" in m.TOKENS._documentation
    build = [s for metric in REGISTRY.collect() if metric.name == "bastion_build_info"
             for s in metric.samples]  # fmt: skip
    assert len(build) == 1 and build[0].value == 1
    assert re.fullmatch(r"3\.11\.\d+", build[0].labels["python"])


def test_model_label_maps_unknown_models_to_other() -> None:
    assert m.model_label("dev-model", {"dev-model"}) == "dev-model"
    assert m.model_label("gpt-made-up", {"dev-model"}) == "other"
    assert m.model_label(None, {"dev-model"}) == "none"


def test_promtool_accepts_the_single_process_exposition() -> None:
    s = sink("m-promtool")
    s.offer(event(route=CHAT, model="m-promtool", upstream="u1", status=200, duration_s=0.2,
                  ttft_s=0.1, upstream_s=0.19, completion_tokens=5, prompt_tokens=3))  # fmt: skip
    text = generate_latest(REGISTRY)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()

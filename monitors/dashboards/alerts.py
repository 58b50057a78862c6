"""Prometheus alert rules, generated so the burn-rate thresholds follow the SLO settings.

Severity ``page`` wakes someone (Alertmanager's page route); ``ticket`` is for working
hours. Every rule has a ``promtool test rules`` case in dashboards/prometheus/tests/
(tests/dashboards/test_rules.py checks that none is missing).
"""

from __future__ import annotations

from typing import Any

from monitors.dashboards.recording import (
    OVERHEAD_P99,
    PREFIX_CACHE_HIT,
    TTFT_P99,
    availability_ratio,
    ttft_ratio,
)
from monitors.dashboards.slo import BURN_WINDOWS, SloSettings

SCRAPE_JOBS = {
    # job: severity when Prometheus has no healthy target of it.
    "bastion-gateway": "page",
    "vllm": "page",
    "dcgm": "ticket",
    "node": "ticket",
    "alertmanager": "ticket",
}
"""The scrape jobs of dashboards/prometheus/prometheus.yml that get an absent() rule
(Prometheus's own job has none: a Prometheus that is down evaluates no rule)."""


def _alert(
    name: str,
    expr: str,
    severity: str,
    summary: str,
    description: str,
    for_: str | None = None,
    **labels: str,
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **labels}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def _num(value: float) -> str:
    return f"{value:.6g}"


def _burn_rate_alerts(
    slo: str, title: str, ratio: Any, budget: float, objective: float
) -> list[dict[str, Any]]:
    rules = []
    names = {"1h": "Fast", "6h": "Medium", "3d": "Slow"}
    for window in BURN_WINDOWS:
        bound = _num(window.factor * budget)
        expr = f"{ratio(window.long)} > {bound}\nand\n{ratio(window.short)} > {bound}"
        rules.append(
            _alert(
                f"Bastion{title.replace(' ', '')}BudgetBurn{names[window.long]}",
                expr,
                window.severity,
                f"{title} SLO of {{{{ $labels.model }}}}: error budget burning at "
                f"{_num(window.factor)}x the sustainable rate or more",
                f"Over {window.long} and {window.short}, {{{{ $value | humanizePercentage }}}} "
                f"of {{{{ $labels.model }}}}'s calls missed the {title.lower()} SLO "
                f"(objective {_num(objective * 100)} %); at this rate the 30-day budget "
                f"lasts {30 / window.factor:.1f} days.",
                slo=slo,
                window=window.long,
            )
        )
    return rules


def _spike(metric: str, selector: str, floor: int) -> str:
    """More than ``floor`` events in 5 m and three times the previous hour's rate."""
    series = f"{metric}{{{selector}}}" if selector else metric
    current = f"sum(rate({series}[5m]))"
    baseline = f"(sum(rate({series}[1h] offset 5m)) or vector(0))"
    return f"sum(increase({series}[5m])) > {floor}\nand\n{current} > 3 * {baseline}"


def slo_alerts(settings: SloSettings) -> list[dict[str, Any]]:
    return [
        *_burn_rate_alerts(
            "availability",
            "Availability",
            availability_ratio,
            settings.availability_budget,
            settings.availability_objective,
        ),
        *_burn_rate_alerts(
            "ttft", "Time To First Token", ttft_ratio, settings.ttft_budget, settings.ttft_objective
        ),
    ]


def gateway_alerts(settings: SloSettings) -> list[dict[str, Any]]:
    repetition = (
        "sum by (model) (rate(bastion_output_repetition_ratio_sum[15m]))\n/\n"
        "sum by (model) (rate(bastion_output_repetition_ratio_count[15m]))"
    )
    return [
        _alert(
            "BastionRequestFailureRateHigh",
            f"{availability_ratio('5m')} > {_num(settings.failure_ratio_bound)}",
            "ticket",
            "More than {{ $value | humanizePercentage }} of {{ $labels.model }}'s calls fail",
            f"Over 5 minutes more than {_num(settings.failure_ratio_bound * 100)} % of the "
            "model calls answered 5xx.",
            "5m",
        ),
        _alert(
            "BastionP99TimeToFirstTokenHigh",
            f"{TTFT_P99} > {_num(settings.p99_ttft_bound_s)}",
            "ticket",
            "P99 time to first token of {{ $labels.model }} is {{ $value | humanizeDuration }}",
            f"Above the bound of {_num(settings.p99_ttft_bound_s)} s for 10 minutes.",
            "10m",
        ),
        _alert(
            "BastionP99GatewayOverheadHigh",
            f"{OVERHEAD_P99} > {_num(settings.p99_overhead_bound_s)}",
            "ticket",
            "P99 gateway overhead on {{ $labels.route }} is {{ $value | humanizeDuration }}",
            f"Time spent in the gateway itself (total minus upstream) is above "
            f"{_num(settings.p99_overhead_bound_s)} s at the 99th percentile for 10 minutes.",
            "10m",
        ),
        _alert(
            "BastionUpstreamDown",
            # max: no gateway sees it up. One gateway alone losing it is that gateway's
            # network, not the upstream (its breaker and errors show on the dashboard).
            "max by (upstream) (bastion_upstream_up) == 0",
            "page",
            "Upstream {{ $labels.upstream }} fails every gateway's health checks",
            "No gateway's health checks reach the upstream; its models are served by the "
            "others in its pool or refused.",
            "1m",
        ),
        _alert(
            "BastionUpstreamBreakerOpen",
            "max by (upstream) (bastion_upstream_breaker_state) == 2",
            "ticket",
            "Circuit breaker of {{ $labels.upstream }} is open",
            "The breaker stays open for 5 minutes: calls to this upstream are refused.",
            "5m",
        ),
        _alert(
            "BastionOutputRepetitionHigh",
            f"{repetition} > {_num(settings.repetition_bound)}",
            "ticket",
            "Answers of {{ $labels.model }} repeat themselves ({{ $value | humanizePercentage }})",
            f"The mean repetition ratio of answers over 15 minutes is above "
            f"{_num(settings.repetition_bound * 100)} %: a degenerate model, a bad "
            "sampling setting or a watermark delta set too high.",
            "15m",
        ),
        _alert(
            "BastionGuardBlockSpike",
            _spike("bastion_guard_verdicts_total", 'action="block"', 10),
            "ticket",
            "Guards block three times more calls than in the last hour",
            "More than 10 blocks in 5 minutes at three times the previous hour's rate: an "
            "attack in progress, or a scanner that started refusing ordinary traffic.",
        ),
        _alert(
            "BastionAuthFailureSpike",
            _spike("bastion_auth_failures_total", "", 20),
            "ticket",
            "Authentication failures tripled",
            "More than 20 failed authentications in 5 minutes at three times the previous "
            "hour's rate: credential stuffing, or a client with a revoked key.",
        ),
        _alert(
            "BastionAuditWriteFailures",
            "sum(increase(bastion_audit_write_failures_total[5m])) > 0",
            "page",
            "Audit log writes fail",
            "The audit store refused writes in the last 5 minutes: calls are not being "
            "recorded as the compliance promise requires.",
        ),
        _alert(
            "BastionEventBacklogGrowing",
            "sum(bastion_events_spool_events) > 0\n"
            "and\ndelta(sum(bastion_events_spool_events)[15m:1m]) > 0",
            "ticket",
            "The event spool holds {{ $value }} events and keeps growing",
            "Events wait in the disk spool longer and longer: Elasticsearch is down or "
            "refusing bulk requests.",
            "10m",
        ),
        _alert(
            "BastionEventsDropped",
            "sum(increase(bastion_events_dropped_total[10m])) > 0",
            "ticket",
            "Events were dropped: the spool is full",
            "Events to Elasticsearch were lost because the disk spool reached its cap.",
        ),
        _alert(
            "BastionRateLimitBackendDown",
            "min(bastion_ratelimit_backend_up) == 0",
            "ticket",
            "The rate-limit backend (Redis) fails",
            "Rate limits are answered by the configured failure mode (open or closed).",
            "2m",
        ),
    ]


def inference_alerts(settings: SloSettings) -> list[dict[str, Any]]:
    return [
        _alert(
            "VllmPrefixCacheHitRateLow",
            f"{PREFIX_CACHE_HIT} < {_num(settings.prefix_cache_hit_floor)}",
            "ticket",
            "Prefix-cache hit rate of {{ $labels.model_name }} is "
            "{{ $value | humanizePercentage }}",
            f"Below {_num(settings.prefix_cache_hit_floor * 100)} % for 15 minutes: shared "
            "prompt prefixes are being recomputed.",
            "15m",
        ),
        _alert(
            "VllmKvCachePressure",
            "max by (model_name, instance) (vllm:kv_cache_usage_perc) > 0.9\n"
            "and\nmax by (model_name, instance) (vllm:num_requests_waiting) > 0",
            "page",
            "KV cache of {{ $labels.model_name }} is full while requests wait",
            "KV-cache usage above 90 % with requests waiting for 5 minutes: the tier is "
            "out of capacity.",
            "5m",
        ),
        _alert(
            "VllmPreemptions",
            "sum by (model_name, instance) (rate(vllm:num_preemptions_total[5m])) > 0",
            "ticket",
            "vLLM preempts requests on {{ $labels.instance }}",
            "Requests are evicted from the KV cache and recomputed for 10 minutes.",
            "10m",
        ),
    ]


def gpu_host_alerts() -> list[dict[str, Any]]:
    drops = (
        'rate(node_network_receive_drop_total{device!="lo"}[5m]) '
        '+ rate(node_network_transmit_drop_total{device!="lo"}[5m]) '
        '+ rate(node_network_receive_errs_total{device!="lo"}[5m]) '
        '+ rate(node_network_transmit_errs_total{device!="lo"}[5m])'
    )
    packets = (
        'rate(node_network_receive_packets_total{device!="lo"}[5m]) '
        '+ rate(node_network_transmit_packets_total{device!="lo"}[5m])'
    )
    return [
        _alert(
            "GpuUtilisationHigh",
            "avg by (instance, gpu) (DCGM_FI_DEV_GPU_UTIL) > 90",
            "ticket",
            "GPU {{ $labels.gpu }} on {{ $labels.instance }} is {{ $value }} % busy",
            "Utilisation above 90 % for 5 minutes: add capacity before latency suffers.",
            "5m",
        ),
        _alert(
            "GpuMemoryHigh",
            "max by (instance, gpu) (DCGM_FI_DEV_FB_USED "
            "/ (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)) > 0.9",
            "ticket",
            "GPU {{ $labels.gpu }} memory on {{ $labels.instance }} is "
            "{{ $value | humanizePercentage }} used",
            "Frame-buffer use above 90 % for 5 minutes (vLLM is started at 0.85 in the stack,"
            " so this is more than its own allocation).",
            "5m",
        ),
        _alert(
            "GpuXidError",
            "max by (instance, gpu) (max_over_time(DCGM_FI_DEV_XID_ERRORS[5m])) > 0",
            "ticket",
            "GPU {{ $labels.gpu }} on {{ $labels.instance }} reported XID {{ $value }}",
            "The driver reported an XID error (see NVIDIA's XID catalogue).",
        ),
        _alert(
            "HostMemoryHigh",
            "1 - (node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes) > 0.9",
            "ticket",
            "Host {{ $labels.instance }} uses {{ $value | humanizePercentage }} of its memory",
            "Less than 10 % of the host's memory is available for 5 minutes.",
            "5m",
        ),
        _alert(
            "HostPacketLoss",
            f"sum by (instance) ({drops})\n/\nsum by (instance) ({packets}) > 0.001",
            "ticket",
            "Host {{ $labels.instance }} loses {{ $value | humanizePercentage }} of packets",
            "Dropped and errored packets above 0.1 % of those sent and received for 5 minutes.",
            "5m",
        ),
    ]


def target_alerts() -> list[dict[str, Any]]:
    return [
        _alert(
            f"TargetMissing{''.join(part.title() for part in job.split('-'))}",
            f'absent(up{{job="{job}"}} == 1)',
            severity,
            f"Prometheus has no healthy {job} target",
            f"No target of the {job} job answered a scrape for 2 minutes (down, or gone "
            "from the configuration): its dashboards and alerts are blind.",
            "2m",
        )
        for job, severity in SCRAPE_JOBS.items()
    ]


def alert_groups(settings: SloSettings) -> dict[str, list[dict[str, Any]]]:
    """Rule file name (under dashboards/prometheus/rules/) -> its ``groups:``."""
    return {
        "slo-alerts.yml": [{"name": "bastion-slo", "rules": slo_alerts(settings)}],
        "gateway-alerts.yml": [{"name": "bastion-gateway", "rules": gateway_alerts(settings)}],
        "inference-alerts.yml": [{"name": "vllm", "rules": inference_alerts(settings)}],
        "gpu-host-alerts.yml": [{"name": "gpu-and-hosts", "rules": gpu_host_alerts()}],
        "target-alerts.yml": [{"name": "scrape-targets", "rules": target_alerts()}],
    }

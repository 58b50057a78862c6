"""Prometheus recording rules: expressions that panels and alerts would otherwise each
compute again (the SLO ratios over five windows, the p99s the alerts compare).

Names follow Prometheus's ``level:metric:operations`` convention. The SLIs are ratios of
counter rates (availability: 5xx among model calls; time to first token: calls slower
than the threshold bucket), so a burn rate is the ratio divided by the error budget.
"""

from __future__ import annotations

from typing import Any

from monitors.dashboards.slo import RATE_WINDOWS, SLO_PERIOD, SloSettings

MODEL_CALLS = 'route=~"/v1/.+"'
"""The availability SLI counts model calls, not health checks or admin routes."""


def availability_ratio(window: str) -> str:
    return f"bastion:slo_availability:error_ratio_rate{window}"


def ttft_ratio(window: str) -> str:
    return f"bastion:slo_ttft:slow_ratio_rate{window}"


AVAILABILITY_PERIOD = f"bastion:slo_availability:error_ratio_{SLO_PERIOD}"
TTFT_PERIOD = f"bastion:slo_ttft:slow_ratio_{SLO_PERIOD}"
DURATION_P99 = "bastion:request_duration_seconds:p99_rate5m"
TTFT_P99 = "bastion:time_to_first_token_seconds:p99_rate5m"
OVERHEAD_P99 = "bastion:gateway_overhead_seconds:p99_rate5m"
PREFIX_CACHE_HIT = "model_name:vllm_prefix_cache_hit:ratio_rate5m"


def _availability_expr(window: str) -> str:
    total = f"sum by (model) (rate(bastion_requests_total{{{MODEL_CALLS}}}[{window}]))"
    errors = (
        f'sum by (model) (rate(bastion_requests_total{{{MODEL_CALLS},status_class="5xx"}}'
        f"[{window}]))"
    )
    # A model that never failed has no 5xx series: "or total * 0" gives it a ratio of 0
    # instead of no ratio at all (which a panel shows as "No data").
    return f"({errors} or {total} * 0)\n/\n{total}"


def _ttft_expr(window: str, settings: SloSettings) -> str:
    bucket = f'bastion_time_to_first_token_seconds_bucket{{le=~"{settings.ttft_le}"}}'
    within = f"sum by (model) (rate({bucket}[{window}]))"
    total = f"sum by (model) (rate(bastion_time_to_first_token_seconds_count[{window}]))"
    return f"1 - ({within}\n/\n{total})"


def recording_groups(settings: SloSettings) -> list[dict[str, Any]]:
    """The ``groups:`` of dashboards/prometheus/rules/recording.yml."""
    slo_rules: list[dict[str, Any]] = []
    for window in RATE_WINDOWS:
        slo_rules.append({"record": availability_ratio(window), "expr": _availability_expr(window)})
    for window in RATE_WINDOWS:
        slo_rules.append({"record": ttft_ratio(window), "expr": _ttft_expr(window, settings)})
    # The budget spent over the SLO period, from the 5-minute ratios recorded above
    # (cheap: one sample per evaluation, instead of 30 days of raw counters).
    slo_rules.append(
        {
            "record": AVAILABILITY_PERIOD,
            "expr": f"avg_over_time({availability_ratio('5m')}[{SLO_PERIOD}])",
        }
    )
    slo_rules.append(
        {"record": TTFT_PERIOD, "expr": f"avg_over_time({ttft_ratio('5m')}[{SLO_PERIOD}])"}
    )
    latency_rules = [
        {
            "record": DURATION_P99,
            "expr": "histogram_quantile(0.99, sum by (le, route, model) "
            "(rate(bastion_request_duration_seconds_bucket[5m])))",
        },
        {
            "record": TTFT_P99,
            "expr": "histogram_quantile(0.99, sum by (le, model) "
            "(rate(bastion_time_to_first_token_seconds_bucket[5m])))",
        },
        {
            "record": OVERHEAD_P99,
            "expr": "histogram_quantile(0.99, sum by (le, route) "
            "(rate(bastion_gateway_overhead_seconds_bucket[5m])))",
        },
        {
            "record": PREFIX_CACHE_HIT,
            "expr": "sum by (model_name) (rate(vllm:prefix_cache_hits_total[5m]))\n/\n"
            "sum by (model_name) (rate(vllm:prefix_cache_queries_total[5m]))",
        },
    ]
    return [
        {"name": "bastion-slo-recording", "rules": slo_rules},
        {"name": "bastion-latency-recording", "rules": latency_rules},
    ]

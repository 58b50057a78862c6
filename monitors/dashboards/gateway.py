"""Gateway overview: the SRE's first screen (SLOs, RED by route and model, where the
time goes, limits and upstreams)."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from monitors.dashboards import recording as rec
from monitors.dashboards.panels import (
    RATE,
    Query,
    Section,
    dashboard,
    graph,
    label_variable,
    quantile,
    rate_sum,
    single_stat,
)
from monitors.dashboards.slo import SloSettings

UID = "bastion-gateway"
BURN_UNIT = "suffix:\N{MULTIPLICATION SIGN}"
"""Burn rates read as multiples of the sustainable rate (14.4x, 6x, 1x)."""
SEL = 'instance=~"$instance",model=~"$model"'
INST = 'instance=~"$instance"'


def _slo_section(slo: SloSettings) -> Section:
    av_budget = slo.availability_budget
    ttft_budget = slo.ttft_budget
    good = [(None, "red"), (0.0, "orange"), (0.25, "green")]
    return Section(
        "Service-level objectives (30 days)",
        [
            single_stat(
                f"Availability (objective {slo.availability_objective:.2%})",
                "percentunit",
                "Share of model calls (/v1/*) answered without a 5xx over the last 30 days.",
                [Query(f'1 - {rec.AVAILABILITY_PERIOD}{{model=~"$model"}}', "{{model}}")],
                decimals=3,
                thresholds=[(None, "red"), (slo.availability_objective, "green")],
            ),
            single_stat(
                "Availability error budget left",
                "percentunit",
                "1 = untouched, 0 = spent, below 0 = the objective is missed.",
                [
                    Query(
                        f'1 - {rec.AVAILABILITY_PERIOD}{{model=~"$model"}} / {av_budget:g}',
                        "{{model}}",
                    )
                ],
                decimals=1,
                thresholds=good,
            ),
            single_stat(
                f"First token within {slo.ttft_threshold_s:g} s "
                f"(objective {slo.ttft_objective:.1%})",
                "percentunit",
                "Share of model calls whose first token left the gateway within the "
                "threshold, over the last 30 days.",
                [Query(f'1 - {rec.TTFT_PERIOD}{{model=~"$model"}}', "{{model}}")],
                decimals=2,
                thresholds=[(None, "red"), (slo.ttft_objective, "green")],
            ),
            single_stat(
                "Time-to-first-token error budget left",
                "percentunit",
                "1 = untouched, 0 = spent, below 0 = the objective is missed.",
                [Query(f'1 - {rec.TTFT_PERIOD}{{model=~"$model"}} / {ttft_budget:g}', "{{model}}")],
                decimals=1,
                thresholds=good,
            ),
            graph(
                "Availability burn rate",
                BURN_UNIT,
                "Error ratio divided by the budget: 1 spends the budget in exactly 30 "
                "days; the page alerts fire at 14.4 (1 h and 5 m) and 6 (6 h and 30 m).",
                [
                    Query(
                        f'{rec.availability_ratio(w)}{{model=~"$model"}} / {av_budget:g}',
                        f"{w} {{{{model}}}}",
                    )
                    for w in ("5m", "1h", "6h", "3d")
                ],
            ),
            graph(
                "Time-to-first-token burn rate",
                BURN_UNIT,
                "Share of calls slower than the threshold divided by the budget.",
                [
                    Query(
                        f'{rec.ttft_ratio(w)}{{model=~"$model"}} / {ttft_budget:g}',
                        f"{w} {{{{model}}}}",
                    )
                    for w in ("5m", "1h", "6h", "3d")
                ],
            ),
        ],
    )


def _red_section() -> Section:
    total = rate_sum("bastion_requests_total", "route", SEL)
    return Section(
        "Rate, errors, duration",
        [
            graph(
                "Requests by route",
                "reqps",
                "Requests per second answered, by route template.",
                [Query(total, "{{route}}")],
            ),
            graph(
                "Requests by model and status class",
                "reqps",
                "Requests per second by model and 2xx/4xx/5xx.",
                [
                    Query(
                        rate_sum("bastion_requests_total", "model, status_class", SEL),
                        "{{model}} {{status_class}}",
                    )
                ],
                stacked=True,
            ),
            graph(
                "Error ratio by route (5xx)",
                "percentunit",
                "Share of each route's answers that were 5xx.",
                [
                    Query(
                        rate_sum("bastion_requests_total", "route", f'{SEL},status_class="5xx"')
                        + f"\n/\n{total}",
                        "{{route}}",
                    )
                ],
                min_val=0,
            ),
            graph(
                "Client errors by route (4xx)",
                "percentunit",
                "Share of each route's answers that were 4xx (refusals, bad requests).",
                [
                    Query(
                        rate_sum("bastion_requests_total", "route", f'{SEL},status_class="4xx"')
                        + f"\n/\n{total}",
                        "{{route}}",
                    )
                ],
                min_val=0,
            ),
            graph(
                "Request duration by route",
                "s",
                "Whole request, gateway in to last byte out: p50, p95, p99 from the buckets.",
                [
                    Query(
                        quantile(q, "bastion_request_duration_seconds", "route", SEL),
                        f"p{int(q * 100)} {{{{route}}}}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
            ),
            graph(
                "P99 request duration by model",
                "s",
                "The 99th percentile of whole requests for each model.",
                [
                    Query(
                        quantile(0.99, "bastion_request_duration_seconds", "model", SEL),
                        "{{model}}",
                    )
                ],
            ),
        ],
    )


def _time_section() -> Section:
    return Section(
        "Where the time goes",
        [
            graph(
                "Gateway overhead (total minus upstream)",
                "s",
                "Time spent in Bastion itself: authentication, limits, guards, watermark check.",
                [
                    Query(
                        quantile(q, "bastion_gateway_overhead_seconds", "route", INST),
                        f"p{int(q * 100)} {{{{route}}}}",
                    )
                    for q in (0.5, 0.99)
                ],
            ),
            graph(
                "Upstream time by upstream",
                "s",
                "Time waiting on the inference tier, p50 and p99.",
                [
                    Query(
                        quantile(q, "bastion_upstream_duration_seconds", "upstream", SEL),
                        f"p{int(q * 100)} {{{{upstream}}}}",
                    )
                    for q in (0.5, 0.99)
                ],
            ),
            graph(
                "Time to first token",
                "s",
                "First token of the answer leaving the gateway, p50, p95 and p99.",
                [
                    Query(
                        quantile(q, "bastion_time_to_first_token_seconds", "model", SEL),
                        f"p{int(q * 100)} {{{{model}}}}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
            ),
            graph(
                "Time per output token",
                "s",
                "Decode speed as the client sees it: p50 and p99.",
                [
                    Query(
                        quantile(q, "bastion_time_per_output_token_seconds", "model", SEL),
                        f"p{int(q * 100)} {{{{model}}}}",
                    )
                    for q in (0.5, 0.99)
                ],
            ),
            graph(
                "P99 against the alert bounds (5 m)",
                "s",
                "The recorded p99s the latency alerts compare with their bounds.",
                [
                    Query(f'{rec.TTFT_P99}{{model=~"$model"}}', "time to first token {{model}}"),
                    Query(rec.OVERHEAD_P99, "gateway overhead {{route}}"),
                ],
            ),
            graph(
                "Tokens by model and type",
                "suffix: tokens/s",
                "Input, output and cached input tokens per second.",
                [Query(rate_sum("bastion_tokens_total", "model, type", SEL), "{{model}} {{type}}")],
                stacked=True,
            ),
        ],
    )


def _capacity_section() -> Section:
    return Section(
        "Capacity, limits and upstreams",
        [
            graph(
                "Requests in flight",
                "short",
                "Requests being handled right now, summed over workers.",
                [Query(f"sum by (route) (bastion_requests_in_flight{{{INST}}})", "{{route}}")],
            ),
            graph(
                "Rate-limit refusals",
                "reqps",
                "Calls refused with 429, by bucket (requests, tokens, quota) and tier.",
                [
                    Query(
                        rate_sum("bastion_ratelimit_refusals_total", "bucket, tier", INST),
                        "{{bucket}} {{tier}}",
                    )
                ],
            ),
            graph(
                "Upstream health and breaker",
                "short",
                "up: 1 healthy, 0 failing health checks. breaker: 0 closed, 1 half-open, 2 open.",
                [
                    Query(f"min by (upstream) (bastion_upstream_up{{{INST}}})", "up {{upstream}}"),
                    Query(
                        f"max by (upstream) (bastion_upstream_breaker_state{{{INST}}})",
                        "breaker {{upstream}}",
                    ),
                ],
                min_val=0,
            ),
            graph(
                "Upstream errors and retries",
                "ops",
                "Upstream failures by kind (connect, timeout, status, mid_stream) and retries.",
                [
                    Query(
                        rate_sum("bastion_upstream_errors_total", "upstream, kind", INST),
                        "{{upstream}} {{kind}}",
                    ),
                    Query(
                        rate_sum("bastion_upstream_retries_total", "upstream", INST),
                        "retries {{upstream}}",
                    ),
                ],
            ),
        ],
    )


def build(slo: SloSettings) -> Dashboard:
    return dashboard(
        UID,
        "Bastion / Gateway overview",
        "Is the gateway meeting its SLOs, how busy is it, where does a request's time go. "
        f"Percentiles come from histogram buckets over {RATE}.",
        [_slo_section(slo), _red_section(), _time_section(), _capacity_section()],
        [
            label_variable("instance", "instance", 'up{job="bastion-gateway"}', "Gateway"),
            label_variable("model", "model", "bastion_requests_total", "Model"),
        ],
    )

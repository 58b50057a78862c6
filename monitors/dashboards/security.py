"""Security and compliance: who is refused and why, what the guards do, whether answers
carry the watermark, and whether the audit trail and event shipping keep up."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from monitors.dashboards.panels import (
    Query,
    Section,
    dashboard,
    graph,
    label_variable,
    quantile,
    rate_sum,
    single_stat,
)

UID = "bastion-security"
INST = 'instance=~"$instance"'
SEL = 'instance=~"$instance",model=~"$model"'


def _access_section() -> Section:
    return Section(
        "Access",
        [
            graph(
                "Authentication and authorisation failures by reason",
                "reqps",
                "missing, malformed, unknown, revoked, expired keys, and forbidden (a valid "
                "key without the permission or model).",
                [Query(rate_sum("bastion_auth_failures_total", "reason", INST), "{{reason}}")],
                stacked=True,
            ),
            graph(
                "Rate-limit refusals by tier",
                "reqps",
                "429s by key tier and bucket (requests, tokens, quota).",
                [
                    Query(
                        rate_sum("bastion_ratelimit_refusals_total", "tier, bucket", INST),
                        "{{tier}} {{bucket}}",
                    )
                ],
                stacked=True,
            ),
        ],
    )


def _guard_section() -> Section:
    blocks = rate_sum("bastion_guard_verdicts_total", "", f'{INST},action="block"')
    calls = rate_sum("bastion_requests_total", "", f'{SEL},route=~"/v1/.+"')
    return Section(
        "Guards",
        [
            graph(
                "Guard verdicts by scanner and action",
                "ops",
                "Each scanner's verdicts (pass, redact, block, flag) on prompts and answers.",
                [
                    Query(
                        rate_sum("bastion_guard_verdicts_total", "scanner, stage, action", INST),
                        "{{scanner}} {{stage}} {{action}}",
                    )
                ],
            ),
            graph(
                "Blocked share of model calls",
                "percentunit",
                "Guard blocks over model calls: a jump is an attack or a scanner gone wrong.",
                [Query(f"{blocks}\n/\n{calls}", "blocked")],
                min_val=0,
            ),
            graph(
                "Guard scan time (p99)",
                "s",
                "Time each scanner adds to a call, at the 99th percentile.",
                [
                    Query(
                        quantile(
                            0.99, "bastion_guard_scan_duration_seconds", "scanner, stage", INST
                        ),
                        "{{scanner}} {{stage}}",
                    )
                ],
            ),
        ],
    )


def _output_section() -> Section:
    verdicts = rate_sum("bastion_watermark_verdicts_total", "", INST)
    marked = rate_sum("bastion_watermark_verdicts_total", "", f'{INST},verdict="watermarked"')
    return Section(
        "Answers: watermark and repetition",
        [
            graph(
                "Watermark verdicts",
                "ops",
                "Answers scored for the inference tier's watermark, by verdict.",
                [
                    Query(
                        rate_sum("bastion_watermark_verdicts_total", "verdict", INST), "{{verdict}}"
                    )
                ],
                stacked=True,
            ),
            single_stat(
                "Watermarked share",
                "percentunit",
                "Share of scored answers that carry the watermark; a drop means answers no "
                "longer come from the watermarking tier.",
                [Query(f"{marked}\n/\n{verdicts}")],
                width=4,
                height=8,
                decimals=1,
                thresholds=[(None, "red"), (0.9, "green")],
            ),
            graph(
                "Output repetition ratio",
                "percentunit",
                "Repeated n-grams per answer, p50 and p95; the alert fires when the mean "
                "stays above 15 %.",
                [
                    Query(
                        quantile(q, "bastion_output_repetition_ratio", "model", SEL),
                        f"p{int(q * 100)} {{{{model}}}}",
                    )
                    for q in (0.5, 0.95)
                ],
                width=8,
                min_val=0,
            ),
        ],
    )


def _audit_section() -> Section:
    return Section(
        "Audit trail and event shipping",
        [
            graph(
                "Audit queue depth",
                "short",
                "Calls waiting to be written to the audit log.",
                [Query(f"sum(bastion_audit_queue_depth{{{INST}}})", "queued")],
                width=8,
            ),
            graph(
                "Audit write latency",
                "s",
                "Audit log commit time, p50 and p99.",
                [
                    Query(
                        quantile(q, "bastion_audit_write_duration_seconds", "", INST),
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.99)
                ],
                width=8,
            ),
            graph(
                "Audit write failures",
                "ops",
                "Writes the audit store refused; any is a page.",
                [Query(rate_sum("bastion_audit_write_failures_total", "", INST), "failures")],
                width=8,
            ),
            graph(
                "Events shipped to Elasticsearch",
                "ops",
                "Events sent, retried, failed (by reason) and dropped because the spool was full.",
                [
                    Query(rate_sum("bastion_events_sent_total", "", INST), "sent"),
                    Query(rate_sum("bastion_events_retried_total", "", INST), "retried"),
                    Query(
                        rate_sum("bastion_events_failed_total", "reason", INST), "failed {{reason}}"
                    ),
                    Query(rate_sum("bastion_events_dropped_total", "", INST), "dropped"),
                ],
            ),
            graph(
                "Event spool backlog",
                "short",
                "Events waiting in the disk spool for Elasticsearch to take them.",
                [Query(f"sum(bastion_events_spool_events{{{INST}}})", "events")],
                width=6,
            ),
            graph(
                "Oldest spooled event",
                "s",
                "Age of the oldest event in the spool: how far Kibana lags behind.",
                [Query(f"max(bastion_events_spool_oldest_age_seconds{{{INST}}})", "age")],
                width=6,
            ),
            graph(
                "Spool size",
                "bytes",
                "Bytes on disk in the event spool.",
                [Query(f"sum(bastion_events_spool_bytes{{{INST}}})", "bytes")],
                width=6,
            ),
            graph(
                "Event sink drops",
                "ops",
                "Records a non-blocking sink dropped because its queue was full.",
                [Query(rate_sum("bastion_event_sink_dropped_total", "sink", INST), "{{sink}}")],
                width=6,
            ),
        ],
    )


def _anomaly_section() -> Section:
    return Section(
        "Anomalies",
        [
            graph(
                "Anomaly flags by family",
                "ops",
                "Calls or key windows the Isolation Forest flagged, by feature family.",
                [Query(rate_sum("bastion_anomaly_flags_total", "family", INST), "{{family}}")],
            ),
            graph(
                "Anomaly score (p50, p99)",
                "short",
                "Isolation Forest scores of scored traffic.",
                [
                    Query(quantile(q, "bastion_anomaly_score", "", INST), f"p{int(q * 100)}")
                    for q in (0.5, 0.99)
                ],
            ),
        ],
    )


def build() -> Dashboard:
    return dashboard(
        UID,
        "Bastion / Security and compliance",
        "Who is refused and why, what the guards block, whether answers are watermarked, "
        "and whether the audit trail and the event pipeline keep up.",
        [
            _access_section(),
            _guard_section(),
            _output_section(),
            _audit_section(),
            _anomaly_section(),
        ],
        [
            label_variable("instance", "instance", 'up{job="bastion-gateway"}', "Gateway"),
            label_variable("model", "model", "bastion_requests_total", "Model"),
        ],
    )

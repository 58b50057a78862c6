"""Inference: the vLLM tier seen from its own metrics, next to the gateway's view.

Metric names are vLLM 0.32's (``vllm/v1/metrics/loggers.py`` of the version the stack
pins): counters carry ``_total``; ``gpu_cache_usage_perc``, ``gpu_prefix_cache_*`` and
``time_per_output_token_seconds`` are gone. Labels: ``model_name`` (the served model
name, which the stack sets to the gateway's model name) and ``engine``. vLLM's queue
and end-to-end buckets start at 0.3 s, so their low percentiles are coarse.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from monitors.dashboards import recording as rec
from monitors.dashboards.panels import (
    Query,
    Section,
    dashboard,
    graph,
    label_variable,
    quantile,
    rate_sum,
)

UID = "bastion-inference"
V = 'model_name=~"$model",instance=~"$instance"'
GW = 'model=~"$model"'


def _latency_section() -> Section:
    return Section(
        "Latency: the gateway's view and vLLM's",
        [
            graph(
                "Time to first token: gateway vs vLLM",
                "s",
                "p50 and p99 as the client sees it (gateway) and as the engine measures "
                "it (vLLM); the gap is the gateway plus the network.",
                [
                    Query(
                        quantile(0.5, "bastion_time_to_first_token_seconds", "model", GW),
                        "gateway p50 {{model}}",
                    ),
                    Query(
                        quantile(0.99, "bastion_time_to_first_token_seconds", "model", GW),
                        "gateway p99 {{model}}",
                    ),
                    Query(
                        quantile(0.5, "vllm:time_to_first_token_seconds", "model_name", V),
                        "vLLM p50 {{model_name}}",
                    ),
                    Query(
                        quantile(0.99, "vllm:time_to_first_token_seconds", "model_name", V),
                        "vLLM p99 {{model_name}}",
                    ),
                ],
            ),
            graph(
                "Inter-token latency: gateway vs vLLM",
                "s",
                "Gateway time per output token against vLLM's inter-token latency (p50, p99).",
                [
                    Query(
                        quantile(0.5, "bastion_time_per_output_token_seconds", "model", GW),
                        "gateway p50 {{model}}",
                    ),
                    Query(
                        quantile(0.99, "bastion_time_per_output_token_seconds", "model", GW),
                        "gateway p99 {{model}}",
                    ),
                    Query(
                        quantile(0.5, "vllm:inter_token_latency_seconds", "model_name", V),
                        "vLLM p50 {{model_name}}",
                    ),
                    Query(
                        quantile(0.99, "vllm:inter_token_latency_seconds", "model_name", V),
                        "vLLM p99 {{model_name}}",
                    ),
                ],
            ),
            graph(
                "Where vLLM's time goes (p95)",
                "s",
                "Queueing (waiting for a slot) and prefill (computing the prompt) make up vLLM's "
                "time to first token; decode is the rest of the answer.",
                [
                    Query(
                        quantile(0.95, "vllm:request_queue_time_seconds", "model_name", V),
                        "queue {{model_name}}",
                    ),
                    Query(
                        quantile(0.95, "vllm:request_prefill_time_seconds", "model_name", V),
                        "prefill {{model_name}}",
                    ),
                    Query(
                        quantile(0.95, "vllm:request_decode_time_seconds", "model_name", V),
                        "decode {{model_name}}",
                    ),
                ],
            ),
            graph(
                "End-to-end request latency (vLLM)",
                "s",
                "p50 and p99 of whole requests inside vLLM.",
                [
                    Query(
                        quantile(q, "vllm:e2e_request_latency_seconds", "model_name", V),
                        f"p{int(q * 100)} {{{{model_name}}}}",
                    )
                    for q in (0.5, 0.99)
                ],
            ),
        ],
    )


def _load_section() -> Section:
    return Section(
        "Load and KV cache",
        [
            graph(
                "Requests running and waiting",
                "short",
                "Requests in the running batch and in the waiting queue.",
                [
                    Query(
                        f"sum by (model_name) (vllm:num_requests_running{{{V}}})",
                        "running {{model_name}}",
                    ),
                    Query(
                        f"sum by (model_name) (vllm:num_requests_waiting{{{V}}})",
                        "waiting {{model_name}}",
                    ),
                ],
            ),
            graph(
                "KV-cache usage",
                "percentunit",
                "Share of KV-cache blocks in use (1 = full); above 90 % with requests "
                "waiting, the tier is out of capacity.",
                [
                    Query(
                        f"max by (model_name, instance) (vllm:kv_cache_usage_perc{{{V}}})",
                        "{{model_name}} {{instance}}",
                    )
                ],
                min_val=0,
                max_val=1,
            ),
            graph(
                "Prefix-cache hit rate",
                "percentunit",
                "Prefix-cache hits over queries (tokens), as a ratio of rates; the 5 m "
                "recorded ratio is what the alert compares with its floor.",
                [
                    Query(
                        rate_sum("vllm:prefix_cache_hits_total", "model_name", V)
                        + "\n/\n"
                        + rate_sum("vllm:prefix_cache_queries_total", "model_name", V),
                        "{{model_name}}",
                    ),
                    Query(f'{rec.PREFIX_CACHE_HIT}{{model_name=~"$model"}}', "5m {{model_name}}"),
                ],
                min_val=0,
                max_val=1,
            ),
            graph(
                "Preemptions",
                "ops",
                "Requests evicted from the KV cache to be recomputed later.",
                [Query(rate_sum("vllm:num_preemptions_total", "model_name", V), "{{model_name}}")],
            ),
        ],
    )


def _throughput_section() -> Section:
    return Section(
        "Throughput",
        [
            graph(
                "Tokens per second",
                "suffix: tokens/s",
                "Prompt tokens computed, prompt tokens served from the prefix cache, and "
                "generated tokens.",
                [
                    Query(
                        rate_sum("vllm:prompt_tokens_total", "model_name", V),
                        "prompt {{model_name}}",
                    ),
                    Query(
                        rate_sum("vllm:prompt_tokens_cached_total", "model_name", V),
                        "prompt cached {{model_name}}",
                    ),
                    Query(
                        rate_sum("vllm:generation_tokens_total", "model_name", V),
                        "generation {{model_name}}",
                    ),
                ],
            ),
            graph(
                "Finished requests by reason",
                "reqps",
                "Requests vLLM finished, by reason (stop, length, abort, ...).",
                [
                    Query(
                        rate_sum("vllm:request_success_total", "model_name, finished_reason", V),
                        "{{model_name}} {{finished_reason}}",
                    )
                ],
                stacked=True,
            ),
            graph(
                "Prompt and generation length (p50, p95)",
                "short",
                "Tokens per request, from vLLM's size histograms.",
                [
                    Query(
                        quantile(0.5, "vllm:request_prompt_tokens", "model_name", V),
                        "prompt p50 {{model_name}}",
                    ),
                    Query(
                        quantile(0.95, "vllm:request_prompt_tokens", "model_name", V),
                        "prompt p95 {{model_name}}",
                    ),
                    Query(
                        quantile(0.5, "vllm:request_generation_tokens", "model_name", V),
                        "generation p50 {{model_name}}",
                    ),
                    Query(
                        quantile(0.95, "vllm:request_generation_tokens", "model_name", V),
                        "generation p95 {{model_name}}",
                    ),
                ],
            ),
            graph(
                "Admission rejections",
                "reqps",
                "Requests vLLM's frontend refused because a queue limit was reached.",
                [
                    Query(
                        rate_sum(
                            "vllm:admission_rejections_total",
                            "model_name, reason",
                            'model_name=~"$model",instance=~"$instance"',
                        ),
                        "{{model_name}} {{reason}}",
                    )
                ],
            ),
        ],
    )


def build() -> Dashboard:
    return dashboard(
        UID,
        "Bastion / Inference (vLLM)",
        "Is the inference tier the bottleneck: queueing, KV cache, prefix cache, "
        "preemptions, throughput, and the gateway's latency next to vLLM's.",
        [_latency_section(), _load_section(), _throughput_section()],
        [
            label_variable("instance", "instance", "vllm:num_requests_running", "vLLM instance"),
            label_variable("model", "model_name", "vllm:num_requests_running", "Model"),
        ],
    )

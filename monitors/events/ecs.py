"""One Elastic Common Schema (ECS) document per :class:`RequestEvent`.

Standard fields where ECS has one (``event.*``, ``http.*``, ``url.path``, ``client.ip``,
``user_agent.original``, ``user.id``, ``service.*``, ``trace.id``, ``error.*`` and the
``gen_ai.*`` field set added to ECS as beta in 9.0); everything else under ``bastion.*``.
Every field written here is mapped in :mod:`monitors.events.templates` and a test indexes
documents of every kind under the strict mapping, so the two cannot drift apart silently.

Personal data stays out unless a setting lets it in: ``user.id`` (include_subject),
``client.ip`` (include_client_ip), ``user_agent.original`` (include_user_agent), and
prompts/answers (``bastion.payload``, payloads). The document ``_id`` is the gateway
request id (:func:`document_id`), so a replayed document is refused as a duplicate
instead of being indexed twice.
"""

from __future__ import annotations

import time
from importlib import metadata
from typing import Any

from monitors.events.settings import EventSettings
from monitors.request_event import RequestEvent

ECS_VERSION = "9.0.0"
SERVICE_NAME = "bastion"
SERVICE_TYPE = "llm-gateway"

# OpenTelemetry's gen_ai.operation.name values for the OpenAI routes the gateway serves.
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}


def _service_version() -> str:
    try:
        return metadata.version("bastion")
    except metadata.PackageNotFoundError:  # running from a tree that is not installed
        return "0+unknown"


SERVICE_VERSION = _service_version()


def iso_timestamp(time_us: int) -> str:
    """``2026-12-02T09:44:27.123456Z`` from microseconds since the epoch (no float loss)."""
    seconds, micros = divmod(time_us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def document_id(event: RequestEvent) -> str:
    return event.request_id


def _outcome(status: int) -> str:
    if not status:
        return "unknown"
    return "success" if status < 400 else "failure"


def _error(event: RequestEvent) -> dict[str, str] | None:
    kind: str
    if event.cut is not None:
        kind = event.cut
    elif event.status >= 500:
        kind = "server_error"
    elif event.status >= 400:
        kind = "client_error"
    else:
        return None
    error: dict[str, str] = {"type": kind}
    if event.error_type:
        error["code"] = event.error_type
    return error


def _drop_none(mapping: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if value is not None}


def to_document(event: RequestEvent, settings: EventSettings) -> dict[str, Any]:
    """The ECS document for one request (a plain dict, ready for JSON)."""
    doc: dict[str, Any] = {
        "@timestamp": iso_timestamp(event.time_us),
        "ecs": {"version": ECS_VERSION},
        "data_stream": {
            "type": "logs",
            "dataset": settings.dataset,
            "namespace": settings.namespace,
        },
        "event": {
            "kind": "event",
            "category": ["web"],
            "type": ["access", "error"] if event.status >= 400 else ["access"],
            "action": event.kind,
            "outcome": _outcome(event.status),
            "duration": round(event.duration_s * 1e9),
            "id": event.request_id,
            "dataset": settings.dataset,
        },
        "http": {
            "request": {
                "id": event.request_id,
                "method": event.method,
                "body": {"bytes": event.bytes_in},
            },
            "response": {"body": {"bytes": event.bytes_out}},
        },
        "url": {"path": event.route},
        "service": {"name": SERVICE_NAME, "version": SERVICE_VERSION, "type": SERVICE_TYPE},
        # The gateway forwards its request id upstream (x-request-id), so it is the id
        # that ties the client's, the gateway's and the inference tier's records.
        "trace": {"id": event.request_id},
    }
    if event.status:
        doc["http"]["response"]["status_code"] = event.status
    error = _error(event)
    if error:
        doc["error"] = error
    if settings.include_client_ip and event.client_ip:
        doc["client"] = {"ip": event.client_ip}
    if settings.include_user_agent and event.user_agent:
        doc["user_agent"] = {"original": event.user_agent}
    if settings.include_subject and event.subject_id:
        doc["user"] = {"id": event.subject_id}

    if event.kind == "model_call" or event.model is not None:
        usage = _drop_none(
            {"input_tokens": event.prompt_tokens, "output_tokens": event.completion_tokens}
        )
        gen_ai = _drop_none(
            {
                "operation": {"name": _OPERATIONS.get(event.route, "other")},
                "request": {"model": event.model} if event.model else None,
                "response": {"model": event.model_served} if event.model_served else None,
                "usage": usage or None,
            }
        )
        doc["gen_ai"] = gen_ai

    doc["bastion"] = _bastion(event, settings)
    return doc


def _bastion(event: RequestEvent, settings: EventSettings) -> dict[str, Any]:
    verdicts = [
        {
            "scanner": v.scanner,
            "stage": v.stage,
            "action": v.action,
            "score": v.score,
            "latency_s": v.latency_s,
        }
        for v in event.guard_verdicts
    ]
    bastion = _drop_none(
        {
            "kind": event.kind,
            "client_request_id": event.client_request_id,
            "key_id": event.key_id,
            "roles": list(event.roles) or None,
            "tier": event.tier,
            "upstream": event.upstream,
            "stream": event.stream,
            "cut": event.cut,
            "ratelimit": event.ratelimit,
            "retries": event.retries,
            "ttft_s": event.ttft_s,
            "tpot_s": event.tpot_s,
            "upstream_s": event.upstream_s,
            "gateway_s": event.gateway_s,
            "queue_wait_s": event.queue_wait_s,
            "cached_input_tokens": event.cached_tokens,
            "repetition_rate": event.repetition_rate,
        }
    )
    if event.watermark is not None:
        bastion["watermark"] = _drop_none({"verdict": event.watermark, "z": event.watermark_z})
    if verdicts:
        bastion["guard"] = {
            "verdicts": verdicts,
            # Objects in an array lose their pairing once indexed (they are not nested);
            # "scanner/stage/action" keeps it for exact filters in Kibana.
            "summary": sorted({f"{v['scanner']}/{v['stage']}/{v['action']}" for v in verdicts}),
        }
    if settings.payloads and event.payload is not None:
        bastion["payload"] = event.payload
    return bastion

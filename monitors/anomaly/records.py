"""A flag as the other records see it: an audit entry (an anomaly is security-relevant)
and an ECS alert document for the event stream.

The gateway wires them as ``on_flag`` callbacks of :class:`AnomalyMonitor`:
``audit_callback(audit_trail.record)`` and ``lambda flag: shipper.ship_document(
ecs_document(flag))`` (whatever its shipper offers for a document that is not a request).
Neither carries prompts or subjects: key id, model, family, scores, request ids and the
explanation's top reasons.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from compliance.records import AuditRecord

ANOMALY_FLAGGED = "anomaly.flagged"
AUDIT_REQUEST_IDS = 100
"""Request ids kept in the audit entry (the anomalies table keeps up to 500)."""


def _reasons(flag: dict[str, Any]) -> list[str]:
    return [f["text"] for f in flag["explanation"].get("features", [])[:3]]


def audit_record(flag: dict[str, Any]) -> AuditRecord:
    return AuditRecord(
        kind=ANOMALY_FLAGGED,
        time_us=int(flag["time_us"]),
        key_id=flag["key_id"],
        model=flag["model"],
        detail={
            "anomaly_id": flag.get("id"),
            "family": flag["family"],
            "score": round(float(flag["score"]), 4),
            "threshold": round(float(flag["threshold"]), 4),
            "model_version": flag["model_version"],
            "window_start_us": int(flag["window_start_us"]),
            "requests": int(flag["requests"]),
            "request_ids": list(flag["request_ids"][:AUDIT_REQUEST_IDS]),
            "reasons": _reasons(flag),
        },
    )


def audit_callback(
    record: Callable[[AuditRecord], Awaitable[Any]],
) -> Callable[[dict[str, Any]], Awaitable[None]]:
    """An ``on_flag`` callback that appends each flag to the audit log through ``record``
    (e.g. ``AuditTrail.record``, which waits until the entry is durable)."""

    async def callback(flag: dict[str, Any]) -> None:
        await record(audit_record(flag))

    return callback


def ecs_document(flag: dict[str, Any]) -> dict[str, Any]:
    """The flag as an ECS 9 alert (``event.kind: alert``) for Elasticsearch/OpenSearch."""
    when = datetime.fromtimestamp(flag["time_us"] / 1e6, UTC)
    return {
        "@timestamp": when.isoformat().replace("+00:00", "Z"),
        "ecs": {"version": "9.0.0"},
        "event": {
            "kind": "alert",
            "category": ["intrusion_detection"],
            "type": ["info"],
            "dataset": "bastion.anomaly",
            "module": "bastion",
            "id": str(flag.get("id", "")),
            "risk_score": round(float(flag["score"]), 4),
            "start": datetime.fromtimestamp(flag["window_start_us"] / 1e6, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        },
        "rule": {"name": f"anomaly.{flag['family']}", "category": flag["family"]},
        "gen_ai": {"request": {"model": flag["model"]}},
        "bastion": {
            "key_id": flag["key_id"],
            "anomaly": {
                "family": flag["family"],
                "score": float(flag["score"]),
                "threshold": float(flag["threshold"]),
                "model_version": flag["model_version"],
                "requests": int(flag["requests"]),
                "request_ids": list(flag["request_ids"][:AUDIT_REQUEST_IDS]),
                "reasons": _reasons(flag),
            },
        },
    }

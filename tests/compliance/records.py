"""Sample audit records for the tests."""

from __future__ import annotations

from compliance.records import AuditRecord


def request_record(n: int, *, subject: str | None = "alice", **changes: object) -> AuditRecord:
    fields: dict[str, object] = {
        "request_id": f"req-{n:06d}",
        "key_id": "0123456789abcdef",
        "subject_id": subject,
        "model": "dev-model",
        "route": "/v1/chat/completions",
        "status": 200,
        "prompt_tokens": 12 + n,
        "completion_tokens": 30,
        "latency_us": 120_000 + n,
        "ttft_us": 8_000,
        "guard": "pass",
        "watermark": "watermarked z=4.10",
        "payload": {
            "request": {"messages": [{"role": "user", "content": f"question {n}"}]},
            "response": f"answer {n}",
        },
    }
    fields.update(changes)
    return AuditRecord(**fields)  # type: ignore[arg-type]

"""Token counts: estimated from a request before it is sent, read from the answer after.

The estimate (about four characters a token, plus the completion budget the client asked
for) only has to be in the right range: the rate limiter corrects it from the usage the
upstream reports, streams included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache (``prompt_tokens_details``), if told."""

    @classmethod
    def from_json(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens") or 0
        total = usage.get("total_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return cls(
            prompt,
            completion,
            total if isinstance(total, int) else prompt + completion,
            cached if isinstance(cached, int) else None,
        )


def _text_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_size(v) if not isinstance(v, int) else CHARS_PER_TOKEN for v in value)
    if isinstance(value, dict):
        return sum(_text_size(v) for k, v in value.items() if k in {"text", "content"})
    return 0


def estimate_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens (from characters) plus the completion tokens the request may use."""
    messages = body.get("messages")
    if messages is not None:
        chars = 0
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                # Plain text, the usual case, without _text_size's walk.
                chars += len(content) if type(content) is str else _text_size(content)
        prompt = chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(messages)
    else:
        prompt = _text_size(body.get("prompt", body.get("input"))) // CHARS_PER_TOKEN
    budget = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    n = body.get("n") or 1
    completion = budget * n if type(budget) is int and type(n) is int else 0
    return max(1, prompt + completion)


def usage_of_body(body: bytes) -> Usage | None:
    """The ``usage`` of a whole (non-streamed) OpenAI answer."""
    if b'"usage"' not in body:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return Usage.from_json(document.get("usage")) if isinstance(document, dict) else None


def usage_of_event(event: bytes) -> tuple[Usage, bool] | None:
    """The usage carried by one SSE event, and whether it is a usage-only chunk."""
    if b'"prompt_tokens"' not in event:
        return None
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        try:
            chunk = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict):
            return None
        usage = Usage.from_json(chunk.get("usage"))
        if usage is not None:
            return usage, not chunk.get("choices")
    return None

"""Building model calls and streamed answers for the guards' tests (no server needed)."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from gateway.pipeline import CallContext
from gateway.rbac import Principal
from monitors.request_event import RequestEvent


def make_call(
    body: dict[str, Any],
    *,
    stream: bool = False,
    route: str = "/v1/chat/completions",
    roles: tuple[str, ...] = ("app",),
    key_id: str = "key-1",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> CallContext:
    """A call as the endpoint hands it to the request checks."""
    fields = {f.name for f in dataclasses.fields(CallContext)}
    kwargs: dict[str, Any] = {
        "route": route,
        "scope": {"type": "http", "headers": headers or []},
        "principal": Principal(key_id, frozenset(roles), None, None, "default"),
        "event": RequestEvent(time_us=0, request_id="req", route=route),
        "raw": orjson.dumps(body),
        "body": body,
        "stream": stream,
    }
    if "request" in fields:  # the call context keeps the request apart from the body
        kwargs["request"] = body
        kwargs["body"] = dict(body)
    return CallContext(**kwargs)


def chat(text: str, role: str = "user", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": role, "content": text}], **extra}


def chunk(content: str | None = None, *, finish: str | None = None, **delta: Any) -> bytes:
    """One OpenAI chat completion chunk as an SSE event."""
    if content is not None:
        delta["content"] = content
    document = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(document) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def stream_text(data: bytes) -> tuple[str, dict[int, str], bool]:
    """(the content, tool-call arguments by index, whether it ended with [DONE])."""
    content = ""
    arguments: dict[int, str] = {}
    done = False
    for event in data.split(b"\n\n"):
        if not event.startswith(b"data: "):
            continue
        if event == b"data: [DONE]":
            done = True
            continue
        document = orjson.loads(event[6:])
        for choice in document.get("choices", []):
            delta = choice.get("delta", {})
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                index = call["index"]
                arguments[index] = arguments.get(index, "") + call["function"]["arguments"]
    return content, arguments, done


def answer(content: str) -> bytes:
    document = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }
    return orjson.dumps(document)

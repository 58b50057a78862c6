"""What the static upstream answers and what the load sends: fixed OpenAI-shaped bodies.

Every target forwards to the same static upstream (nginx answering these bodies as fast as
it can), so what is measured is the cost of the proxy itself. nginx holds them in its
configuration, quoted (:func:`nginx_quote`) and split under its 4 KiB token limit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MODEL_JSON = "bench-model"  # served by the JSON upstream
MODEL_SSE = "bench-model-stream"  # served by the SSE upstream


ANSWER = (
    "Bastion is a gateway that sits between clients and self-hosted language models."
    " It routes requests, checks health, retries failed upstreams and streams tokens back"
    " as they arrive."
)
# The stream sends the answer one word per event, as a model would (roughly) one token.


_WORDS = ANSWER.split(" ")


ANSWER_PIECES = [_WORDS[0], *(" " + w for w in _WORDS[1:])]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def chat_completion_body() -> str:
    """A realistic non-streaming chat.completion object with usage."""
    return _dumps(
        {
            "id": "chatcmpl-bench0000000000000000000001",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL_JSON,
            "system_fingerprint": "fp_bench0001",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 42,
                "completion_tokens": len(ANSWER_PIECES),
                "total_tokens": 42 + len(ANSWER_PIECES),
            },
        }
    )


def sse_body() -> str:
    """A fixed SSE stream: a role chunk, content chunks, a finish chunk, then [DONE]."""
    base = {
        "id": "chatcmpl-bench0000000000000000000002",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL_SSE,
        "system_fingerprint": "fp_bench0001",
    }

    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return "data: " + _dumps({**base, "choices": [choice]}) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": piece}, None) for piece in ANSWER_PIECES]
    events.append(chunk({}, "stop"))
    events.append("data: [DONE]\n\n")
    return "".join(events)


def models_body() -> str:
    return _dumps(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "bench"}
                for m in (MODEL_JSON, MODEL_SSE)
            ],
        }
    )


def request_body(model: str, stream: bool) -> str:
    return _dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "In two sentences, what does an LLM gateway do?"},
            ],
            "max_tokens": 128,
            "temperature": 0,
            "stream": stream,
        }
    )


def nginx_quote(text: str) -> str:
    """Make text safe inside a single-quoted nginx string (newlines become \\n escapes)."""
    for bad in ("'", "\\", "$"):
        if bad in text:
            raise ValueError(f"body contains {bad!r}, which the nginx template cannot hold")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def nginx_parts(text: str, limit: int = 3000) -> list[str]:
    """Split text at newlines into pieces whose nginx-quoted form stays under limit bytes
    (nginx rejects a config token longer than 4 KiB)."""
    parts: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        if len(nginx_quote(line)) > limit:
            raise ValueError("a single line of the body is too long for nginx")
        if current and len(nginx_quote(current + line)) > limit:
            parts.append(current)
            current = ""
        current += line
    if current:
        parts.append(current)
    return parts


def render(template: Path, out: Path, values: dict[str, str]) -> Path:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    leftover = re.findall(r"@[A-Z_]+@", code)
    if leftover:
        raise ValueError(f"unrendered placeholders in {template.name}: {leftover}")
    out.write_text(text)
    return out

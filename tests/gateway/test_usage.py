"""Token estimates made before forwarding, and the usage read from answers afterwards."""

from __future__ import annotations

import orjson
import pytest

from gateway.usage import Usage, estimate_tokens, usage_of_body, usage_of_event


def chat(*contents: object, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": c} for c in contents], **extra}


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        # 4 characters a token, 4 tokens of overhead per message
        (chat("x" * 40), 10 + 4),
        (chat("x" * 40, "y" * 8), 12 + 8),
        (chat("x" * 40, max_tokens=100), 14 + 100),
        (chat("x" * 40, max_completion_tokens=50, max_tokens=100), 14 + 50),
        (chat("x" * 40, max_tokens=10, n=3), 14 + 30),
        # parts: text counts, an image part counts its text fields only
        (chat([{"type": "text", "text": "x" * 16}, {"type": "image_url", "image_url": {}}]), 8),
        (chat(None), 4),  # an assistant message with tool calls only
        # completions and embeddings: strings, lists of strings, token ids (4 chars each)
        ({"model": "m", "prompt": "x" * 400}, 100),
        ({"model": "m", "prompt": ["x" * 40, "y" * 40]}, 20),
        ({"model": "m", "prompt": [1, 2, 3, 4], "max_tokens": 5}, 4 + 5),
        ({"model": "m", "input": [[1, 2], [3, 4]]}, 4),
        # never below 1; nonsense budgets count nothing
        ({"model": "m", "prompt": ""}, 1),
        (chat("x" * 40, max_tokens=True), 14),
        (chat("x" * 40, max_tokens=10, n="2"), 14),
        (chat("x" * 40, max_tokens=1.5), 14),
    ],
)
def test_estimate_tokens(body: dict[str, object], tokens: int) -> None:
    assert estimate_tokens(body) == tokens


def test_estimate_ignores_messages_that_are_not_objects() -> None:
    body = {"model": "m", "messages": ["not a message", {"role": "user", "content": "x" * 8}]}
    assert estimate_tokens(body) == 2 + 8


def test_usage_of_body() -> None:
    answer = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 18}}
    assert usage_of_body(orjson.dumps(answer)) == Usage(12, 18, 30)
    answer["usage"] = {"prompt_tokens": 12, "completion_tokens": 18, "total_tokens": 31}
    assert usage_of_body(orjson.dumps(answer)) == Usage(12, 18, 31)
    assert usage_of_body(b'{"choices": []}') is None
    assert usage_of_body(b'{"usage": "many"}') is None
    assert usage_of_body(b'{"usage": {"prompt_tokens": "12"}}') is None
    assert usage_of_body(b'["usage"]') is None
    assert usage_of_body(b'{"usage": ') is None  # cut short


def test_usage_of_event() -> None:
    usage_only = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}'
    assert usage_of_event(usage_only) == (Usage(3, 5, 8), True)
    last_chunk = (
        b'data: {"choices": [{"delta": {}}], "usage": {"prompt_tokens": 3, '
        b'"completion_tokens": 5, "total_tokens": 8}}'
    )
    assert usage_of_event(last_chunk) == (Usage(3, 5, 8), False)
    assert usage_of_event(b'data: {"choices": [{"delta": {"content": "hi"}}]}') is None
    assert usage_of_event(b'data: {"prompt_tokens": broken') is None

"""Request bodies: bad JSON and schema errors become 400s that name the field."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidJSON, InvalidRequest
from gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    parse_body,
)


def test_valid_chat_body_is_returned_with_unknown_fields_kept() -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_k": 5}'
    body = parse_body(raw, ChatCompletionRequest)
    assert body["top_k"] == 5 and body["model"] == "m"


@pytest.mark.parametrize(
    ("raw", "error", "param"),
    [
        (b"{", InvalidJSON, None),
        (b"[1, 2]", InvalidJSON, None),
        (b"\xff\xfe", InvalidJSON, None),
        (b'{"messages": [{"role": "user"}]}', InvalidRequest, "model"),
        (b'{"model": 3, "messages": [{"role": "user"}]}', InvalidRequest, "model"),
        (b'{"model": "m", "messages": "hi"}', InvalidRequest, "messages"),
        (b'{"model": "m", "messages": []}', InvalidRequest, "messages"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', InvalidRequest, "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "u"}], "stream": "yes"}', InvalidRequest, "stream"),
    ],
)
def test_bad_chat_bodies(raw: bytes, error: type[Exception], param: str | None) -> None:
    with pytest.raises(error) as caught:
        parse_body(raw, ChatCompletionRequest)
    assert getattr(caught.value, "param", None) == param


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt: object) -> None:
    import orjson

    parse_body(orjson.dumps({"model": "m", "prompt": prompt}), CompletionRequest)


def test_bad_prompt_and_input_name_the_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_body(b'{"model": "m", "prompt": [1, "x"]}', CompletionRequest)
    assert caught.value.param == "prompt"
    with pytest.raises(InvalidRequest) as caught:
        parse_body(b'{"model": "m"}', EmbeddingRequest)
    assert caught.value.param == "input"

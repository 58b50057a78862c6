"""The OpenAI request bodies the gateway accepts, checked before anything is forwarded.

Only what the gateway relies on is strict (model, the input field, stream flags); every
other field is passed through untouched so new OpenAI and vLLM parameters keep working.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from gateway.errors import InvalidJSON, InvalidRequest

TokenIds = list[StrictInt]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr = Field(min_length=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_Body):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None


class EmbeddingRequest(_Body):
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


_UNION_MESSAGES = {
    "prompt": "must be a string, an array of strings, or an array of token ids",
    "input": "must be a string, an array of strings, or an array of token ids",
}


def _param(location: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` -> ``"messages[0].role"``, without pydantic's union tags."""
    out = ""
    for part in location:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"str", "int"} or "[" in part:
            break
        else:
            out += f".{part}" if out else part
    return out


def parse_body(raw: bytes, schema: type[_Body]) -> dict[str, Any]:
    """Parse and check a request body; return it as a dict, or raise a 400 error."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc.msg}.") from exc
    if not isinstance(body, dict):
        raise InvalidJSON("The request body must be a JSON object.")
    try:
        schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param(first["loc"]) or None
        message = first["msg"]
        if first["type"] == "missing":
            message = "is required"
        elif param in _UNION_MESSAGES:
            message = _UNION_MESSAGES[param]
        raise InvalidRequest(f"Invalid request: '{param}' {message}.", param=param) from exc
    return body


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_json_model(raw: bytes, model: type[ModelT]) -> ModelT:
    """A small JSON body (admin and detection routes) as ``model``, or a 400 naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise InvalidJSON("The request body is not valid JSON.") from exc
        param = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"Invalid request: '{param}' {first['msg']}.", param=param) from exc

"""The OpenAI request bodies the gateway accepts, checked before anything is forwarded.

Only what the gateway relies on is strict (model, the input field, stream flags); every
other field is passed through untouched so new OpenAI and vLLM parameters keep working.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from gateway.errors import InvalidJSON, InvalidRequest

TokenIds = list[StrictInt]

MAX_NAME_LENGTH = 256
"""A model name, subject id, key id or other identifier: the store's ``String(256)``
columns (PostgreSQL refuses longer values with an error, not a 4xx)."""

# C0 controls and DEL: PostgreSQL refuses NUL in text outright, the rest have no place in
# an identifier (a log line or a CSV export would carry them).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_controls(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (such as NUL)")
    return value


Name = Annotated[
    StrictStr, Field(min_length=1, max_length=MAX_NAME_LENGTH), AfterValidator(_no_controls)
]
"""An identifier in a request body: 1 to 256 characters, no control character."""


def check_name(value: str, param: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A path or query parameter that names something: a 400 naming ``param`` unless it is
    1 to ``max_length`` characters without control characters."""
    if not value or len(value) > max_length:
        raise InvalidRequest(
            f"Invalid request: '{param}' must be 1 to {max_length} characters.", param=param
        )
    if _CONTROL.search(value):
        raise InvalidRequest(
            f"Invalid request: '{param}' must not contain control characters (such as NUL).",
            param=param,
        )
    return value


def check_path_params(path_params: Mapping[str, Any]) -> None:
    """Every ``{name}`` of a route's path is an identifier (see :func:`check_name`)."""
    for name, value in path_params.items():
        if isinstance(value, str):
            check_name(value, name)


def query_name(params: Mapping[str, str], name: str) -> str | None:
    """The query parameter ``name`` checked by :func:`check_name`, or None when absent."""
    value = params.get(name)
    return None if value is None else check_name(value, name)


JSON_SAFE_INTEGER = 2**53 - 1
"""Integers beyond this lose precision in JavaScript and many JSON parsers (RFC 7493)."""
MAX_JSON_VALUE_DEPTH = 16


def check_json_value(value: Any, depth: int = 0) -> Any:
    """A free-form JSON value that will be stored and served again: integers within
    ±(2^53 - 1), finite numbers, no control characters in strings or keys, nested at
    most ``MAX_JSON_VALUE_DEPTH`` deep. ValueError otherwise (pydantic turns it into a
    400 naming the field): checked before anything is written, so nothing is stored that
    could not be read back or encoded."""
    if depth > MAX_JSON_VALUE_DEPTH:
        raise ValueError(f"nests deeper than {MAX_JSON_VALUE_DEPTH} levels")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if abs(value) > JSON_SAFE_INTEGER:
            raise ValueError("holds an integer beyond ±(2^53 - 1)")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("holds a number out of range")
    elif isinstance(value, str):
        if "\x00" in value:
            raise ValueError("holds a NUL character")
    elif isinstance(value, list):
        for item in value:
            check_json_value(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or _CONTROL.search(key):
                raise ValueError("has a key with control characters")
            check_json_value(item, depth + 1)
    else:
        raise ValueError(f"holds a {type(value).__name__}, not a JSON value")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Name


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


def _message(error: Any) -> str:
    """pydantic's message, without the "Value error, " of our own validators."""
    return str(error["msg"]).removeprefix("Value error, ")


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
        message = _message(first)
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
        raise InvalidRequest(f"Invalid request: '{param}' {_message(first)}.", param=param) from exc

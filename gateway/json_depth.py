"""Bound how deeply a request body nests, before anything is forwarded.

orjson parses 1,024 levels but encodes only 254, and the audit entry of a call encodes
its request: a body nested between the two would be forwarded and then fail to be
recorded. Other code that walks a body recursively (token estimates) needs a bound too.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import InvalidRequest


def check_json_depth(raw: bytes, limit: int) -> None:
    """Raise a 400 when the JSON in ``raw`` nests deeper than ``limit``.

    Runs before the body's schema is checked (pydantic recurses too). Invalid JSON is
    left to the parser that follows, which says what is wrong with it.
    """
    # Fewer brackets than the limit (counted in C, strings included) cannot nest deeper:
    # most bodies never reach the walk.
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    pending: list[tuple[Any, int]] = [(body, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > limit:
            raise InvalidRequest(
                f"The request body nests arrays and objects deeper than {limit} levels "
                "(server.max_json_depth).",
                code="json_too_deep",
            )
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, dict | list):
                pending.append((child, depth + 1))

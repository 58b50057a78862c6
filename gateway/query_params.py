"""Query parameters the listing routes share: times (ISO 8601) and page sizes."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request

from gateway.errors import InvalidRequest

MAX_LIMIT = 1000


def time_param(request: Request, name: str) -> int | None:
    """An ISO 8601 time (UTC unless it says otherwise) in microseconds, or None; 400 if bad."""
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name}: not an ISO 8601 time", param=name) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1_000_000)


def limit_param(request: Request) -> int:
    """``limit``: 1 to MAX_LIMIT (default 100); 400 otherwise."""
    text = request.query_params.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidRequest(f"limit: an integer from 1 to {MAX_LIMIT}", param="limit")
    return int(text)

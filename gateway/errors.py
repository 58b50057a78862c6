"""Every failure the gateway reports, in OpenAI's error JSON shape.

Raise a :class:`GatewayError` subclass anywhere below a route;
:class:`gateway.middleware.errors.ErrorMiddleware` renders it as
``{"error": {"message", "type", "code", "param"}}`` with the class's status and headers.
The listener's own refusals (gateway/listener.py: 400, 408, 431) use :func:`error_body`
too. Streams that already started end with :func:`sse_error_event`.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "code": code, "param": param}}
    )


class GatewayError(Exception):
    """A failure with a known HTTP status, error type and code."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code  # type: ignore[misc]

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return []


class InvalidJSON(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_json"


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason
        """Why, for the metrics: missing, malformed, unknown, revoked or expired."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b'Bearer realm="bastion"')]


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(message)
        self._headers = headers

    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._headers


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class UpstreamFailed(GatewayError):
    """The upstream refused the connection, broke it, or answered 5xx."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", b"1")]


class NoHealthyUpstream(ServiceUnavailable):
    code = "no_healthy_upstream"


class RateLimiterUnavailable(ServiceUnavailable):
    """Rate limits are kept in Redis, Redis is down, and the failure mode is "closed"."""

    code = "rate_limiter_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


def sse_error_event(error: GatewayError) -> bytes:
    """The final event of a stream that fails after it started.

    The official ``openai`` client raises an ``APIError`` when an event's JSON carries
    an ``error`` key, so a client sees the failure instead of a silently short answer.
    """
    return b"data: " + error.body() + b"\n\n"

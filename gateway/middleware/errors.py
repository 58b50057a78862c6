"""Turn every exception that escapes a route into OpenAI's error shape.

Known failures (:class:`GatewayError`) keep their status; Starlette's 404/405 become
JSON; anything else is logged with its request id and answered as a clean 500. If the
response already started, there is nothing left to answer: the error is only logged.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException

from gateway.asgi import ASGIApp, ClientDisconnected, Message, Receive, Scope, Send, send_json
from gateway.errors import GatewayError, MethodNotAllowed, NotFound, Unauthorized, error_body

log = logging.getLogger("bastion.errors")


def _from_http_exception(exc: HTTPException) -> GatewayError:
    if exc.status_code == 405:
        return MethodNotAllowed("This method is not allowed on this route.")
    return NotFound("There is no such route.")


class ErrorMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except ClientDisconnected:
            return
        except (GatewayError, HTTPException) as exc:
            error = exc if isinstance(exc, GatewayError) else _from_http_exception(exc)
            scope["state"]["error_code"] = error.code  # for the request event (observer)
            if isinstance(error, Unauthorized):
                scope["state"]["auth_failure"] = error.reason
            if started:
                log.warning("error after the response started: %s", error.message)
                return
            await send_json(send, error.status, error.body(), error.headers())
        except Exception:
            scope["state"]["error_code"] = "internal_error"
            request_id = scope.get("state", {}).get("request_id", "-")
            log.exception("unhandled error in request %s", request_id)
            if not started:
                body = error_body(
                    f"The gateway failed to handle request {request_id}.",
                    "server_error",
                    "internal_error",
                )
                await send_json(send, 500, body)

"""Give every request a unique id of the gateway's, and keep the client's own apart.

The gateway's id (``x-bastion-request-id``, 32 hex digits) names the request in the
audit log, the request event, the logs and the upstream's ``x-request-id``: no two
requests share it. A client's ``x-request-id``, when sane (at most 128 characters of
``[A-Za-z0-9._:-]``), is kept as its own field and echoed back as ``x-request-id`` so the
client can correlate; without one, ``x-request-id`` carries the gateway's id.
"""

from __future__ import annotations

import os
import re

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send
from monitors.logs import request_id_var

_SANE_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
GATEWAY_HEADER = b"x-bastion-request-id"


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = b""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                if _SANE_ID.fullmatch(value):
                    client_id = value
                break
        request_id = os.urandom(16).hex().encode()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id.decode()
        state["client_request_id"] = client_id.decode() if client_id else None
        headers = [(b"x-request-id", client_id or request_id), (GATEWAY_HEADER, request_id)]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        token = request_id_var.set(state["request_id"])  # on every log line of the request
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)

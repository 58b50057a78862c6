"""Every answer becomes a request event: the ones no model call recorded, here.

A model call builds and completes its own event (gateway.model_routes). Everything else
(refusals before a route ran: 401, 404, 413, 400 on a bad body; the admin, compliance and
privacy routes; /metrics) is observed here, as a pure ASGI middleware: it notes when the
request arrived, the status and bytes of the answer, and offers the event to the
non-blocking sinks (metrics, logs, shipping, anomaly features) once the answer is sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.model_routes import request_event
from gateway.pipeline import CallSinks

ERROR_CODE = "error_code"
"""Where the error middleware leaves the code of the error it answered."""


class ObserverMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        sinks: CallSinks,
        routes: Mapping[Any, str],
        match: Callable[[Scope], str | None] = lambda scope: None,
    ) -> None:
        """``routes``: route template by endpoint (Starlette puts the endpoint in the
        scope); ``match``: the template a request refused before routing would have
        reached (a 401 on /v1/chat/completions counts there, not under ``other``)."""
        self.app = app
        self._sinks = sinks
        self._routes = routes
        self._match = match

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        started = time.perf_counter()
        state["started"] = started
        state["started_us"] = time.time_ns() // 1000
        status = 0
        sent = 0

        async def observe(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            call = state.get("call")
            if call is None or not call.recorded:
                self._publish(scope, status or 499, sent, started)

    def _publish(self, scope: Scope, status: int, sent: int, started: float) -> None:
        state = scope["state"]
        route = self._routes.get(scope.get("endpoint")) or self._match(scope)
        event = request_event(scope, route or "other", state.get("principal"))
        event.kind = "refusal" if route is None or status in (401, 403) else "api"
        if route is not None and route.startswith("/v1/") and scope.get("method") == "POST":
            event.kind = "model_call"
        event.status = status
        event.error_type = state.get(ERROR_CODE)
        event.auth_failure = state.get("auth_failure")
        event.bytes_out = sent
        event.duration_s = time.perf_counter() - started
        self._sinks.publish(event)

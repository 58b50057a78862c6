"""The OpenAI model routes: from an authenticated request to a forwarded one.

One :class:`ModelEndpoint` per route (``POST /v1/chat/completions``...), a pure ASGI
app: read the body under the size cap, check it, build the call's context, run the
request checks in order (restriction, watermark opt-out, model resolution, admission,
input guards...), choose the call's answer filters, forward, then settle what the checks
reserved and complete the call's event sinks. What each step does lives in its check,
filter or sink (gateway.pipeline): this module only runs them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.asgi import Receive, Scope, Send, header_value, read_body
from gateway.errors import GatewayError
from gateway.json_depth import check_json_depth
from gateway.middleware.auth import principal_of
from gateway.pipeline import AnswerFilterSource, CallContext, CallSinks, RequestCheck
from gateway.proxy import Forwarder, Outcome
from gateway.rbac import Principal
from gateway.request_checks import NO_USAGE
from gateway.schemas import _Body, parse_body
from gateway.usage import Usage
from monitors.metrics_sink import InFlight
from monitors.request_event import RequestEvent


def request_event(scope: Scope, route: str, principal: Principal | None) -> RequestEvent:
    """The event of a request that reached ``route``, from what the scope knows."""
    state = scope["state"]
    client = scope.get("client")
    agent = header_value(scope, b"user-agent")
    event = RequestEvent(
        time_us=state.get("started_us") or time.time_ns() // 1000,
        request_id=state["request_id"],
        route=route,
        method=scope.get("method", "POST"),
        client_request_id=state.get("client_request_id"),
        client_ip=client[0] if client else None,
        user_agent=agent[:256].decode("latin-1") if agent else None,
    )
    if principal is not None:
        event.key_id = principal.key_id
        event.roles = tuple(sorted(principal.roles))
        event.tier = principal.tier
        event.subject_id = principal.subject_id
    return event


class ModelEndpoint:
    def __init__(
        self,
        path: str,
        schema: type[_Body],
        streams: bool,
        max_body_bytes: int,
        max_json_depth: int,
        checks: Sequence[RequestCheck],
        filters: Sequence[AnswerFilterSource],
        forwarder: Forwarder,
        sinks: CallSinks,
    ) -> None:
        self._path = path
        self._schema = schema
        self._streams = streams
        self._max_body_bytes = max_body_bytes
        self._max_json_depth = max_json_depth
        self.checks = list(checks)
        """In order; build_app's list."""
        self.filters = list(filters)
        """Answer filter sources, in order (empty for routes that answer no text)."""
        self._forwarder = forwarder
        self._sinks = sinks
        self._in_flight = InFlight()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(scope, receive, self._max_body_bytes)
        check_json_depth(raw, self._max_json_depth)
        body = parse_body(raw, self._schema)
        principal = principal_of(scope)
        event = request_event(scope, self._path, principal)
        event.bytes_in = len(raw)
        stream = self._streams and body.get("stream") is True
        event.stream = stream
        call = CallContext(
            route=self._path,
            scope=scope,
            principal=principal,
            event=event,
            raw=raw,
            request=body,
            stream=stream,
            started=scope["state"].get("started") or time.perf_counter(),
        )
        scope["state"]["call"] = call  # recorded here: the observer leaves it alone
        self._in_flight.enter(self._path)
        try:
            await self._run(call, send, receive)
        finally:
            self._in_flight.leave(self._path)

    async def _run(self, call: CallContext, send: Send, receive: Receive) -> None:
        try:
            for check in self.checks:
                await check.check(call)
            for source in self.filters:
                answer_filter = source.for_call(call)
                if answer_filter is not None:
                    call.filters.append(answer_filter)
            outcome = await self._forwarder.respond(call, send, receive)
        except GatewayError as exc:
            await call.settle(_usage_of(call) or NO_USAGE)
            if not call.recorded:
                call.event.error_type = exc.code
                call.answer = exc.body()
                await self._sinks.complete(call, exc.status)  # durable before it goes out
            raise
        await call.settle(outcome.usage)
        if not call.recorded:
            await self._cut_short(call, outcome)

    async def _cut_short(self, call: CallContext, outcome: Outcome) -> None:
        """The client left, the upstream failed after the first byte, or a filter ended it."""
        if outcome.refused_by_filter:
            call.event.cut = "guard_blocked"
        elif outcome.client_gone:
            call.event.cut = "client_gone"
        else:
            call.event.cut = "upstream_failed"
        await self._sinks.complete(call, outcome.status or 499)


def _usage_of(call: CallContext) -> Usage | None:
    """The usage the upstream reported before the call was refused (an output guard)."""
    event = call.event
    if event.prompt_tokens is None:
        return None
    completion = event.completion_tokens or 0
    return Usage(event.prompt_tokens, completion, event.prompt_tokens + completion)

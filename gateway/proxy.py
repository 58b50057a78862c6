"""Forwarding one checked OpenAI request to an upstream and its answer back to the client.

:class:`Forwarder` tries upstreams chosen by :class:`UpstreamPool` until one answers.
Retries happen only while nothing has reached the client. Streams are passed on event
by event; if the upstream fails after the first byte, the stream ends with an error
event. A client that goes away closes the upstream connection at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import orjson

from gateway.asgi import (
    RAW_HEADERS,
    DisconnectGuard,
    Receive,
    Send,
    offers_raw_headers,
    send_json,
)
from gateway.config import Settings
from gateway.errors import (
    GatewayError,
    NoHealthyUpstream,
    UpstreamFailed,
    UpstreamTimeout,
    error_body,
    sse_error_event,
)
from gateway.pipeline import CallContext, CallSinks, run_filters
from gateway.sse import SSEFramer
from gateway.transport import UpstreamResponse, UpstreamTransport
from gateway.upstreams import Upstream, UpstreamPool
from gateway.usage import Usage, usage_of_body, usage_of_event
from monitors.metrics_sink import UpstreamMetrics

log = logging.getLogger("bastion.proxy")

# Non-streamed answers that take longer than this are watched for a client going away.
WATCH_DISCONNECT_AFTER_S = 0.05

_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True)
class Outcome:
    """What became of a forwarded request, for accounting and the request event."""

    status: int = 0
    upstream: str | None = None
    usage: Usage | None = None
    completed: bool = False
    client_gone: bool = False
    refused_by_filter: bool = False
    """An answer filter (an output guard) ended the answer."""


@dataclass(slots=True)
class Attempts:
    """The upstreams tried for one request and the last failure seen."""

    metrics: UpstreamMetrics
    tried: set[Upstream] = field(default_factory=set)
    failure: GatewayError | None = None

    def failed(self, upstream: Upstream, failure: GatewayError, kind: str = "") -> None:
        """``kind``: ``bastion_upstream_errors_total``'s (by default: timeout or connect)."""
        upstream.breaker.record_failure()
        self.failure = failure
        if not kind:
            kind = "timeout" if isinstance(failure, UpstreamTimeout) else "connect"
        self.metrics.error(upstream.name, kind)
        log.warning("upstream %s failed: %s", upstream.name, failure.message)


class Forwarder:
    """Sends a checked call to the pool's upstreams, with retries before the first byte.

    It knows the call's answer filters only as a list to run the answer through, and its
    sinks only as one fan-out to complete before the answer's last byte goes out.
    """

    def __init__(
        self, settings: Settings, pool: UpstreamPool, transport: UpstreamTransport, sinks: CallSinks
    ):
        self._pool = pool
        self._transport = transport
        self._sinks = sinks
        self._metrics = UpstreamMetrics()
        self._max_attempts = settings.retry.max_attempts
        self._expose_upstream = settings.server.expose_upstream_header

    async def open(
        self, call: CallContext, body: bytes, attempts: Attempts
    ) -> tuple[Upstream, UpstreamResponse]:
        """An upstream's response whose status is below 500, or the last failure raised."""
        model = call.event.model_served or call.body["model"]
        request_id = call.event.request_id
        path = call.route
        accept = "text/event-stream" if call.stream else "application/json"
        while len(attempts.tried) < self._max_attempts:
            upstream = self._pool.choose(model, frozenset(attempts.tried))
            if upstream is None:
                break
            if attempts.tried:
                call.event.retries += 1
                self._metrics.retry(call.event.upstream or upstream.name)
            attempts.tried.add(upstream)
            call.event.upstream = upstream.name
            headers = {
                "content-type": "application/json",
                "accept": accept,
                "x-request-id": request_id,
                **upstream.request_headers,
            }
            try:
                response = await self._transport.send(
                    "POST", upstream.base_url + path, headers, body
                )
            except GatewayError as exc:
                attempts.failed(upstream, exc)
                continue
            except asyncio.CancelledError:
                upstream.breaker.release()
                raise
            if response.status >= 500:
                await response.close()
                status = response.status
                failure = UpstreamFailed(f"The upstream answered {status}.")
                attempts.failed(upstream, failure, "status")
                continue
            return upstream, response
        if attempts.failure is None:
            raise NoHealthyUpstream(f"No healthy upstream serves the model '{model}'.")
        raise attempts.failure

    def response_headers(
        self, call: CallContext, upstream: Upstream
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The answer's own headers as pairs, and its header blocks written out as lines
        where the server takes them so (gateway.asgi.RAW_HEADERS), else as more pairs."""
        pairs = call.response_headers
        if self._expose_upstream:
            pairs = [*pairs, (b"x-bastion-upstream", upstream.name.encode())]
        if not call.header_blocks:
            return pairs, b""
        if offers_raw_headers(call.scope):
            return pairs, b"".join(block.header_lines() for block in call.header_blocks)
        return [*pairs, *(h for block in call.header_blocks for h in block.headers())], b""

    async def respond(self, call: CallContext, send: Send, receive: Receive) -> Outcome:
        """Answer the client; if it goes away first, the upstream request is closed."""
        outcome = Outcome()
        watch_after_s = 0.0 if call.stream else WATCH_DISCONNECT_AFTER_S
        body = call.forward_body()
        call.upstream_started = time.perf_counter()
        async with DisconnectGuard(receive, watch_after_s) as guard:
            if call.stream:
                await self._respond_stream(call, body, send, outcome)
            else:
                await self._respond_whole(call, body, send, outcome)
        if guard.client_gone:
            outcome.client_gone = True
            log.info("client went away; upstream request %s closed", call.event.request_id)
        return outcome

    async def _respond_whole(
        self, call: CallContext, body: bytes, send: Send, outcome: Outcome
    ) -> None:
        # Reading the body may still fail; nothing reached the client, so try again.
        attempts = Attempts(self._metrics)
        while True:
            upstream, response = await self.open(call, body, attempts)
            try:
                answer = await response.read()
            except GatewayError as exc:
                attempts.failed(upstream, exc)
                continue
            except asyncio.CancelledError:
                upstream.breaker.release()
                raise
            upstream.breaker.record_success()
            break
        call.upstream_ended = time.perf_counter()
        outcome.status, outcome.upstream = response.status, upstream.name
        outcome.usage = usage_of_body(answer) if response.status == 200 else None
        note_usage(call, outcome.usage)
        content_type = response.content_type
        if response.status >= 400:
            answer, content_type = openai_error(response.status, answer), "application/json"
        elif response.status == 200 and call.filters:
            try:
                answer = await run_filters(call.filters, answer, last=True)
            except GatewayError:
                outcome.refused_by_filter = True
                raise
        call.answer = answer
        pairs, lines = self.response_headers(call, upstream)
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(answer)).encode()),
            *pairs,
        ]
        await self._sinks.complete(call, response.status)
        start = {"type": "http.response.start", "status": response.status, "headers": headers}
        if lines:
            start[RAW_HEADERS] = lines
        await send(start)
        await send({"type": "http.response.body", "body": answer})
        outcome.completed = True

    async def _respond_stream(
        self, call: CallContext, body: bytes, send: Send, outcome: Outcome
    ) -> None:
        upstream, response = await self.open(call, body, Attempts(self._metrics))
        outcome.status, outcome.upstream = response.status, upstream.name
        if response.status != 200 or "text/event-stream" not in response.content_type:
            # An upstream refusal of a stream request (400, 404...) comes as plain JSON.
            answer = await response.read()
            call.upstream_ended = time.perf_counter()
            upstream.breaker.record_success()
            if response.status >= 400:
                answer = openai_error(response.status, answer)
            call.answer = answer
            await self._sinks.complete(call, response.status)
            await send_json(send, response.status, answer, *self.response_headers(call, upstream))
            outcome.completed = True
            return
        upstream.breaker.record_success()
        pairs, lines = self.response_headers(call, upstream)
        start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [*_STREAM_HEADERS, *pairs],
        }
        if lines:
            start[RAW_HEADERS] = lines
        await send(start)
        await self._pump_stream(call, upstream, response, send, outcome)

    async def _pump_stream(
        self,
        call: CallContext,
        upstream: Upstream,
        response: UpstreamResponse,
        send: Send,
        outcome: Outcome,
    ) -> None:
        """Pass SSE events on, through the call's filters, until the upstream ends or fails."""
        framer = SSEFramer()
        filters = call.filters
        in_filters = False
        try:
            async for chunk in response.iter_chunks():
                events = framer.feed(chunk)
                if b'"prompt_tokens"' in events:
                    events = _take_usage(events, call.hide_usage_chunk, outcome)
                if filters and events:
                    in_filters = True
                    events = await run_filters(filters, events, last=False)
                    in_filters = False
                if events:
                    call.note_delivered(events)
                    await send({"type": "http.response.body", "body": events, "more_body": True})
            call.upstream_ended = time.perf_counter()
            tail = framer.finish()
            if filters:
                in_filters = True
                tail = await run_filters(filters, tail, last=True)
                in_filters = False
            # The stream's end goes out only once its entry is durable.
            call.note_delivered(tail)
            note_usage(call, outcome.usage)
            await self._sinks.complete(call, 200)
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            outcome.completed = True
        except GatewayError as exc:
            if in_filters:
                outcome.refused_by_filter = True
                log.info("an answer filter ended stream %s: %s", call.event.request_id, exc.code)
            else:
                upstream.breaker.record_failure()
                self._metrics.error(upstream.name, "mid_stream")
                log.warning("upstream %s failed mid-stream: %s", upstream.name, exc.message)
            outcome.status = exc.status
            call.event.error_type = exc.code
            held = b"" if in_filters else await _release_held(call)
            await send({"type": "http.response.body", "body": held + sse_error_event(exc)})
        finally:
            await response.close()


async def _release_held(call: CallContext) -> bytes:
    """What the filters still hold when the upstream failed mid-stream (text a guard held
    back to scan it), scanned and released before the error event; nothing if a filter
    refuses it."""
    if not call.filters:
        return b""
    try:
        held = await run_filters(call.filters, b"", last=True)
    except GatewayError:
        return b""
    call.note_delivered(held)
    return held


def openai_error(status: int, body: bytes) -> bytes:
    """An upstream's error answer in OpenAI's error shape (vLLM's own 404 is not)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        return body
    detail = document.get("detail") if isinstance(document, dict) else None
    if not isinstance(detail, str):
        detail = body[:200].decode("utf-8", "replace").strip() or "no detail"
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    message = f"The upstream answered {status}: {detail}"
    return error_body(message, kind, f"upstream_{status}")


def note_usage(call: CallContext, usage: Usage | None) -> None:
    if usage is not None:
        call.event.prompt_tokens = usage.prompt_tokens
        call.event.completion_tokens = usage.completion_tokens
        call.event.cached_tokens = usage.cached_tokens


def _take_usage(events: bytes, hide_usage_chunk: bool, outcome: Outcome) -> bytes:
    """Note the usage an event carries; drop a usage-only chunk the client did not ask for."""
    kept = []
    for event in events.split(b"\n\n"):
        found = usage_of_event(event)
        if found is not None:
            outcome.usage, usage_only = found
            if usage_only and hide_usage_chunk:
                continue
        kept.append(event)
    return b"\n\n".join(kept)

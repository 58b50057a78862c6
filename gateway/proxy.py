"""Forwarding one checked OpenAI request to an upstream and its answer back to the client.

:class:`Forwarder` tries upstreams chosen by :class:`UpstreamPool` until one answers.
Retries happen only while nothing has reached the client. Streams are passed on event
by event; if the upstream fails after the first byte, the stream ends with an error
event. A client that goes away closes the upstream connection at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.asgi import (
    RAW_HEADERS,
    DisconnectGuard,
    Receive,
    Send,
    send_json,
)
from gateway.config import Settings
from gateway.errors import (
    GatewayError,
    NoHealthyUpstream,
    UpstreamFailed,
    sse_error_event,
)
from gateway.sse import SSEFramer
from gateway.transport import UpstreamResponse, UpstreamTransport
from gateway.upstreams import Upstream, UpstreamPool
from gateway.usage import Usage, usage_of_body, usage_of_event

if TYPE_CHECKING:
    from gateway.audit_trail import CallRecord
    from gateway.watermark_check import AnswerCheck

log = logging.getLogger("bastion.proxy")

# Non-streamed answers that take longer than this are watched for a client going away.
WATCH_DISCONNECT_AFTER_S = 0.05

_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True)
class ProxyRequest:
    path: str
    body: bytes
    model: str
    stream: bool
    request_id: str
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Added to the answer (e.g. ``x-ratelimit-*``)."""
    header_lines: bytes = b""
    """Added to the answer as lines written out (gateway.asgi.RAW_HEADERS)."""
    hide_usage_chunk: bool = False
    """The gateway asked for usage in a stream the client did not: drop that chunk."""
    watermark: AnswerCheck | None = None
    """Score the answer for the watermark (None: watermarks off, or no tokenizer)."""
    audit: CallRecord | None = None
    """Completed (durably) before the answer's last byte goes out (None: audit off)."""


@dataclass(slots=True)
class Outcome:
    """What became of a forwarded request, for accounting and the audit record."""

    status: int = 0
    upstream: str | None = None
    usage: Usage | None = None
    completed: bool = False
    client_gone: bool = False


@dataclass(slots=True)
class Attempts:
    """The upstreams tried for one request and the last failure seen."""

    tried: set[Upstream] = field(default_factory=set)
    failure: GatewayError | None = None

    def failed(self, upstream: Upstream, failure: GatewayError) -> None:
        upstream.breaker.record_failure()
        self.failure = failure
        log.warning("upstream %s failed: %s", upstream.name, failure.message)


class Forwarder:
    """Sends a checked request to the pool's upstreams, with retries before the first byte."""

    def __init__(self, settings: Settings, pool: UpstreamPool, transport: UpstreamTransport):
        self._pool = pool
        self._transport = transport
        self._max_attempts = settings.retry.max_attempts
        self._expose_upstream = settings.server.expose_upstream_header

    async def open(
        self, request: ProxyRequest, attempts: Attempts
    ) -> tuple[Upstream, UpstreamResponse]:
        """An upstream's response whose status is below 500, or the last failure raised."""
        while len(attempts.tried) < self._max_attempts:
            upstream = self._pool.choose(request.model, frozenset(attempts.tried))
            if upstream is None:
                break
            attempts.tried.add(upstream)
            headers = {
                "content-type": "application/json",
                "accept": "text/event-stream" if request.stream else "application/json",
                "x-request-id": request.request_id,
                **upstream.request_headers,
            }
            try:
                response = await self._transport.send(
                    "POST", upstream.base_url + request.path, headers, request.body
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
                attempts.failed(upstream, UpstreamFailed(f"The upstream answered {status}."))
                continue
            return upstream, response
        if attempts.failure is None:
            raise NoHealthyUpstream(f"No healthy upstream serves the model '{request.model}'.")
        raise attempts.failure

    def response_headers(
        self, request: ProxyRequest, upstream: Upstream
    ) -> list[tuple[bytes, bytes]]:
        if self._expose_upstream:
            return [*request.response_headers, (b"x-bastion-upstream", upstream.name.encode())]
        return request.response_headers

    async def respond(self, request: ProxyRequest, send: Send, receive: Receive) -> Outcome:
        """Answer the client; if it goes away first, the upstream request is closed."""
        outcome = Outcome()
        watch_after_s = 0.0 if request.stream else WATCH_DISCONNECT_AFTER_S
        async with DisconnectGuard(receive, watch_after_s) as guard:
            if request.stream:
                await self._respond_stream(request, send, outcome)
            else:
                await self._respond_whole(request, send, outcome)
        if guard.client_gone:
            outcome.client_gone = True
            log.info("client went away; upstream request %s closed", request.request_id)
        return outcome

    async def _respond_whole(self, request: ProxyRequest, send: Send, outcome: Outcome) -> None:
        # Reading the body may still fail; nothing reached the client, so try again.
        attempts = Attempts()
        while True:
            upstream, response = await self.open(request, attempts)
            try:
                body = await response.read()
            except GatewayError as exc:
                attempts.failed(upstream, exc)
                continue
            except asyncio.CancelledError:
                upstream.breaker.release()
                raise
            upstream.breaker.record_success()
            break
        outcome.status, outcome.upstream = response.status, upstream.name
        outcome.usage = usage_of_body(body) if response.status == 200 else None
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            *self.response_headers(request, upstream),
        ]
        verdict = None
        if request.watermark is not None and response.status == 200:
            found = await request.watermark.headers_for_body(body)
            headers += found
            verdict = found[0][1] if found else None
        if request.audit is not None:
            usage = outcome.usage
            await request.audit.complete(
                response.status,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                watermark=verdict,
                answer=body,
            )
        start = {"type": "http.response.start", "status": response.status, "headers": headers}
        if request.header_lines:
            start[RAW_HEADERS] = request.header_lines
        await send(start)
        await send({"type": "http.response.body", "body": body})
        outcome.completed = True

    async def _respond_stream(self, request: ProxyRequest, send: Send, outcome: Outcome) -> None:
        upstream, response = await self.open(request, Attempts())
        outcome.status, outcome.upstream = response.status, upstream.name
        if response.status != 200 or "text/event-stream" not in response.content_type:
            # An upstream refusal of a stream request (400, 404...) comes as plain JSON.
            body = await response.read()
            upstream.breaker.record_success()
            if request.audit is not None:
                await request.audit.complete(
                    response.status,
                    prompt_tokens=None,
                    completion_tokens=None,
                    watermark=None,
                    answer=body,
                )
            await send_json(
                send,
                response.status,
                body,
                self.response_headers(request, upstream),
                request.header_lines,
            )
            outcome.completed = True
            return
        upstream.breaker.record_success()
        start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [*_STREAM_HEADERS, *self.response_headers(request, upstream)],
        }
        if request.header_lines:
            start[RAW_HEADERS] = request.header_lines
        await send(start)
        await _pump_stream(request, upstream, response, send, outcome)


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


async def _pump_stream(
    request: ProxyRequest,
    upstream: Upstream,
    response: UpstreamResponse,
    send: Send,
    outcome: Outcome,
) -> None:
    """Pass SSE events on until the upstream ends or fails."""
    framer = SSEFramer()
    # Watermark verdict: a comment event inserted before "data: [DONE]" (or at the end).
    watermark = request.watermark.stream() if request.watermark is not None else None
    audit = request.audit
    try:
        async for chunk in response.iter_chunks():
            events = framer.feed(chunk)
            if b'"prompt_tokens"' in events:
                events = _take_usage(events, request.hide_usage_chunk, outcome)
            if watermark is not None:
                events = await watermark.feed(events)
            if events:
                if audit is not None:
                    audit.note_delivered(events)
                await send({"type": "http.response.body", "body": events, "more_body": True})
        tail = framer.finish()
        if watermark is not None:
            tail = await watermark.feed(tail) + await watermark.close()
        if audit is not None:
            # The stream's end goes out only once its entry is durable.
            audit.note_delivered(tail)
            usage = outcome.usage
            await audit.complete(
                200,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                watermark=watermark.verdict if watermark is not None else None,
            )
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        outcome.completed = True
    except GatewayError as exc:
        upstream.breaker.record_failure()
        outcome.status = exc.status
        log.warning("upstream %s failed mid-stream: %s", upstream.name, exc.message)
        await send({"type": "http.response.body", "body": sse_error_event(exc)})
    finally:
        await response.close()

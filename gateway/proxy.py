"""Forwarding one OpenAI request to an upstream and its answer back to the client.

Each endpoint is a pure ASGI app (:class:`ProxyEndpoint`). For a request it reads the
body under the size cap, checks it, resolves the model (canaries included), then tries
upstreams chosen by :class:`UpstreamPool` until one answers. Retries happen only while
nothing has reached the client. Streams are passed on event by event; if the upstream
fails after the first byte, the stream ends with an error event. A client that goes
away closes the upstream connection at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import orjson

from gateway.asgi import (
    DisconnectGuard,
    Receive,
    Scope,
    Send,
    read_body,
    request_id_of,
    send_json,
)
from gateway.config import Settings
from gateway.errors import (
    GatewayError,
    NoHealthyUpstream,
    UpstreamFailed,
    sse_error_event,
)
from gateway.schemas import _Body, parse_body
from gateway.sse import SSEFramer
from gateway.transport import UpstreamResponse, UpstreamTransport
from gateway.upstreams import Upstream, UpstreamPool

log = logging.getLogger("bastion.proxy")

_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    path: str
    body: bytes
    model: str
    stream: bool
    request_id: str


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

    def response_headers(self, upstream: Upstream) -> list[tuple[bytes, bytes]]:
        if self._expose_upstream:
            return [(b"x-bastion-upstream", upstream.name.encode())]
        return []

    async def respond(self, request: ProxyRequest, send: Send, receive: Receive) -> None:
        """Answer the client; if it goes away first, the upstream request is closed."""
        async with DisconnectGuard(receive) as guard:
            if request.stream:
                await self._respond_stream(request, send)
            else:
                await self._respond_whole(request, send)
        if guard.client_gone:
            log.info("client went away; upstream request %s closed", request.request_id)

    async def _respond_whole(self, request: ProxyRequest, send: Send) -> None:
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
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            *self.response_headers(upstream),
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _respond_stream(self, request: ProxyRequest, send: Send) -> None:
        upstream, response = await self.open(request, Attempts())
        if response.status != 200 or "text/event-stream" not in response.content_type:
            # An upstream refusal of a stream request (400, 404...) comes as plain JSON.
            body = await response.read()
            upstream.breaker.record_success()
            await send_json(send, response.status, body, self.response_headers(upstream))
            return
        upstream.breaker.record_success()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_STREAM_HEADERS, *self.response_headers(upstream)],
            }
        )
        await _pump_stream(upstream, response, send)


async def _pump_stream(upstream: Upstream, response: UpstreamResponse, send: Send) -> None:
    """Pass SSE events on until the upstream ends or fails."""
    framer = SSEFramer()
    try:
        async for chunk in response.iter_chunks():
            events = framer.feed(chunk)
            if events:
                await send({"type": "http.response.body", "body": events, "more_body": True})
        await send({"type": "http.response.body", "body": framer.finish(), "more_body": False})
    except GatewayError as exc:
        upstream.breaker.record_failure()
        log.warning("upstream %s failed mid-stream: %s", upstream.name, exc.message)
        await send({"type": "http.response.body", "body": sse_error_event(exc)})
    finally:
        await response.close()


class ProxyEndpoint:
    """The ASGI app behind one OpenAI route, e.g. ``POST /v1/chat/completions``."""

    def __init__(
        self,
        path: str,
        schema: type[_Body],
        forwarder: Forwarder,
        pool: UpstreamPool,
        max_body_bytes: int,
        streams: bool,
    ) -> None:
        self._path = path
        self._schema = schema
        self._forwarder = forwarder
        self._pool = pool
        self._max_body_bytes = max_body_bytes
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(scope, receive, self._max_body_bytes)
        body = parse_body(raw, self._schema)
        requested = body["model"]
        model = self._pool.resolve_model(requested)
        if model != requested:
            body["model"] = model
            raw = orjson.dumps(body)
        request = ProxyRequest(
            path=self._path,
            body=raw,
            model=model,
            stream=self._streams and body.get("stream") is True,
            request_id=request_id_of(scope),
        )
        await self._forwarder.respond(request, send, receive)

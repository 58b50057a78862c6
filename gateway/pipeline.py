"""The request path's seams: a call context, request checks, answer filters, event sinks.

A feature joins the model call path by implementing one of these, never by adding an
argument and an ``if`` to the endpoint or the forwarder:

- a :class:`RequestCheck` may refuse a call (raise a :class:`~gateway.errors.GatewayError`)
  or change the body before it is forwarded (restriction, watermark opt-out, model
  resolution, admission, the input guards);
- an :class:`AnswerFilter` sees the answer, whole or as it streams, and decides what is
  released (the watermark verdict, the output guards, PII restore); an
  :class:`AnswerFilterSource` makes one per call, or None when it has nothing to do;
- an :class:`EventSink` receives the finished request's :class:`RequestEvent` (metrics,
  logs, shipping, anomaly features) and must never block; a :class:`DurableSink` (the
  audit trail) is awaited, and the answer's last byte goes out only once it returned.

One :class:`CallContext` per model call carries what was asked, who asked, what was
decided and what was delivered; its ``event`` is the request event the sinks receive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from gateway.asgi import Scope
from gateway.rbac import Principal
from gateway.usage import Usage
from monitors.request_event import RequestEvent

log = logging.getLogger("bastion.pipeline")

Settlement = Callable[[Usage | None], Awaitable[None]]
"""Given the call's real usage once it ended (None: not reported, keep the estimate;
``request_checks.NO_USAGE`` when the call was refused and generated nothing)."""


@dataclass(slots=True)
class CallContext:
    """One model call on its way through the gateway."""

    route: str
    scope: Scope
    principal: Principal
    event: RequestEvent
    raw: bytes
    """The body as received."""
    request: dict[str, Any]
    """The body as parsed, never changed (what the caller asked, for the audit)."""
    body: dict[str, Any] = field(default_factory=dict)
    """The body as it will be forwarded; checks change it only through :meth:`change`."""
    stream: bool = False
    started: float = field(default_factory=time.perf_counter)
    changes: dict[str, Any] = field(default_factory=dict)
    """Top-level body fields a check replaced (the body sent upstream is re-encoded)."""
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Added to the answer (``x-bastion-guard``...). Filters of a whole answer may add to
    it; a stream's headers are sent before its first event."""
    header_blocks: list[HeaderBlock] = field(default_factory=list)
    """Fixed sets of headers (``x-ratelimit-*``) the wire boundary writes as it can."""
    hide_usage_chunk: bool = False
    """The gateway asked for usage in a stream the client did not: drop that chunk."""
    settlements: list[Settlement] = field(default_factory=list)
    """What checks reserved: settled with the real usage, or given back on a refusal."""
    filters: list[AnswerFilter] = field(default_factory=list)
    """This call's answer filters, in order."""
    state: dict[str, Any] = field(default_factory=dict)
    """What a check leaves for a filter of the same call (e.g. the guards' PII vault)."""
    delivered: list[bytes] = field(default_factory=list)
    """Stream events as released to the client, in order."""
    answer: bytes | None = None
    """A whole answer's body as released to the client."""
    first_byte: float | None = None
    upstream_started: float | None = None
    upstream_ended: float | None = None
    recorded: bool = False

    def __post_init__(self) -> None:
        if not self.body:
            self.body = self.request

    def change(self, name: str, value: Any) -> None:
        """Replace a top-level body field in what is forwarded (and what checks see)."""
        if self.body is self.request:
            self.body = dict(self.request)  # the request as asked stays as it was
        self.body[name] = value
        self.changes[name] = value

    def forward_body(self) -> bytes:
        """The bytes sent upstream: as received, unless a check changed the body."""
        if not self.changes:
            return self.raw
        return orjson.dumps(self.body)

    def add_header(self, name: bytes, value: bytes) -> None:
        self.response_headers.append((name, value))

    def note_delivered(self, data: bytes) -> None:
        """``data`` is on its way to the client (a stream's events)."""
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
        if data:
            self.delivered.append(data)

    async def settle(self, usage: Usage | None) -> None:
        """Settle what the checks reserved, once (see :data:`Settlement`)."""
        settlements, self.settlements = self.settlements, []
        for settle in settlements:
            await settle(usage)


class HeaderBlock(Protocol):
    """A fixed set of response headers, in the two forms a server may take."""

    def headers(self) -> list[tuple[bytes, bytes]]: ...

    def header_lines(self) -> bytes:
        """``name: value\\r\\n`` each (gateway.asgi.RAW_HEADERS)."""
        ...


class RequestCheck(Protocol):
    """Runs before forwarding, in configured order; may refuse or change the body."""

    async def check(self, call: CallContext) -> None:
        """Raise a GatewayError to refuse; ``call.change(...)`` to rewrite the body;
        append to ``call.settlements`` what must be settled or given back."""
        ...


class AnswerFilter(Protocol):
    """Sees one call's answer and decides what is released, in order.

    For a stream, ``feed`` gets whole SSE events (each ending with a blank line) as they
    arrive and returns the bytes to send now (it may hold some back); ``close`` returns
    what it still holds once the upstream ended. For a whole answer, ``feed`` gets the
    body once and ``close`` follows. Raising a GatewayError refuses the answer: a whole
    answer becomes that error, a stream ends with an SSE error event and no ``[DONE]``.
    Filters see only successful answers (status 200; a stream's events).
    """

    async def feed(self, data: bytes) -> bytes: ...

    async def close(self) -> bytes: ...


class AnswerFilterSource(Protocol):
    """Makes the filter of one call, or None when it has nothing to do for it."""

    def for_call(self, call: CallContext) -> AnswerFilter | None: ...


class EventSink(Protocol):
    """Receives each finished request's event; must return at once (queue, never wait)."""

    name: str

    def offer(self, event: RequestEvent) -> None: ...


class DurableSink(Protocol):
    """Awaited before the answer's last byte: raise a GatewayError when it cannot record."""

    async def complete(self, call: CallContext) -> None: ...


async def run_filters(filters: Sequence[AnswerFilter], data: bytes, last: bool) -> bytes:
    """``data`` through every filter in order; ``last``: the answer ended, close them.

    A filter's closing bytes go through the filters after it."""
    for answer_filter in filters:
        data = await answer_filter.feed(data) if data else b""
        if last:
            data += await answer_filter.close()
    return data


class CallSinks:
    """The fan-out after each request: durable sinks awaited, the others offered the event.

    A non-blocking sink that raises is logged and counted, never allowed to fail the call.
    """

    def __init__(
        self,
        durable: Sequence[DurableSink] = (),
        sinks: Sequence[EventSink] = (),
        on_sink_error: Callable[[str], None] | None = None,
    ) -> None:
        self.durable = list(durable)
        self.sinks = list(sinks)
        self._on_sink_error = on_sink_error

    def add(self, sink: EventSink) -> None:
        self.sinks.append(sink)

    async def complete(self, call: CallContext, status: int) -> None:
        """The call ended with ``status``: finish its event, record it (once)."""
        if call.recorded:
            return
        call.recorded = True
        finish_event(call, status)
        for durable in self.durable:
            await durable.complete(call)
        self.publish(call.event)

    def publish(self, event: RequestEvent) -> None:
        for sink in self.sinks:
            try:
                sink.offer(event)
            except Exception:  # a monitor's bug must not fail a call that succeeded
                log.exception("event sink %s failed", sink.name)
                if self._on_sink_error is not None:
                    self._on_sink_error(sink.name)


def finish_event(call: CallContext, status: int) -> None:
    """Fill the call's event with how it ended and its timings."""
    event = call.event
    now = time.perf_counter()
    event.status = status
    event.duration_s = now - call.started
    if call.first_byte is not None:
        event.ttft_s = call.first_byte - call.started
    elif call.answer is not None:
        event.ttft_s = event.duration_s
    if call.upstream_started is not None:
        event.queue_wait_s = call.upstream_started - call.started
        event.upstream_s = (call.upstream_ended or now) - call.upstream_started
    if call.answer is not None:
        event.bytes_out = len(call.answer)
    elif call.delivered:
        event.bytes_out = sum(len(part) for part in call.delivered)

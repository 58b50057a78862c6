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

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.asgi import Scope
from gateway.rbac import Principal
from monitors.request_event import RequestEvent


@dataclass(slots=True)
class CallContext:
    """One model call on its way through the gateway."""

    route: str
    scope: Scope
    principal: Principal
    event: RequestEvent
    raw: bytes
    """The body as received."""
    body: dict[str, Any]
    """The parsed body; checks change it only through :meth:`change`."""
    stream: bool = False
    started: float = field(default_factory=time.perf_counter)
    changes: dict[str, Any] = field(default_factory=dict)
    """Top-level body fields a check replaced (the body sent upstream is re-encoded)."""
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Added to the answer (``x-ratelimit-*``, ``x-bastion-guard``...). Filters of a whole
    answer may add to it; a stream's headers are sent before its first event."""
    header_lines: bytes = b""
    """Headers written out where the server takes them so (gateway.asgi.RAW_HEADERS)."""
    hide_usage_chunk: bool = False
    """The gateway asked for usage in a stream the client did not: drop that chunk."""
    releases: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """What checks reserved, given back when the call is refused after them."""
    state: dict[str, Any] = field(default_factory=dict)
    """What a check leaves for a filter of the same call (e.g. the guards' PII vault)."""
    delivered: list[bytes] = field(default_factory=list)
    """Stream events as released to the client, in order."""
    answer: bytes | None = None
    """A whole answer's body as released to the client."""
    first_byte: float | None = None
    upstream_started: float | None = None
    recorded: bool = False

    def change(self, name: str, value: Any) -> None:
        """Replace a top-level body field in what is forwarded (and what checks see)."""
        self.body[name] = value
        self.changes[name] = value

    def forward_body(self) -> bytes:
        """The bytes sent upstream: as received, unless a check changed the body."""
        if not self.changes:
            return self.raw
        import orjson

        return orjson.dumps(self.body)

    def add_header(self, name: bytes, value: bytes) -> None:
        self.response_headers.append((name, value))


class RequestCheck(Protocol):
    """Runs before forwarding, in configured order; may refuse or change the body."""

    async def check(self, call: CallContext) -> None:
        """Raise a GatewayError to refuse; ``call.change(...)`` to rewrite the body;
        append to ``call.releases`` what must be given back if a later step refuses."""
        ...


class AnswerFilter(Protocol):
    """Sees one call's answer and decides what is released, in order.

    For a stream, ``feed`` gets whole SSE events (each ending with a blank line) as they
    arrive and returns the bytes to send now (it may hold some back); ``close`` returns
    what it still holds once the upstream ended. For a whole answer, ``feed`` gets the
    body once and ``close`` follows. Raising a GatewayError refuses the answer: a whole
    answer becomes that error, a stream ends with an SSE error event and no ``[DONE]``.
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

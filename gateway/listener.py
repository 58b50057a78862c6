"""The listener's HTTP protocol: uvicorn's httptools protocol with coalesced writes.

uvicorn writes a response's status line and headers with one ``transport.write`` and its
body with another. On uvloop each write is a ``send`` system call at once, and on a TLS
connection also a TLS record of its own: measured on this project's 2-core machine with a
fixed 700-byte request and a 600-byte answer, one write per answer costs 12 µs of CPU
over plain HTTP and 33 µs over TLS, two writes 24 and 45 µs. :class:`CoalescedWrites`
holds what is written during one turn of the event loop and hands it to the transport
as one write at the end of the turn, so a whole answer (headers and body, or a stream's
last chunk and its terminator) leaves in one segment and one TLS record. Nothing is
reordered and nothing waits longer than the current turn; a close flushes first.

:class:`ListenerProtocol` is what ``bastion serve`` runs with httptools, TLS or not. On
a TLS connection it also adds the ASGI TLS extension (see :mod:`gateway.tls`) to every
request's scope, computed once per connection.

It also bounds a request's head (request line and headers), which httptools would
otherwise gather without limit, a header value growing by concatenation until it ends: a
head over ``max_head_bytes`` (uvicorn's ``h11_max_incomplete_event_size``, which
``bastion serve`` sets from ``server.max_header_bytes``) is answered 431 in OpenAI's
error shape and the connection is closed (after reading and dropping, for up to
``LINGER_S``, what the client still sends, so that it can read the answer). A complete
head is measured exactly; one still arriving is refused once the reads since its first
one exceed the limit, so a connection holds at most the limit and one read (256 KiB on
uvloop) of an unfinished head.

A head must also arrive in time: ``HEAD_TIMEOUT_S`` from a new connection, or from the
first read of a head that one read did not complete (uvicorn times out only the idle
time between requests). A late head gets 408 and the connection is closed; a new
connection that sent nothing at all is closed without an answer. Heads that arrive in
one read, nearly all of them, never start the timer.

A body must arrive within ``body_timeout_s`` of the end of its head (nginx's
``client_body_timeout``, 30 s by default; ``BASTION_SERVER__BODY_TIMEOUT_S``): else 408
(when the app has not answered yet; the app's ``receive`` then sees a disconnect) and the
connection is closed, lingering as after a 431. A connection trickling one byte every few
seconds is no longer held open for ever. Bodies that arrive in the head's read never
start the timer.

A request must carry exactly one ``Host`` header (RFC 9112 section 3.2; HTTP/1.0 may
omit it): a missing or repeated one gets 400.

The copied parts (``data_received``, ``on_headers_complete``, the response start) follow
one uvicorn version (gateway/uvicorn_pin.py): at import, uvicorn's originals are compared
with the fingerprints of that version, and a mismatch stops start-up with a message
instead of running a copy of code that changed underneath it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import types
from typing import Any

import httptools
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gateway.asgi import RAW_HEADERS, raw_header_pairs
from gateway.errors import error_body
from gateway.tls import connection_tls
from gateway.uvicorn_pin import check_uvicorn

check_uvicorn()  # before anything below runs copied or re-bound uvicorn code

log = logging.getLogger("gateway.listener")

# What a request's head may take when the server's config does not say (nginx allows four
# 8 KiB header lines, Envoy 60 KiB, Node.js 16 KiB): room for large cookies or tokens.
DEFAULT_MAX_HEAD_BYTES = 64 * 1024

# After a 431, how long what the client still sends is read and dropped before the close.
LINGER_S = 2.0
# How long a request head may take to arrive (nginx's client_header_timeout: 60 s).
HEAD_TIMEOUT_S = 60.0

# How long a request body may take to arrive after its head (nginx's client_body_timeout
# is 60 s; an LLM request's body is a few kilobytes to a few megabytes).
BODY_TIMEOUT_S = 30.0
BODY_TIMEOUT_ENV = "BASTION_SERVER__BODY_TIMEOUT_S"


def body_timeout_s() -> float:
    """``BASTION_SERVER__BODY_TIMEOUT_S`` (the configuration's ``server.body_timeout_s``, which
    ``bastion serve`` exports to its workers), else :data:`BODY_TIMEOUT_S`."""
    text = os.environ.get(BODY_TIMEOUT_ENV)
    try:
        value = float(text) if text else BODY_TIMEOUT_S
    except ValueError:
        return BODY_TIMEOUT_S
    return value if value > 0 else BODY_TIMEOUT_S


# Above this many bytes held, a write goes out at once: a producer that writes a lot in
# one turn must meet the transport's own flow control (pause_writing) in time.
FLUSH_ABOVE = 64 * 1024


class CoalescedWrites(asyncio.Transport):
    """A transport that joins the writes of one event-loop turn into one.

    Everything else is the wrapped transport's. ``close`` sends what is held first;
    ``abort`` drops it, as an abort drops the transport's own buffer.
    """

    __slots__ = ("_held", "_held_bytes", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None
        self._held_bytes = 0

    # The writes.
    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = held = []
            self._held_bytes = 0
            self._loop.call_soon(self.flush)
        held.append(bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes > FLUSH_ABOVE:
            self.flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what is held to the transport now (a no-op when nothing is)."""
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + (self._held_bytes if self._held else 0)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    # Everything else is the transport's.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


_SPECIAL_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def _translation_marking(forbidden: re.Pattern[bytes]) -> bytes:
    """A ``bytes.translate`` table sending each byte ``forbidden`` matches to NUL, every
    other byte to 1: one C pass over the headers instead of the regular expression's
    charset test per byte (a third of the time)."""
    return bytes(0 if forbidden.search(bytes([byte])) else 1 for byte in range(256))


# uvicorn's own expressions are single-byte classes, so marking byte by byte is the same
# test (tests/gateway/test_listener.py checks all 256 bytes).
NAME_MARKS = _translation_marking(HEADER_RE)
VALUE_MARKS = _translation_marking(HEADER_VALUE_RE)


_FRAMING_NAMES = (b"content-length", b"transfer-encoding", b"connection")


def check_raw_headers(block: bytes) -> None:
    """The framing of :data:`RAW_HEADERS` lines: whole lines, no blank one (the end of
    the headers). What the lines say is the app's word: the gateway makes them from
    numbers and fixed names (gateway.ratelimit), whose output its tests check against
    uvicorn's own header rules; checking each byte again here cost more than writing
    the six headers as pairs did."""
    if block[-2:] != b"\r\n" or block[:2] == b"\r\n" or b"\r\n\r\n" in block:
        raise RuntimeError("Invalid HTTP header lines.")


class _DefaultLines:
    """The server's default headers (Date, and HSTS on TLS) written out once per list.

    uvicorn builds a new default header list each second (the Date); the lines are made
    again only then. A list with a header that frames the body, or one uvicorn would
    refuse, is not cached (None): it goes through the per-header checks each time."""

    __slots__ = ("headers", "lines")

    def __init__(self) -> None:
        self.headers: object = None
        self.lines: bytes | None = None

    def of(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        if headers is not self.headers:
            self.lines = None
            try:
                pairs = [(name, value) for name, value in headers]
                names = b"".join(name for name, _ in pairs)
                if (
                    names.islower()
                    and not any(name in _FRAMING_NAMES for name, _ in pairs)
                    and b"\0" not in names.translate(NAME_MARKS)
                    and b"\0" not in b"".join(value for _, value in pairs).translate(VALUE_MARKS)
                ):
                    self.lines = b"".join(b"%s: %s\r\n" % pair for pair in pairs)
            except (TypeError, ValueError, AttributeError):
                self.lines = None
            self.headers = headers  # held, so no other list can take its id
        return self.lines


_DEFAULT_LINES = _DefaultLines()


class ListenerCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, with the response's start written for less.

    uvicorn checks each header name and value with a regular expression of its own: two
    searches per header, about a third of the CPU that one rate-limited answer's dozen
    headers cost. Here the names are checked together, and the values together, for
    the bytes the same expressions forbid; the server's default headers are written out
    once a second (:class:`_DefaultLines`); a :data:`RAW_HEADERS` block is written as it
    is, once its framing is checked. Everything else (lower-case names, Content-Length,
    Transfer-Encoding, Connection, chunking, HEAD, the errors raised) is uvicorn's, and
    ``tests/gateway/test_listener.py`` compares the bytes written with uvicorn's own.
    Anything but a plain response start (access log on, writes paused, a disconnected
    client, a second start) goes to uvicorn's ``send``, a raw block as header pairs.
    """

    async def send(self, message: Any) -> None:
        raw = message.get(RAW_HEADERS)
        if raw and not self.response_started:
            check_raw_headers(raw)  # before anything is written: uvicorn answers 500
        if (
            self.response_started
            or self.disconnected
            or self.access_log
            or self.flow.write_paused
            or message["type"] != "http.response.start"
        ):
            if raw and not self.response_started:
                pairs = [*message.get("headers", ()), *raw_header_pairs(raw)]
                message = {**message, "headers": pairs}
            await super().send(message)
            return
        self.response_started = True
        self.waiting_for_100_continue = False
        status_code = message["status"]
        names: list[bytes] = []
        values: list[bytes] = []
        content = [STATUS_LINE[status_code]]
        default_lines = _DEFAULT_LINES.of(self.default_headers)
        if default_lines is None:
            header_lists = (self.default_headers, message.get("headers", ()))
        else:
            content.append(default_lines)
            header_lists = (message.get("headers", ()),)
        has_connection_close = False
        for headers in header_lists:
            for name, value in headers:
                names.append(name)
                values.append(value)
                name = name.lower()
                if name in _SPECIAL_HEADERS:
                    if name == b"content-length":
                        if self.chunked_encoding is None:
                            self.expected_content_length = int(value.decode())
                            self.chunked_encoding = False
                    elif name == b"transfer-encoding":
                        if value.lower() == b"chunked":
                            self.expected_content_length = 0
                            self.chunked_encoding = True
                    else:
                        connection = [token.lower().strip() for token in value.split(b",")]
                        if b"close" in connection:
                            self.keep_alive = False
                            has_connection_close = True
                content += (name, b": ", value, b"\r\n")
        if b"\0" in b"".join(names).translate(NAME_MARKS):
            raise RuntimeError("Invalid HTTP header name.")
        if b"\0" in b"".join(values).translate(VALUE_MARKS):
            raise RuntimeError("Invalid HTTP header value.")
        if raw:
            content.append(raw)
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status_code not in (204, 304)
        ):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.transport.write(b"".join(content))


class RequestHeadTooLarge(Exception):
    """A complete request head over the limit (raised in the parser's callback)."""


class BadHost(Exception):
    """A request without its Host header, or with two (raised in the parser's callback)."""


def head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """A parsed head's size as it came: the target, and each header's ``name: value``
    line (the method and version, a few bytes, are left out)."""
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


class ListenerProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over :class:`CoalescedWrites`, with
    :class:`ListenerCycle` for each request, the ASGI TLS extension on TLS connections,
    and a bounded request head (431 above ``max_head_bytes``)."""

    _tls: dict[str, Any] | None = None
    max_head_bytes = DEFAULT_MAX_HEAD_BYTES
    # The head being read: whether one is (from the parser's message begin to its
    # headers complete), the length of the read it began in, and the bytes of the reads
    # after that one.
    _in_head = False
    _begin_read = 0
    _head_bytes = 0
    _read = 0
    _refused = False
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    body_timeout_s = BODY_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescedWrites(transport, self.loop))
        self._tls = connection_tls(transport)
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None:
            self.max_head_bytes = limit
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self.head_timed_out)
        self.body_timeout_s = body_timeout_s()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's, with the head's bytes counted and the 431.
        if self._refused:
            return  # the rest of a refused head: dropped unread
        self._unset_keepalive_if_required()
        read = self._read = len(data)
        if self._in_head:
            self._head_bytes += read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, RequestHeadTooLarge):
                self.refuse_head()
                return
            if isinstance(exc.__context__, BadHost):
                self.refuse(
                    400, b"Bad Request", "A request needs exactly one Host header.", "invalid_host"
                )
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head:  # a head that this read did not complete
            if self._head_bytes > self.max_head_bytes:
                self.refuse_head()  # still arriving, and over the limit already
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self.head_timed_out)
        elif self._body_timer is None and self.cycle is not None and self.cycle.more_body:
            # A body that this read did not complete: it has body_timeout_s to arrive.
            self._body_timer = self.loop.call_later(self.body_timeout_s, self.body_timed_out)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def body_timed_out(self) -> None:
        """The body did not arrive in body_timeout_s: 408 unless the app answered, close."""
        self._body_timer = None
        cycle = self.cycle
        if self._refused or self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        log.warning(
            "request body not complete in %g s: answered 408 and closed", self.body_timeout_s
        )
        # The app sees the client gone (its receive() returns http.disconnect) and anything
        # it still sends is dropped.
        cycle.disconnected = True
        cycle.message_event.set()
        if cycle.response_started:
            self.transport.close()
            return
        cycle.response_started = cycle.response_complete = True
        self.refuse(
            408,
            b"Request Timeout",
            "The request's body took too long to arrive.",
            "request_timeout",
        )

    def head_timed_out(self) -> None:
        """HEAD_TIMEOUT_S passed without a complete head: 408 if one had begun, then close."""
        self._head_timer = None
        if self._refused or self.transport.is_closing():
            return
        if self._in_head:
            log.warning(
                "request head not complete in %g s: answered 408 and closed", HEAD_TIMEOUT_S
            )
            self.write_error(
                408,
                b"Request Timeout",
                "The request's headers took too long to arrive.",
                "request_timeout",
            )
        self.transport.close()

    def refuse_head(self) -> None:
        """431 in OpenAI's error shape, then close.

        What the client still sends is read and dropped for up to LINGER_S, as nginx's
        lingering close does: closing with unread input would reset the connection, and a
        client still sending its head could lose the 431 before reading it."""
        limit = self.max_head_bytes
        log.warning("request head over %d bytes: answered 431 and closed", limit)
        self.refuse(
            431,
            b"Request Header Fields Too Large",
            f"The request's headers exceed the limit of {limit} bytes.",
            "request_headers_too_large",
        )

    def refuse(self, status: int, reason: bytes, message: str, code: str) -> None:
        """An error answer, then a lingering close: what the client still sends is
        dropped unread until the close, LINGER_S later."""
        self._in_head = False
        self._refused = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.write_error(status, reason, message, code)
        self.loop.call_later(LINGER_S, self.transport.close)

    def write_error(self, status: int, reason: bytes, message: str, code: str) -> None:
        """An answer in OpenAI's error shape, with the server's default headers, that
        closes the connection."""
        body = error_body(message, "invalid_request_error", code)
        content = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._begin_read = self._read
        self._head_bytes = 0
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls, RAW_HEADERS: {}}  # type: ignore[dict-item]
        else:
            self.scope["extensions"] = {RAW_HEADERS: {}}  # type: ignore[dict-item]

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        # The head is at most the read it began in and the reads since: measured exactly
        # only when those could hold more than the limit.
        limit = self.max_head_bytes
        could_be_over = self._head_bytes + self._begin_read > limit
        if could_be_over and head_size(self.url, self.headers) > limit:
            raise RequestHeadTooLarge
        hosts = [name for name, _ in self.headers].count(b"host")
        if hosts != 1 and (hosts > 1 or self.parser.get_http_version() != "1.0"):
            raise BadHost
        self._start_cycle()

    # uvicorn's own on_headers_complete, run with ListenerCycle where it names
    # RequestResponseCycle: the same code, building our cycle. (Changing a built cycle's
    # __class__ instead defeats CPython's attribute caches for the whole request: it
    # cost more than the faster response start saved.)
    _start_cycle = types.FunctionType(
        HttpToolsProtocol.on_headers_complete.__code__,
        {**vars(httptools_impl), "RequestResponseCycle": ListenerCycle},
        "on_headers_complete",
    )

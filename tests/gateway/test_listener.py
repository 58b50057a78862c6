"""gateway/listener.py: writes of one event-loop turn leave as one, in order, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import httptools
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, HttpToolsProtocol
from uvicorn.server import ServerState

from gateway import listener
from gateway.asgi import RAW_HEADERS, raw_header_pairs
from gateway.listener import (
    DEFAULT_MAX_HEAD_BYTES,
    FLUSH_ABOVE,
    NAME_MARKS,
    VALUE_MARKS,
    CoalescedWrites,
    ListenerCycle,
    ListenerProtocol,
    _DefaultLines,
    head_size,
)


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what it is given, and the calls made on it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.calls: list[str] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append("write")
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def get_write_buffer_size(self) -> int:
        return 0


async def next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_turn_leave_as_one_write_at_its_end() -> None:
    inner = RecordingTransport()
    outer = CoalescedWrites(inner, asyncio.get_running_loop())
    outer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    outer.write(memoryview(b"body"))
    outer.writelines([b"-", bytearray(b"more")])
    assert inner.writes == []
    assert outer.get_write_buffer_size() == 19 + 4 + 1 + 4
    await next_turn()
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody-more"]
    outer.write(b"next")
    await next_turn()
    assert inner.writes[1:] == [b"next"]
    await next_turn()
    assert len(inner.writes) == 2  # nothing is written twice


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    inner = RecordingTransport()
    outer = CoalescedWrites(inner, loop)
    outer.write(b"last bytes")
    outer.close()
    assert inner.calls == ["write", "close"]
    assert inner.writes == [b"last bytes"]
    await next_turn()
    assert inner.writes == [b"last bytes"]

    inner = RecordingTransport()
    outer = CoalescedWrites(inner, loop)
    outer.write(b"never sent")
    outer.abort()
    await next_turn()
    assert inner.calls == ["abort"]


async def test_a_large_write_goes_out_at_once_to_meet_flow_control() -> None:
    inner = RecordingTransport()
    outer = CoalescedWrites(inner, asyncio.get_running_loop())
    outer.write(b"a" * 10)
    outer.write(b"b" * FLUSH_ABOVE)
    assert inner.writes == [b"a" * 10 + b"b" * FLUSH_ABOVE]
    outer.write(b"c")
    await next_turn()
    assert inner.writes[1:] == [b"c"]


async def test_nothing_is_written_to_a_transport_that_is_closing() -> None:
    inner = RecordingTransport()
    outer = CoalescedWrites(inner, asyncio.get_running_loop())
    outer.write(b"late")
    inner.closing = True  # the peer went away during the turn
    await next_turn()
    assert inner.writes == []
    assert outer.is_closing()


async def test_reading_control_and_extra_info_are_the_transports() -> None:
    inner = RecordingTransport()
    outer = CoalescedWrites(inner, asyncio.get_running_loop())
    outer.pause_reading()
    outer.resume_reading()
    assert inner.calls == ["pause_reading", "resume_reading"]
    assert outer.get_extra_info("peername") == ("127.0.0.1", 50000)
    assert outer.get_extra_info("ssl_object") is None


# --- the protocol, as uvicorn runs it --------------------------------------------------


async def whole_answer(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-length", b"12"), (b"x-a", b"1")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


async def streamed_answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for part in (b"one", b"two", b"three"):
        await asyncio.sleep(0.001)  # waiting for the upstream, as the proxy does
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def serve_one(app: Any, request: bytes) -> RecordingTransport:
    config = uvicorn.Config(app, lifespan="off", log_level="error", http=ListenerProtocol)
    config.load()
    loop = asyncio.get_running_loop()
    protocol = ListenerProtocol(config, ServerState(), {}, loop)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(100):
        await asyncio.sleep(0.002)
        if not protocol.cycle or protocol.cycle.response_complete:
            break
    await next_turn()
    protocol.connection_lost(None)
    return transport


def parse_response(data: bytes) -> tuple[int, bytes]:
    body = bytearray()

    class Sink:
        def on_body(self, chunk: bytes) -> None:
            body.extend(chunk)

    parser = httptools.HttpResponseParser(Sink())
    parser.feed_data(data)
    return parser.get_status_code(), bytes(body)


async def test_a_whole_answer_leaves_in_one_write() -> None:
    transport = await serve_one(whole_answer, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(transport.writes) == 1
    assert parse_response(transport.writes[0]) == (200, b'{"ok": true}')
    assert b"x-a: 1\r\n" in transport.writes[0]


async def test_a_stream_keeps_its_order_and_its_last_chunk_carries_the_terminator() -> None:
    transport = await serve_one(streamed_answer, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(b"".join(transport.writes)) == (200, b"onetwothree")
    # Headers go with nothing else (the first chunk comes a turn later); the last chunk
    # and the chunked terminator leave together.
    assert transport.writes[-1] == b"5\r\nthree\r\n0\r\n\r\n"


async def test_a_malformed_request_gets_its_400_before_the_close() -> None:
    transport = await serve_one(whole_answer, b"\x00\x01 garbage\r\n\r\n")
    assert transport.calls[:2] == ["write", "close"]
    assert parse_response(transport.writes[0])[0] == 400


@contextlib.contextmanager
def served_for_real(app: Any) -> Iterator[int]:
    """uvicorn with the listener protocol on a free loopback port, in a thread: the port."""
    import threading

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_level="error",
        http="gateway.listener:ListenerProtocol",
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.02)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        with contextlib.suppress(RuntimeError):
            thread.join(10)


def test_served_for_real_over_a_socket() -> None:
    """uvicorn with the listener protocol, a real keep-alive socket, two requests."""
    with (
        served_for_real(whole_answer) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as conn,
    ):
        for _ in range(2):
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b'{"ok": true}'):
                chunk = conn.recv(65536)
                if not chunk:
                    pytest.fail(f"connection closed after {data!r}")
                data += chunk
            assert parse_response(data) == (200, b'{"ok": true}')


# --- the response's start, written as uvicorn writes it -------------------------------------


def answering(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if body:
            await send({"type": "http.response.body", "body": body[:3], "more_body": True})
        await send({"type": "http.response.body", "body": body[3:]})

    return app


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
DEFAULT_HEADERS = [
    (b"date", b"Mon, 23 Nov 2026 16:00:00 GMT"),
    (b"strict-transport-security", b"max-age=60; includeSubDomains"),
]
RESPONSE_STARTS = {
    "content-length": (
        GET,
        200,
        [(b"Content-Type", b"application/json"), (b"content-length", b"5")],
    ),
    "many headers": (
        GET,
        200,
        [(b"content-length", b"5"), *[(b"x-ratelimit-%d" % i, b"%d" % i) for i in range(12)]],
    ),
    "chunked by default": (GET, 200, [(b"x-a", b"1")]),
    "chunked by the app": (GET, 200, [(b"Transfer-Encoding", b"Chunked")]),
    "head": (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", 200, [(b"x-a", b"1")]),
    "204": (GET, 204, [(b"x-a", b"1")]),
    "connection close": (GET, 200, [(b"content-length", b"5"), (b"Connection", b"keep, Close")]),
    "http/1.0": (b"GET / HTTP/1.0\r\n\r\n", 200, [(b"content-length", b"5")]),
    "tab in a value": (GET, 200, [(b"content-length", b"5"), (b"x-a", b"a\tb")]),
    "bad name": (GET, 200, [(b"content-length", b"5"), (b"x a", b"1")]),
    "bad value": (GET, 200, [(b"content-length", b"5"), (b"x-a", b"1\r\nx-b: 2")]),
    "bad name, a separator": (GET, 200, [(b"content-length", b"5"), (b"x(a", b"1")]),
    "two content-lengths": (
        GET,
        200,
        [(b"content-length", b"5"), (b"x-a", b"1"), (b"Content-Length", b"7")],
    ),
    "content-length, then chunked": (
        GET,
        200,
        [(b"content-length", b"5"), (b"Transfer-Encoding", b"chunked")],
    ),
    "chunked, then content-length": (
        GET,
        200,
        [(b"Transfer-Encoding", b"chunked"), (b"content-length", b"5")],
    ),
    "headers as lists": (GET, 200, [[b"content-length", b"5"], [b"X-A", b"1"]]),
    "bad value, DEL": (GET, 200, [(b"content-length", b"5"), (b"x-a", b"1\x7f")]),
    "non-ASCII name (uvicorn lets it through)": (
        GET,
        200,
        [(b"content-length", b"5"), (b"x-\xe9", b"1")],
    ),
}


@pytest.mark.parametrize("byte", range(256))
def test_a_header_byte_is_refused_exactly_when_uvicorn_refuses_it(byte: int) -> None:
    for forbidden, marks in ((HEADER_RE, NAME_MARKS), (HEADER_VALUE_RE, VALUE_MARKS)):
        text = b"ab" + bytes([byte]) + b"cd"
        assert (b"\0" in text.translate(marks)) == (forbidden.search(text) is not None)


async def served_by(
    protocol_class: type[HttpToolsProtocol],
    app: Any,
    request: bytes,
    access_log: bool = False,
    default_headers: list[tuple[bytes, bytes]] = DEFAULT_HEADERS,
) -> tuple[bytes, list[str], Any]:
    config = uvicorn.Config(
        app, lifespan="off", log_level="critical", http=protocol_class, access_log=access_log
    )
    config.load()
    state = ServerState()
    state.default_headers = list(default_headers)
    protocol = protocol_class(config, state, {}, asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    cycle = protocol.cycle
    for _ in range(100):
        await asyncio.sleep(0.002)
        if transport.closing or (protocol.cycle and protocol.cycle.response_complete):
            break
    await next_turn()
    protocol.connection_lost(None)
    calls = [call for call in transport.calls if call != "write"]
    return b"".join(transport.writes), calls, cycle


@pytest.mark.parametrize("access_log", [False, True], ids=["", "access log on"])
@pytest.mark.parametrize("case", RESPONSE_STARTS)
async def test_the_response_start_is_written_as_uvicorn_writes_it(
    case: str, access_log: bool
) -> None:
    request, status, headers = RESPONSE_STARTS[case]
    app = answering(status, headers, b"" if status == 204 else b"hello")
    ours = await served_by(ListenerProtocol, app, request, access_log)
    theirs = await served_by(HttpToolsProtocol, app, request, access_log)
    assert type(ours[2]) is ListenerCycle
    assert type(theirs[2]) is not ListenerCycle
    assert ours[:2] == theirs[:2]
    if case.startswith("bad"):
        assert ours[0] == b"" and "close" in ours[1]  # nothing sent, the connection closed
    else:
        assert ours[0].startswith(b"HTTP/1.1 %d " % status)


async def test_an_answer_without_any_header_is_written_as_uvicorn_writes_it() -> None:
    app = answering(200, [], b"hello")
    ours = await served_by(ListenerProtocol, app, GET, default_headers=[])
    theirs = await served_by(HttpToolsProtocol, app, GET, default_headers=[])
    assert ours[:2] == theirs[:2]
    assert ours[0].startswith(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")


# --- header lines written out by the app (the RAW_HEADERS extension) -------------------------

RATE_LIMIT_LINES = (
    b"x-ratelimit-limit-requests: 10\r\nx-ratelimit-remaining-requests: 9\r\n"
    b"x-ratelimit-reset-requests: 100ms\r\nx-ratelimit-limit-tokens: 1000\r\n"
    b"x-ratelimit-remaining-tokens: 990\r\nx-ratelimit-reset-tokens: 1m0.6s\r\n"
)


def answering_with_lines(
    status: int, headers: list[tuple[bytes, bytes]], lines: bytes, body: bytes
) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert RAW_HEADERS in scope["extensions"]
        start = {"type": "http.response.start", "status": status, "headers": headers}
        await send({**start, RAW_HEADERS: lines})
        if body:  # in two parts, as answering() sends it
            await send({"type": "http.response.body", "body": body[:3], "more_body": True})
        await send({"type": "http.response.body", "body": body[3:]})

    return app


RAW_STARTS = {
    "after pairs": (GET, 200, [(b"content-type", b"application/json"), (b"content-length", b"5")]),
    "alone, chunked by default": (GET, 200, []),
    "head": (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", 200, [(b"x-a", b"1")]),
    "http/1.0": (b"GET / HTTP/1.0\r\n\r\n", 200, [(b"content-length", b"5")]),
    "one line": (GET, 200, [(b"content-length", b"5")]),
}


@pytest.mark.parametrize("access_log", [False, True], ids=["", "access log on"])
@pytest.mark.parametrize("case", RAW_STARTS)
async def test_header_lines_are_written_as_uvicorn_writes_the_same_headers(
    case: str, access_log: bool
) -> None:
    request, status, headers = RAW_STARTS[case]
    lines = b"x-a: b\r\n" if case == "one line" else RATE_LIMIT_LINES
    ours = await served_by(
        ListenerProtocol,
        answering_with_lines(status, headers, lines, b"hello"),
        request,
        access_log,
    )
    pairs = [*headers, *raw_header_pairs(lines)]
    theirs = await served_by(
        HttpToolsProtocol, answering(status, pairs, b"hello"), request, access_log
    )
    assert ours[:2] == theirs[:2]
    assert b"\r\nx-ratelimit-reset-tokens: 1m0.6s\r\n" in ours[0] or case == "one line"


@pytest.mark.parametrize("access_log", [False, True], ids=["", "access log on"])
@pytest.mark.parametrize(
    "lines",
    [b"x-a: 1", b"\r\nx-a: 1\r\n", b"x-a: 1\r\n\r\nHTTP/1.1 200 OK\r\n", b"\r\n"],
    ids=["no line end", "a blank line first", "a blank line inside", "only a blank line"],
)
async def test_header_lines_that_would_break_the_framing_get_a_500(
    lines: bytes, access_log: bool
) -> None:
    app = answering_with_lines(200, [(b"content-length", b"5")], lines, b"hello")
    written, _, _ = await served_by(ListenerProtocol, app, GET, access_log)
    assert written.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"x-a: 1" not in written and b"hello" not in written


def test_raw_header_pairs_reads_lines_back() -> None:
    assert raw_header_pairs(b"a: 1\r\nb: x: y\r\n") == [(b"a", b"1"), (b"b", b"x: y")]
    assert raw_header_pairs(b"") == []


# --- the server's default headers, written out once per list ---------------------------------

DEFAULT_LISTS = {
    "date and hsts": DEFAULT_HEADERS,
    "an upper-case name": [(b"Server", b"bastion"), *DEFAULT_HEADERS],
    "connection: close": [*DEFAULT_HEADERS, (b"connection", b"close")],
    "a content-length": [(b"content-length", b"5"), *DEFAULT_HEADERS],
    "a bad name": [(b"x a", b"1")],
    "a bad value": [(b"x-a", b"1\r\n")],
    "as lists": [[b"date", b"Mon, 23 Nov 2026 16:00:00 GMT"]],
    "none": [],
}


@pytest.mark.parametrize("case", DEFAULT_LISTS)
async def test_default_headers_are_written_as_uvicorn_writes_them(case: str) -> None:
    app = answering(200, [(b"content-length", b"5"), (b"x-b", b"2")], b"hello")
    defaults: list[Any] = DEFAULT_LISTS[case]
    ours = await served_by(ListenerProtocol, app, GET, default_headers=defaults)
    theirs = await served_by(HttpToolsProtocol, app, GET, default_headers=defaults)
    assert ours[:2] == theirs[:2]


async def test_a_new_default_list_each_second_is_written_anew() -> None:
    app = answering(200, [(b"content-length", b"5")], b"hello")
    for second in range(3):
        defaults = [(b"date", b"Mon, 23 Nov 2026 16:00:0%d GMT" % second)]
        ours = await served_by(ListenerProtocol, app, GET, default_headers=defaults)
        theirs = await served_by(HttpToolsProtocol, app, GET, default_headers=defaults)
        assert ours[:2] == theirs[:2]
        assert b"\r\ndate: Mon, 23 Nov 2026 16:00:0%d GMT\r\n" % second in ours[0]


def test_default_lines_are_made_once_per_list_and_not_for_lists_to_check_each_time() -> None:
    lines = _DefaultLines()
    defaults = [(b"date", b"d"), (b"strict-transport-security", b"max-age=1")]
    made = lines.of(defaults)
    assert made == b"date: d\r\nstrict-transport-security: max-age=1\r\n"
    assert lines.of(defaults) is made
    assert lines.of([(b"date", b"e")]) == b"date: e\r\n"
    for unchecked in ([(b"Date", b"d")], [(b"connection", b"close")], [(b"x a", b"1")], []):
        assert lines.of(unchecked) is None


# --- the request head's limit ------------------------------------------------------------


class Recorder:
    """An app that answers 200 with the size of the body it read, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"%d" % size
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def serve_reads(
    app: Any, reads: list[bytes], max_head: int | None
) -> tuple[RecordingTransport, int]:
    """Feed the reads one by one, as the socket would deliver them, until the protocol
    closes the connection; also how many bytes it had been given when it first wrote."""
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="error",
        http=ListenerProtocol,
        h11_max_incomplete_event_size=max_head,
    )
    config.load()
    protocol = ListenerProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    given = 0
    given_at_first_write = -1
    for read in reads:
        if transport.closing:
            break
        protocol.data_received(read)
        given += len(read)
        await next_turn()
        if transport.writes and given_at_first_write < 0:
            given_at_first_write = given
    for _ in range(100):
        await asyncio.sleep(0.002)
        if not protocol.cycle or protocol.cycle.response_complete:
            break
    await next_turn()
    transport.given = given  # type: ignore[attr-defined]
    protocol.connection_lost(None)
    return transport, given_at_first_write


@pytest.fixture
def short_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener, "LINGER_S", 0.0)


def padded_head(size: int) -> bytes:
    """A GET whose head measures exactly `size` (gateway.listener.head_size)."""
    head = [(b"host", b"x")]
    pad = size - head_size(b"/", [*head, (b"x-pad", b"")])
    head.append((b"x-pad", b"p" * pad))
    assert head_size(b"/", head) == size
    return b"GET / HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in head) + b"\r\n"


def answers(transport: RecordingTransport) -> list[tuple[int, bytes]]:
    data = b"".join(transport.writes)
    found = []
    while data:
        end = data.index(b"\r\n\r\n") + 4
        length = int(re.search(rb"content-length: (\d+)", data[:end]).group(1))  # type: ignore[union-attr]
        found.append((int(data[9:12]), data[end : end + length]))
        data = data[end + length :]
    return found


@pytest.mark.usefixtures("short_linger")
async def test_a_head_over_the_limit_gets_431_in_openai_shape_and_a_close() -> None:
    app = Recorder()
    transport, _ = await serve_reads(app, [padded_head(1025)], max_head=1024)
    assert transport.calls[:2] == ["write", "close"]
    [(status, body)] = answers(transport)
    assert status == 431
    assert json.loads(body) == {
        "error": {
            "message": "The request's headers exceed the limit of 1024 bytes.",
            "type": "invalid_request_error",
            "code": "request_headers_too_large",
            "param": None,
        }
    }
    assert b"connection: close\r\n" in transport.writes[0]
    assert app.calls == 0


async def test_a_head_at_the_limit_is_served() -> None:
    app = Recorder()
    transport, _ = await serve_reads(app, [padded_head(1024)], max_head=1024)
    assert answers(transport) == [(200, b"0")]
    assert app.calls == 1


@pytest.mark.parametrize("split", [1, 20, 600, 1000])
async def test_a_head_over_the_limit_split_over_reads_is_refused(split: int) -> None:
    head = padded_head(1025)
    transport, _ = await serve_reads(Recorder(), [head[:split], head[split:]], max_head=1024)
    assert [status for status, _ in answers(transport)] == [431]


async def test_a_head_still_arriving_is_refused_within_one_read_of_the_limit() -> None:
    """...and what follows is read and dropped (the client may still be sending when the
    431 goes out: closing on unread input would reset the connection under its read)."""
    start = b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: "
    reads = [start] + [b"a" * 100] * 2_000 + [b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"]
    app = Recorder()
    transport, answered_at = await serve_reads(app, reads, max_head=4096)
    assert answered_at <= len(start) + 4096 + 100  # the limit, and the read it began in
    assert [status for status, _ in answers(transport)] == [431]  # nothing more: dropped
    assert app.calls == 0
    assert transport.given == sum(map(len, reads))  # type: ignore[attr-defined]  # not closed


@pytest.mark.usefixtures("short_linger")
async def test_the_connection_closes_after_the_linger() -> None:
    transport, _ = await serve_reads(Recorder(), [padded_head(2048)], max_head=1024)
    assert transport.calls[:2] == ["write", "close"]


async def test_many_small_headers_count_too() -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(2000))
    transport, _ = await serve_reads(Recorder(), [head + b"\r\n"], max_head=8192)
    assert [status for status, _ in answers(transport)] == [431]


@pytest.mark.parametrize("read_size", [100, 4096, 300_000])
async def test_bodies_do_not_count_against_the_head(read_size: int) -> None:
    """Two requests on one connection, each a small head and a body far over the limit,
    in reads of every size: one read holding both, or heads and bodies mixed."""
    body = b"b" * 200_000
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    data = request * 2
    reads = [data[i : i + read_size] for i in range(0, len(data), read_size)]
    app = Recorder()
    transport, _ = await serve_reads(app, reads, max_head=1024)
    assert answers(transport) == [(200, b"200000"), (200, b"200000")]
    assert app.calls == 2


@pytest.mark.usefixtures("short_linger")
async def test_the_default_limit_applies_without_a_setting() -> None:
    transport, _ = await serve_reads(Recorder(), [padded_head(DEFAULT_MAX_HEAD_BYTES)], None)
    assert [status for status, _ in answers(transport)] == [200]
    transport, _ = await serve_reads(Recorder(), [padded_head(DEFAULT_MAX_HEAD_BYTES + 1)], None)
    assert [status for status, _ in answers(transport)] == [431]


# --- the request head's deadline -------------------------------------------------------------


def listening(app: Any, max_head: int | None = None) -> tuple[ListenerProtocol, RecordingTransport]:
    config = uvicorn.Config(
        app, lifespan="off", log_level="error", http=ListenerProtocol,
        h11_max_incomplete_event_size=max_head,
    )  # fmt: skip
    config.load()
    protocol = ListenerProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def test_a_head_that_stops_arriving_gets_408_and_a_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a new connection, and on a kept-alive one whose next head stalls."""
    monkeypatch.setattr(listener, "HEAD_TIMEOUT_S", 0.05)
    for served_first in (0, 1):
        app = Recorder()
        protocol, transport = listening(app)
        for _ in range(served_first):
            protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.1)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await asyncio.sleep(0.2)
        assert transport.closing
        *served, (status, body) = answers(transport)
        assert served == [(200, b"0")] * served_first
        assert status == 408
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert app.calls == served_first
        protocol.connection_lost(None)


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listener, "HEAD_TIMEOUT_S", 0.05)
    protocol, transport = listening(Recorder())
    await asyncio.sleep(0.2)
    assert transport.calls == ["close"]
    protocol.connection_lost(None)


async def test_the_deadline_is_for_the_head_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head in one read, or in two within the deadline, is served; a body and an answer
    that take longer than the deadline are not cut."""
    monkeypatch.setattr(listener, "HEAD_TIMEOUT_S", 0.1)

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.3)
        await Recorder()(scope, receive, send)

    protocol, transport = listening(slow)
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\n")
    await asyncio.sleep(0.05)
    protocol.data_received(b"Content-Length: 4\r\n\r\n")
    assert protocol._head_timer is None  # complete: the deadline is off
    await asyncio.sleep(0.15)
    protocol.data_received(b"body")
    await asyncio.sleep(0.5)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a head in one read
    assert protocol._head_timer is None
    await asyncio.sleep(0.5)
    assert answers(transport) == [(200, b"4"), (200, b"0")]
    assert not transport.closing
    protocol.connection_lost(None)


def test_a_late_head_gets_408_over_a_real_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener, "HEAD_TIMEOUT_S", 0.2)
    with (
        served_for_real(whole_answer) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as conn,
    ):
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
    assert b'"request_timeout"' in data


# --- Host header, body deadline, the pinned uvicorn (issue 14 items 6 and 14, issue 15) ------


@pytest.mark.usefixtures("short_linger")
@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n",
    ],
)
async def test_a_missing_or_repeated_host_gets_400_and_a_close(head: bytes) -> None:
    app = Recorder()
    transport, _ = await serve_reads(app, [head], max_head=65536)
    [(status, body)] = answers(transport)
    assert status == 400
    assert json.loads(body)["error"] == {
        "message": "A request needs exactly one Host header.",
        "type": "invalid_request_error",
        "code": "invalid_host",
        "param": None,
    }
    assert transport.calls[:2] == ["write", "close"]
    assert app.calls == 0


async def test_http_1_0_may_omit_host() -> None:
    transport, _ = await serve_reads(Recorder(), [b"GET / HTTP/1.0\r\n\r\n"], max_head=65536)
    assert answers(transport) == [(200, b"0")]


def _reading_app(seen: list[str]) -> Any:
    """Reads the body with gateway.asgi.read_body and answers its length."""
    from gateway.asgi import ClientDisconnected, read_body

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            body = await read_body(scope, receive, 1 << 20)
        except ClientDisconnected:
            seen.append("disconnected")
            return
        seen.append("read")
        answer = str(len(body)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(answer)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    return app


def test_a_body_trickling_past_the_deadline_gets_408_over_a_real_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow client (a byte every 0.1 s) is cut at the deadline: 408, then the close."""
    import time

    monkeypatch.setenv(listener.BODY_TIMEOUT_ENV, "0.5")
    seen: list[str] = []
    with (
        served_for_real(_reading_app(seen)) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as conn,
    ):
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        data = b""
        conn.settimeout(0.1)
        while time.monotonic() - started < 5:
            with contextlib.suppress(OSError):
                conn.sendall(b"x")
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
    assert b'"request_timeout"' in data and b"connection: close\r\n" in data
    assert 0.4 < took < 4, took  # the deadline, then the lingering close (LINGER_S)
    assert seen == ["disconnected"]


def test_a_body_in_pieces_within_the_deadline_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(listener.BODY_TIMEOUT_ENV, "1.0")
    seen: list[str] = []
    with (
        served_for_real(_reading_app(seen)) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as conn,
    ):
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
        for byte in b"abc":
            threading_sleep(0.1)
            conn.sendall(bytes([byte]))
        data = b""
        while not data.endswith(b"\r\n\r\n3"):
            data += conn.recv(65536)
        # Kept alive past the deadline: the timer stopped with the body.
        threading_sleep(1.2)
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
        data = b""
        while not data.endswith(b"\r\n\r\n2"):
            data += conn.recv(65536)
    assert seen == ["read", "read"]


def threading_sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def test_the_copied_uvicorn_code_is_the_pinned_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import uvicorn_pin

    uvicorn_pin.check_uvicorn()  # as at the listener's import
    assert uvicorn_pin.uvicorn_fingerprints() == uvicorn_pin.UVICORN_FINGERPRINTS
    changed = {**uvicorn_pin.UVICORN_FINGERPRINTS, "RequestResponseCycle.send": "0" * 16}
    monkeypatch.setattr(uvicorn_pin, "UVICORN_FINGERPRINTS", changed)
    with pytest.raises(uvicorn_pin.UvicornMismatch, match=r"RequestResponseCycle\.send differ"):
        uvicorn_pin.check_uvicorn()

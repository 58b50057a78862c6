"""SSE framing: only whole events are passed on."""

from __future__ import annotations

from gateway.sse import SSEFramer


def test_events_split_across_chunks_are_released_whole() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: a\n\nda") == b"data: a\n\n"
    assert framer.feed(b"ta: b\n") == b""
    assert framer.feed(b"\ndata: c\n\ndata: d") == b"data: b\n\ndata: c\n\n"
    assert framer.finish() == b"data: d\n\n"
    assert framer.finish() == b""


def test_crlf_events() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: a\r\n\r\ndata: b\r\n") == b"data: a\r\n\r\n"
    assert framer.feed(b"\r\n") == b"data: b\r\n\r\n"


def test_nothing_complete_yet_and_blank_tail() -> None:
    framer = SSEFramer()
    assert framer.feed(b'data: {"x"') == b""
    assert framer.feed(b": 1}") == b""
    framer = SSEFramer()
    assert framer.feed(b"data: a\n\n\n") == b"data: a\n\n\n"
    assert framer.finish() == b""

"""Bodies and streams of odd shapes: the guards scan what is text and never raise a 500."""

from __future__ import annotations

import random

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.guards.output_filter import OutputGuard
from gateway.guards.settings import GuardSettings
from tests.guards.calls import DONE, chat, chunk, make_call, stream_text
from tests.guards.test_input_guard import guard

ODD_BODIES = [
    {"model": "m", "messages": "not a list"},
    {"model": "m", "messages": [1, None, "x", {"role": 5, "content": {"a": 1}}]},
    {"model": "m", "messages": [{"role": "user", "content": [1, {"type": "text", "text": 2}]}]},
    {"model": "m", "messages": [{"role": "assistant", "tool_calls": [1, {"function": 2}]}]},
    {"model": "m", "messages": [{"role": "user", "content": None}]},
    {"model": 3, "prompt": None},
    {"model": "m", "input": [None, {"a": 1}]},
    {},
]


@pytest.mark.parametrize("body", ODD_BODIES)
async def test_odd_bodies_pass_through_untouched(body: dict) -> None:  # type: ignore[type-arg]
    call = make_call(body)
    await guard().check(call)
    assert call.changes == {}
    assert dict(call.response_headers)[b"x-bastion-guard"] == b"pass"


ODD_EVENTS = [
    b"data: not json\n\n",
    b"data: [1, 2]\n\n",
    b'data: {"choices": "x"}\n\n',
    b'data: {"choices": [1, {"delta": 5}, {"delta": {"content": 7}}]}\n\n',
    b'data: {"choices": [{"index": "a", "delta": {"content": "hi "}}]}\n\n',
    b'data: {"choices": [{"delta": {"tool_calls": [1, {"function": {"arguments": 3}}]}}]}\n\n',
    b'data: {"error": {"message": "upstream says no"}}\n\n',
    b"event: ping\n\n",
    b": comment\n\n",
    b"\r\n\r\n",
]


async def test_odd_stream_events_keep_their_order_and_raise_nothing() -> None:
    rng = random.Random(11)
    for _ in range(50):
        call = make_call(chat("hi jane@example.com"), stream=True)
        await guard().check(call)
        filter_ = OutputGuard(GuardSettings()).for_call(call)
        assert filter_ is not None
        events = [*rng.sample(ODD_EVENTS, 5), chunk("Hello [EMAIL_1] bye")]
        out = b""
        for event in events:
            out += await filter_.feed(event)
        out += await filter_.feed(chunk(finish="stop") + DONE) + await filter_.close()
        assert out.endswith(DONE)
        assert (
            "Hello jane@example.com bye"
            in stream_text(
                b"\n\n".join(e for e in out.split(b"\n\n") if e.startswith(b'data: {"id"'))
            )[0]
        )


async def test_odd_whole_answers() -> None:
    call = make_call(chat("hi"))
    await guard().check(call)
    for body in (b"[]", b'{"choices": [1, {"message": 2}, {"text": 5}]}', b"null"):
        filter_ = OutputGuard(GuardSettings()).for_call(call)
        try:
            out = await filter_.feed(body)  # type: ignore[union-attr]
        except GatewayError:  # pragma: no cover - would be a clean error, still not a 500
            continue
        assert orjson.loads(out) == orjson.loads(body)

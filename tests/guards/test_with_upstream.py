"""The guards around a real OpenAI-speaking upstream (the fixture server, a real process).

The request check's forwarded body goes to the upstream over HTTP; its answer (whole, or
its SSE stream as the bytes arrive, framed by the gateway's SSEFramer) goes through the
answer filter. The upstream echoes the last user message, so it answers with the
placeholders it was sent: the client must get its own values back, the upstream must
never have seen them.
"""

from __future__ import annotations

import httpx
import orjson
import pytest

from gateway.guards.output_filter import OutputGuard
from gateway.guards.settings import GuardSettings
from gateway.sse import SSEFramer
from tests.guards.calls import chat, make_call, stream_text
from tests.guards.test_input_guard import guard
from tests.support import ProcessPool
from tests.upstream_server import expected_text

MESSAGE = "I am jane@example.com, card 4111 1111 1111 1111, call +44 20 7946 0958 please"


@pytest.mark.parametrize("stream", [False, True])
async def test_round_trip_through_a_real_upstream(pool: ProcessPool, stream: bool) -> None:
    upstream = pool.upstream("guards-up", ["m"])
    settings = GuardSettings()
    call = make_call(chat(MESSAGE, stream=stream), stream=stream)
    await guard(settings).check(call)
    filter_ = OutputGuard(settings).for_call(call)
    assert filter_ is not None
    delivered = b""
    async with httpx.AsyncClient(base_url=upstream.url, timeout=10) as client:
        request = client.build_request(
            "POST",
            "/v1/chat/completions",
            content=call.forward_body(),
            headers={"content-type": "application/json"},
        )
        response = await client.send(request, stream=True)
        framer = SSEFramer()
        async for data in response.aiter_raw():
            if stream:
                events = framer.feed(data)
                if events:
                    delivered += await filter_.feed(events)
            else:
                delivered += data
        rest = framer.finish()
        if stream and rest:
            delivered += await filter_.feed(rest)
        else:
            delivered = await filter_.feed(delivered)
        delivered += await filter_.close()
        await response.aclose()
    seen = upstream.stats()["last_body"]
    forwarded = orjson.dumps(seen).decode()
    for value in ("jane@example.com", "4111 1111 1111 1111", "+44 20 7946 0958"):
        assert value not in forwarded
    assert "[EMAIL_1]" in forwarded and "[CREDIT_CARD_1]" in forwarded
    want = expected_text("guards-up", "m", MESSAGE)
    if stream:
        content, _, done = stream_text(delivered)
        assert done and content == want
    else:
        assert orjson.loads(delivered)["choices"][0]["message"]["content"] == want
    outputs = {v.scanner: v.action for v in call.event.guard_verdicts if v.stage == "output"}
    assert outputs == {
        "secrets": "pass",
        "pii_leak": "pass",
        "refusal": "pass",
        "json_validity": "pass",
    }

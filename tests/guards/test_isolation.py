"""100 concurrent callers with distinct personal data through the input and output guards.

Each caller's "model" answers from what was forwarded (placeholders only), after a
random delay so the calls interleave; nobody may receive another caller's value and the
forwarded bodies may hold no raw value.
"""

from __future__ import annotations

import asyncio
import random

import orjson

from gateway.guards.output_filter import OutputGuard
from gateway.guards.settings import GuardSettings
from tests.guards.calls import DONE, answer, chat, chunk, make_call, stream_text
from tests.guards.test_input_guard import guard

CALLERS = 100


def personal(n: int) -> tuple[str, str]:
    return f"user{n:03d}@example.com", f"+44 20 7946 {n:04d}"


async def test_100_concurrent_callers_never_see_each_others_values() -> None:
    settings = GuardSettings()
    inputs = guard(settings)
    outputs = OutputGuard(settings)
    forwarded: list[bytes] = []
    rng = random.Random(3)

    async def caller(n: int) -> tuple[int, str]:
        email, phone = personal(n)
        stream = n % 2 == 0
        call = make_call(
            chat(f"I am {email}, phone {phone}", stream=stream), stream=stream, key_id=f"key-{n}"
        )
        await inputs.check(call)
        body = call.forward_body()
        forwarded.append(body)
        prompt = orjson.loads(body)["messages"][0]["content"]
        await asyncio.sleep(rng.random() / 100)
        # The model repeats the placeholders it was given.
        placeholders = [w.strip(",") for w in prompt.split() if w.startswith("[")]
        reply = f"Noted {placeholders[0]} and {placeholders[1]}."
        filter_ = outputs.for_call(call)
        assert filter_ is not None
        if not stream:
            out = await filter_.feed(answer(reply))
            return n, orjson.loads(out)["choices"][0]["message"]["content"]
        out = b""
        for k in range(0, len(reply), 4):
            out += await filter_.feed(chunk(reply[k : k + 4]))
            await asyncio.sleep(0)
        out += await filter_.feed(chunk(finish="stop") + DONE) + await filter_.close()
        return n, stream_text(out)[0]

    results = await asyncio.gather(*(caller(n) for n in range(CALLERS)))
    for n, text in results:
        email, phone = personal(n)
        assert text == f"Noted {email} and {phone}.", n
    everyone = [v for n in range(CALLERS) for v in personal(n)]
    for body in forwarded:
        assert not any(value.encode() in body for value in everyone)
    assert len(forwarded) == CALLERS

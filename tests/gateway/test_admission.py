"""gateway/admission.py: what an allowed request adds to its answer, as pairs or as lines."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from gateway.admission import Admission
from gateway.config import Settings
from gateway.errors import RateLimited
from gateway.ratelimit import MemoryRateLimiter
from gateway.rbac import Principal

APP = Principal(key_id="k1", roles=frozenset({"app"}), subject_id=None, models=None, tier="gold")
BODY: dict[str, Any] = {"model": "m1", "messages": [{"role": "user", "content": "hello there"}]}


def admission(**rate_limits: Any) -> Admission:
    settings = Settings(
        upstreams=[{"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}],
        master_key=base64.b64encode(b"a" * 32).decode(),
        rate_limits={"requests_per_second": 1, "burst": 2, **rate_limits},
        priority={"tiers": {"gold": 5}},
    )
    return Admission(settings, MemoryRateLimiter(settings.rate_limits))


async def test_an_allowed_call_carries_one_block_of_rate_limit_headers() -> None:
    gate = admission()
    admitted = await gate.admit(APP, "m1", BODY)
    block = admitted.rate_headers
    assert block is not None and admitted.priority == 5
    # One object, two forms: the pairs are the lines taken apart (gateway.proxy writes
    # the lines where the server takes them, gateway.asgi.RAW_HEADERS, else the pairs).
    assert [name for name, _ in block.headers()][:2] == [
        b"x-ratelimit-limit-requests",
        b"x-ratelimit-remaining-requests",
    ]
    assert block.header_lines().startswith(
        b"x-ratelimit-limit-requests: 2\r\nx-ratelimit-remaining-requests: 1\r\n"
    )
    assert b"".join(b"%s: %s\r\n" % pair for pair in block.headers()) == block.header_lines()
    await gate.admit(APP, "m1", BODY)
    # A refusal's headers go with the error (pairs), whatever the server offers.
    with pytest.raises(RateLimited) as refused:
        await gate.admit(APP, "m1", BODY)
    assert (b"x-ratelimit-remaining-requests", b"0") in refused.value.headers()


async def test_no_rate_limit_headers_on_allowed_answers_when_set_so() -> None:
    gate = admission(response_headers="on_refusal")
    admitted = await gate.admit(APP, "m1", BODY)
    assert admitted.rate_headers is None

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


async def test_the_rate_limit_headers_come_as_lines_where_the_server_takes_them() -> None:
    gate = admission()
    as_pairs = await gate.admit(APP, "m1", BODY)
    as_lines = await gate.admit(APP, "m1", BODY, raw_headers=True)
    assert [name for name, _ in as_pairs.response_headers][:2] == [
        b"x-ratelimit-limit-requests",
        b"x-ratelimit-remaining-requests",
    ]
    assert as_pairs.header_lines == b""
    assert as_lines.response_headers == []
    assert as_lines.header_lines.startswith(
        b"x-ratelimit-limit-requests: 2\r\nx-ratelimit-remaining-requests: 0\r\n"
    )
    assert as_pairs.priority == as_lines.priority == 5
    # A refusal's headers go with the error (pairs), whatever the server offers.
    with pytest.raises(RateLimited) as refused:
        await gate.admit(APP, "m1", BODY, raw_headers=True)
    assert (b"x-ratelimit-remaining-requests", b"0") in refused.value.headers()


async def test_no_rate_limit_headers_on_allowed_answers_when_set_so() -> None:
    gate = admission(response_headers="on_refusal")
    admitted = await gate.admit(APP, "m1", BODY, raw_headers=True)
    assert admitted.response_headers == [] and admitted.header_lines == b""

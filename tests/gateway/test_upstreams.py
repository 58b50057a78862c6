"""The upstream pool: weighted choice among usable upstreams, exclusion, canaries."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from gateway.breaker import BreakerState
from gateway.config import Settings
from gateway.errors import ModelNotFound
from gateway.upstreams import UpstreamPool


def make_pool(**extra: Any) -> UpstreamPool:
    upstreams = extra.pop(
        "upstreams",
        [
            {"name": "a", "url": "http://a:1", "models": ["m", "m-v2"], "weight": 3},
            {"name": "b", "url": "http://b:1", "models": ["m"], "weight": 1},
            {"name": "c", "url": "http://c:1", "models": ["other"]},
        ],
    )
    settings = Settings(upstreams=upstreams, **extra)
    return UpstreamPool(settings, rng=random.Random(7))


def test_weighted_choice_follows_weights() -> None:
    pool = make_pool()
    counts = Counter(pool.choose("m").name for _ in range(4000))  # type: ignore[union-attr]
    assert set(counts) == {"a", "b"}
    assert 0.70 < counts["a"] / 4000 < 0.80


def test_routing_is_by_model() -> None:
    pool = make_pool()
    assert {pool.choose("other").name for _ in range(50)} == {"c"}  # type: ignore[union-attr]
    assert pool.choose("missing") is None


def test_excluded_unhealthy_and_open_upstreams_are_skipped() -> None:
    pool = make_pool()
    a, b, _ = pool.upstreams
    assert {pool.choose("m", frozenset({a})).name for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    b.healthy = False
    assert {pool.choose("m").name for _ in range(20)} == {"a"}  # type: ignore[union-attr]
    for _ in range(5):
        a.breaker.record_failure()
    assert a.breaker.state is BreakerState.OPEN
    assert pool.choose("m") is None
    assert pool.ready() == (False, {"m": False, "m-v2": False, "other": True})


def test_half_open_upstream_takes_one_probe_at_a_time() -> None:
    pool = make_pool(circuit_breaker={"failure_threshold": 1, "open_s": 0.000001})
    a, b, _ = pool.upstreams
    b.healthy = False
    a.breaker.record_failure()
    assert pool.choose("m") is a  # the probe
    assert pool.choose("m") is None  # no second probe while the first is out
    a.breaker.record_success()
    assert pool.choose("m") is a


def test_unknown_model_is_404() -> None:
    with pytest.raises(ModelNotFound):
        make_pool().resolve_model("gpt-5")


def test_canary_takes_its_share() -> None:
    pool = make_pool(canaries=[{"model": "m", "version": "m-v2", "share": 0.2}])
    counts = Counter(pool.resolve_model("m") for _ in range(5000))
    assert 0.17 < counts["m-v2"] / 5000 < 0.23
    assert pool.resolve_model("m-v2") == "m-v2"
    assert pool.resolve_model("other") == "other"


def test_api_key_becomes_upstream_authorization() -> None:
    pool = make_pool(
        upstreams=[{"name": "a", "url": "http://a:1", "models": ["m"], "api_key": "s3"}]
    )
    assert pool.upstreams[0].request_headers == {"authorization": "Bearer s3"}
    assert "s3" not in repr(pool.upstreams[0].settings)

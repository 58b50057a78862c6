"""In-process token buckets (with a fake clock), decisions and their headers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.config import ConfigError, RateLimitSettings, Settings
from gateway.ratelimit import (
    Limits,
    MemoryRateLimiter,
    RateDecision,
    RedisRateLimiter,
    build_rate_limiter,
    check_workers_rate_limits,
    format_reset,
)
from tests.support import free_port, run_bastion


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(
    rps: float = 2.0, burst: int | None = 3, tpm: int = 600, keep: int = 0
) -> tuple[MemoryRateLimiter, FakeClock]:
    """keep=0: idle keys are looked at on every call, whatever the table's size."""
    clock = FakeClock()
    settings = RateLimitSettings(requests_per_second=rps, burst=burst, tokens_per_minute=tpm)
    return MemoryRateLimiter(settings, clock=clock, keep=keep), clock


def test_limits_from_settings() -> None:
    limits = Limits.from_settings(RateLimitSettings(tokens_per_minute=6000))
    assert limits == Limits(
        request_capacity=10, request_rate=10.0, token_capacity=6000, token_rate=100.0
    )
    # burst defaults to requests_per_second, at least 1
    assert Limits.from_settings(RateLimitSettings(requests_per_second=0.5)).request_capacity == 1
    assert Limits.from_settings(RateLimitSettings(burst=7)).request_capacity == 7


async def test_burst_then_refused_then_refilled() -> None:
    rl, clock = limiter(rps=2.0, burst=3)
    decisions = [await rl.check("k", 0) for _ in range(3)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining_requests for d in decisions] == [2, 1, 0]
    assert decisions[-1].reset_requests_s == pytest.approx(1.5)

    refused = await rl.check("k", 0)
    assert not refused.allowed and not refused.degraded
    assert refused.retry_after_s == pytest.approx(0.5)

    clock.advance(0.25)
    assert not (await rl.check("k", 0)).allowed
    clock.advance(0.25)
    allowed = await rl.check("k", 0)
    assert allowed.allowed and allowed.retry_after_s == 0.0
    assert allowed.remaining_requests == 0


async def test_refill_is_capped_at_capacity() -> None:
    rl, clock = limiter(rps=2.0, burst=3, tpm=600)
    await rl.check("k", 600)
    clock.advance(3600)
    d = await rl.check("k", 0)
    assert d.remaining_requests == 2  # 3 (full, not 7200) minus this one
    assert d.remaining_tokens == 600
    assert d.reset_tokens_s == 0.0


async def test_keys_are_independent() -> None:
    rl, _ = limiter(burst=1)
    assert (await rl.check("a", 0)).allowed
    assert not (await rl.check("a", 0)).allowed
    assert (await rl.check("b", 0)).allowed


async def test_tokens_bucket() -> None:
    rl, clock = limiter(rps=100.0, burst=100, tpm=600)  # 10 tokens per second
    first = await rl.check("k", 400)
    assert first.allowed
    assert (first.limit_tokens, first.remaining_tokens) == (600, 200)
    assert first.reset_tokens_s == pytest.approx(40.0)

    refused = await rl.check("k", 250)
    assert not refused.allowed
    assert refused.remaining_tokens == 200
    assert refused.retry_after_s == pytest.approx(5.0)  # 50 tokens short at 10/s

    clock.advance(5.0)
    assert (await rl.check("k", 250)).allowed


async def test_refusal_takes_nothing_from_either_bucket() -> None:
    rl, _ = limiter(rps=1.0, burst=2, tpm=600)
    assert (await rl.check("k", 500)).allowed
    # tokens short: the request is not taken either
    for _ in range(5):
        refused = await rl.check("k", 200)
        assert not refused.allowed
        assert refused.remaining_requests == 1
        assert refused.remaining_tokens == 100
    # requests short (burst spent): no tokens are taken
    assert (await rl.check("k", 50)).allowed
    for _ in range(5):
        refused = await rl.check("k", 10)
        assert not refused.allowed
        assert refused.remaining_tokens == 50


async def test_estimate_larger_than_the_bucket_passes_when_full_and_goes_negative() -> None:
    rl, clock = limiter(rps=100.0, burst=100, tpm=600)
    big = await rl.check("k", 900)
    assert big.allowed
    assert big.remaining_tokens == 0
    assert big.reset_tokens_s == pytest.approx(90.0)  # from -300 to 600 at 10/s
    refused = await rl.check("k", 1)
    assert refused.retry_after_s == pytest.approx(30.1)
    clock.advance(30.1)
    assert (await rl.check("k", 1)).allowed


async def test_adjust_positive_creates_debt_that_is_paid_back() -> None:
    rl, clock = limiter(rps=100.0, burst=100, tpm=600)
    assert (await rl.check("k", 100)).allowed
    await rl.adjust("k", 700)  # used 800, not 100: tokens at -200
    refused = await rl.check("k", 0)
    assert not refused.allowed
    assert refused.remaining_tokens == 0
    assert refused.retry_after_s == pytest.approx(20.0)
    assert refused.reset_tokens_s == pytest.approx(80.0)
    clock.advance(20.0)
    assert (await rl.check("k", 0)).allowed
    assert not (await rl.check("k", 1)).allowed


async def test_adjust_negative_gives_back_up_to_capacity() -> None:
    rl, _ = limiter(rps=100.0, burst=100, tpm=600)
    assert (await rl.check("k", 500)).remaining_tokens == 100
    await rl.adjust("k", -300)
    assert (await rl.check("k", 0)).remaining_tokens == 400
    await rl.adjust("k", -10_000)
    assert (await rl.check("k", 0)).remaining_tokens == 600


async def test_adjust_on_an_unseen_key() -> None:
    rl, _ = limiter(rps=100.0, burst=100, tpm=600)
    await rl.adjust("gone", -50)  # giving back to a full bucket: nothing to store
    await rl.adjust("gone", 0)
    assert len(rl) == 0
    await rl.adjust("gone", 100)
    assert (await rl.check("gone", 0)).remaining_tokens == 500


async def test_idle_keys_are_evicted() -> None:
    rl, clock = limiter(rps=10.0, burst=10, tpm=600)
    for i in range(1000):
        await rl.check(f"key-{i}", 10)
    assert len(rl) >= 900  # none full yet: kept
    clock.advance(61.0)  # every bucket full again
    for _ in range(600):
        await rl.check("busy", 0)
        clock.advance(0.1)
    assert len(rl) <= 2
    # An evicted key starts full, as if it had been kept.
    assert (await rl.check("key-1", 0)).remaining_tokens == 600


async def test_up_to_keep_keys_nothing_is_evicted() -> None:
    rl, clock = limiter(rps=10.0, burst=10, tpm=600, keep=500)
    for i in range(1000):
        await rl.check(f"key-{i}", 10)
    clock.advance(61.0)  # every bucket full again
    for _ in range(600):
        await rl.check("busy", 0)
        clock.advance(0.1)
    assert 499 <= len(rl) <= 501  # evicted down to keep (two at a time), no further
    assert (await rl.check("key-1", 0)).remaining_tokens == 600


async def test_keys_in_debt_are_not_evicted() -> None:
    rl, clock = limiter(rps=10.0, burst=10, tpm=600)
    await rl.check("debtor", 0)
    await rl.adjust("debtor", 5000)
    clock.advance(61.0)
    for _ in range(100):
        await rl.check("busy", 0)
    assert not (await rl.check("debtor", 0)).allowed


async def test_concurrent_tasks_never_exceed_the_bucket() -> None:
    rps, burst = 200.0, 20
    rl = MemoryRateLimiter(RateLimitSettings(requests_per_second=rps, burst=burst))
    allowed = 0

    async def client(deadline: float) -> None:
        nonlocal allowed
        while time.monotonic() < deadline:
            if (await rl.check("shared", 1)).allowed:
                allowed += 1
            await asyncio.sleep(0)

    start = time.monotonic()
    await asyncio.gather(*(client(start + 0.4) for _ in range(50)))
    elapsed = time.monotonic() - start
    assert allowed <= burst + rps * elapsed + 1
    assert allowed >= burst + rps * 0.4 * 0.5  # the limiter let traffic through


# --- decisions and headers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (-1.0, "0s"),
        (0.02, "20ms"),
        (0.07, "70ms"),
        (0.0004, "1ms"),
        (0.999, "999ms"),
        (1.0, "1s"),
        (8.64, "8.64s"),
        (59.9999, "1m0s"),
        (360.0, "6m0s"),
        (90.5, "1m30.5s"),
        (3600.0, "1h0m0s"),
        (3725.25, "1h2m5.25s"),
    ],
)
def test_format_reset(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_the_headers_format_resets_and_levels_as_the_figures_say() -> None:
    limits = Limits(request_capacity=3, request_rate=2.0, token_capacity=600, token_rate=10.0)
    levels = [600 - i / 1_000 for i in range(0, 20_001)] + [600 - i for i in range(0, 6_000, 7)]
    levels += [600.0, 600 - 1e-9, 600 - 4e-6, 599.3, -0.5, -1e-12, 1e-12, 0.9999999999]
    # resets a hair above a whole millisecond (rounded down below a microsecond)
    levels += [600 - (ms + f) / 100 for ms in range(3) for f in (0.0004, 0.0006, 0.0009, 0.9991)]
    for level in levels:
        d = RateDecision(limits, True, min(3.0, level / 200), level, 0)
        headers = dict(d.headers())
        assert headers[b"x-ratelimit-reset-tokens"] == format_reset(d.reset_tokens_s).encode()
        assert headers[b"x-ratelimit-reset-requests"] == format_reset(d.reset_requests_s).encode()
        assert headers[b"x-ratelimit-remaining-tokens"] == b"%d" % d.remaining_tokens
        assert headers[b"x-ratelimit-remaining-requests"] == b"%d" % d.remaining_requests


LIMITS = Limits(request_capacity=10, request_rate=10.0, token_capacity=100_000, token_rate=1000.0)


def decision(
    allowed: bool = True, requests: float = 9.0, tokens: float = 99_400.0, need: float = 600
) -> RateDecision:
    return RateDecision(LIMITS, allowed, requests, tokens, need)


def test_a_decisions_figures() -> None:
    d = decision(requests=8.6, tokens=99_399.9999999999)
    assert (d.limit_requests, d.remaining_requests) == (10, 8)
    assert (d.limit_tokens, d.remaining_tokens) == (100_000, 99_400)  # float slack
    assert d.reset_requests_s == pytest.approx(0.14)
    assert d.reset_tokens_s == pytest.approx(0.6)
    assert d.retry_after_s == 0.0
    in_debt = decision(allowed=False, requests=0.5, tokens=-1000.0)
    assert in_debt.remaining_requests == in_debt.remaining_tokens == 0
    assert in_debt.retry_after_s == pytest.approx(1.6)  # 1600 tokens short at 1000/s
    assert decision(allowed=False, requests=0.25, tokens=1e6).retry_after_s == 0.075


def test_headers_when_allowed() -> None:
    assert decision().headers() == [
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-ratelimit-remaining-requests", b"9"),
        (b"x-ratelimit-reset-requests", b"100ms"),
        (b"x-ratelimit-limit-tokens", b"100000"),
        (b"x-ratelimit-remaining-tokens", b"99400"),
        (b"x-ratelimit-reset-tokens", b"600ms"),
    ]
    full = decision(requests=10.0, tokens=100_000.0).headers()
    assert full[2] == (b"x-ratelimit-reset-requests", b"0s")
    assert full[5] == (b"x-ratelimit-reset-tokens", b"0s")
    # Refilled within a microsecond: 0s, not 0ms.
    assert decision(tokens=100_000 - 1e-6).headers()[5] == (b"x-ratelimit-reset-tokens", b"0s")


@pytest.mark.parametrize(
    ("retry_after_s", "seconds", "ms"),
    [(0.0, b"1", b"1"), (0.2, b"1", b"200"), (1.0, b"1", b"1000"), (1.5, b"2", b"1500")],
)
def test_headers_when_refused(retry_after_s: float, seconds: bytes, ms: bytes) -> None:
    # tokens short of the 600 needed, at 1000 per second
    tokens = 600 - retry_after_s * 1000
    headers = dict(decision(allowed=False, tokens=tokens).headers())
    assert headers[b"retry-after"] == seconds
    assert headers[b"retry-after-ms"] == ms
    assert b"x-ratelimit-remaining-requests" in headers


async def test_headers_from_a_real_refusal() -> None:
    rl, _ = limiter(rps=100.0, burst=100, tpm=600)
    await rl.check("k", 600)
    headers = dict((await rl.check("k", 300)).headers())
    assert headers[b"x-ratelimit-remaining-tokens"] == b"0"
    assert headers[b"x-ratelimit-reset-tokens"] == b"1m0s"
    assert headers[b"retry-after"] == b"30"


async def test_build_rate_limiter() -> None:
    settings = RateLimitSettings()
    memory = build_rate_limiter(settings, None)
    assert isinstance(memory, MemoryRateLimiter)
    redis = build_rate_limiter(settings, "redis://127.0.0.1:6379/0")
    assert isinstance(redis, RedisRateLimiter)
    await memory.aclose()
    await redis.aclose()


@pytest.mark.parametrize("allowed", [True, False])
@pytest.mark.parametrize(
    ("requests", "tokens"),
    [(9.0, 99_400.0), (0.0, -5_000.0), (10.0, 100_000.0), (0.3, 12.5), (1e-7, 99_999.9999)],
)
def test_the_header_lines_are_the_headers_written_out_and_valid_http(
    allowed: bool, requests: float, tokens: float
) -> None:
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    d = decision(allowed=allowed, requests=requests, tokens=tokens)
    lines = d.header_lines()
    pairs = d.headers()[:6]  # retry-after* (refusals) are not among the lines
    assert lines == b"".join(b"%s: %s\r\n" % pair for pair in pairs)
    for name, value in pairs:
        assert name == name.lower() and HEADER_RE.search(name) is None
        assert value and HEADER_VALUE_RE.search(value) is None


def test_long_resets_in_the_header_lines() -> None:
    hours = RateDecision(Limits(10, 10 / 7200, 10**6, 10**6 / 60), True, 0.0, 0.0, 0)
    assert b"x-ratelimit-reset-requests: 2h0m0s\r\n" in hours.header_lines()
    assert b"x-ratelimit-reset-tokens: 1m0s\r\n" in hours.header_lines()


# --- in-memory limits and worker processes (issue 14, item 5) ---------------------------


def _settings(**overrides: object) -> Settings:
    return Settings(
        upstreams=[{"name": "a", "url": "http://127.0.0.1:9", "models": ["m"]}],
        **overrides,  # type: ignore[arg-type]
    )


def test_in_memory_limits_with_several_workers_are_refused() -> None:
    check_workers_rate_limits(_settings(), 1)
    check_workers_rate_limits(_settings(redis_url="redis://127.0.0.1:6379/0"), 4)
    check_workers_rate_limits(_settings(rate_limits={"enabled": False}), 4)
    with pytest.raises(ConfigError, match=r"2 times its limit.*BASTION_REDIS_URL"):
        check_workers_rate_limits(_settings(), 2)


def test_serve_with_two_workers_and_no_redis_stops_with_a_message(tmp_path: Path) -> None:
    config = {
        "upstreams": [{"name": "a", "url": "http://127.0.0.1:9", "models": ["m"]}],
        "dev": True,
        "database_url": f"sqlite:///{tmp_path / 'x.db'}",
        "server": {"workers": 2, "port": free_port()},
    }
    done = run_bastion(["serve"], config, tmp_path, timeout=30)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("bastion: configuration error: server.workers is 2"), done.stderr
    assert not (tmp_path / "x.db").exists()  # refused before anything was created


BACKEND_UP_PROBE = """
from prometheus_client import REGISTRY, generate_latest
from gateway.config import RateLimitSettings
from gateway.ratelimit import build_rate_limiter

build_rate_limiter(RateLimitSettings(), None)  # in memory
print(generate_latest(REGISTRY).decode())
"""


def test_backend_up_is_reported_only_for_redis() -> None:
    """Issue 14 item 14: the in-memory limiter has no backend to be down; the gauge read 0."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", BACKEND_UP_PROBE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    samples = [
        line for line in done.stdout.splitlines() if line.startswith("bastion_ratelimit_backend_up")
    ]
    assert samples == []

"""Redis-backed buckets against a real Redis server (BASTION_TEST_REDIS_URL).

The server is shared with other tests: each test works under its own random key prefix
and deletes only its own keys (never FLUSHALL or SCRIPT FLUSH).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

import gateway.ratelimit as ratelimit
from gateway.config import RateLimitSettings
from gateway.ratelimit import RedisRateLimiter
from gateway.redis_wire import encode_command

REDIS_URL = os.environ.get("BASTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await client.ping()
    except (aioredis.ConnectionError, OSError) as exc:
        await client.aclose()
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    prefix = f"bastion-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = [key async for key in redis_client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await redis_client.delete(*keys)


def settings(
    rps: float = 2.0, burst: int = 3, tpm: int = 600, mode: Literal["open", "closed"] = "open"
) -> RateLimitSettings:
    return RateLimitSettings(
        requests_per_second=rps, burst=burst, tokens_per_minute=tpm, redis_failure_mode=mode
    )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_prepared_evalsha_is_what_encode_command_writes() -> None:
    limiter = RedisRateLimiter.from_url(settings(rps=2.5, burst=3, tpm=6000), REDIS_URL)
    for op, key, cost, pending in [(b"check", "p:k", 40, 0), (b"adjust", "p:é" * 30, -7, 12)]:
        expected = encode_command(
            "EVALSHA", ratelimit._SCRIPT_SHA, 1, key, op, cost, 3, "2.5", 6000, "100.0", pending
        )
        assert limiter.command(op, key, cost, pending) == expected


async def test_our_client_and_redis_py_decide_alike(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    """The prepared EVALSHA (our client) and redis-py's evalsha run the same script."""
    ours = RedisRateLimiter.from_url(settings(tpm=600), REDIS_URL, prefix=prefix + "ours:")
    theirs = RedisRateLimiter(settings(tpm=600), redis_client, prefix=prefix + "theirs:")
    seen = []
    for limiter in (ours, theirs):
        decisions = [await limiter.check("k", 250) for _ in range(4)]
        await limiter.adjust("k", -100)
        await limiter.flush()
        decisions.append(await limiter.check("k", 10))
        seen.append([(d.allowed, d.remaining_requests, d.remaining_tokens) for d in decisions])
    await ours.aclose()
    assert seen[0] == seen[1]
    assert seen[0][:3] == [(True, 2, 350), (True, 1, 100), (False, 1, 100)]


async def test_buckets_in_redis(redis_client: aioredis.Redis, prefix: str) -> None:
    rl = RedisRateLimiter.from_url(settings(rps=2.0, burst=3, tpm=600), REDIS_URL, prefix=prefix)
    try:
        decisions = [await rl.check("k", 100) for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, True]
        assert [d.remaining_requests for d in decisions] == [2, 1, 0]
        assert [d.remaining_tokens for d in decisions] == [500, 400, 300]
        refused = await rl.check("k", 100)
        assert not refused.allowed and not refused.degraded
        assert 0.0 < refused.retry_after_s <= 0.5
        assert refused.remaining_tokens == 300  # the refusal took nothing

        await rl.adjust("k", 500)  # tokens at about -200: refused on tokens now
        await asyncio.sleep(0.5)
        in_debt = await rl.check("k", 0)
        assert not in_debt.allowed
        assert in_debt.retry_after_s == pytest.approx(20.0, abs=0.6)
        await rl.adjust("k", -10_000)  # given back, up to the capacity
        assert (await rl.check("k", 600)).allowed

        # Idle buckets expire once they would be full again: 60 s for the emptied tokens.
        ttl_ms = await redis_client.pttl(prefix + "k")
        assert 59_000 < ttl_ms <= 61_000
        assert metric("bastion_ratelimit_backend_up", backend="redis") == 1.0
    finally:
        await rl.aclose()


async def test_noscript_is_handled(
    redis_client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A script text no server has seen yet: the first EVALSHA meets NOSCRIPT.
    script = ratelimit._SCRIPT + f"-- {uuid.uuid4().hex}\n"
    sha = hashlib.sha1(script.encode()).hexdigest()
    monkeypatch.setattr(ratelimit, "_SCRIPT", script)
    monkeypatch.setattr(ratelimit, "_SCRIPT_SHA", sha)
    assert await redis_client.script_exists(sha) == [False]
    errors = metric("bastion_ratelimit_backend_errors_total")
    rl = RedisRateLimiter.from_url(settings(), REDIS_URL, prefix=prefix)
    try:
        assert (await rl.check("k", 1)).allowed
        assert await redis_client.script_exists(sha) == [True]
        assert (await rl.check("k", 1)).remaining_requests == 1
    finally:
        await rl.aclose()
    assert metric("bastion_ratelimit_backend_errors_total") == errors


@pytest.mark.parametrize(
    ("rps", "burst", "tpm", "cost", "capacity", "rate"),
    [
        # requests bind: 10 + 50/s requests
        (50.0, 10, 10**9, 1, 10, 50.0),
        # tokens bind: 600 + 10/s tokens, 7 a request (not a divisor: no exact fit)
        (10_000.0, 10_000, 600, 7, 600, 10.0),
    ],
    ids=["requests", "tokens"],
)
async def test_concurrent_tasks_never_exceed_the_bucket(
    prefix: str, rps: float, burst: int, tpm: int, cost: int, capacity: int, rate: float
) -> None:
    # Generous timeouts: this test is about correctness, and a loaded test machine may
    # take longer than the production 0.25 s to open 50 connections.
    rl = RedisRateLimiter.from_url(
        settings(rps=rps, burst=burst, tpm=tpm), REDIS_URL, prefix=prefix, timeout_s=2.0
    )
    allowed = refused = 0

    async def client(deadline: float) -> None:
        nonlocal allowed, refused
        # Past the window too until the limit has refused something (a slow machine may
        # not drain the bucket in time), within a hard cap.
        while time.monotonic() < deadline or (not refused and time.monotonic() < deadline + 5):
            decision = await rl.check("shared", cost)
            assert not decision.degraded
            if decision.allowed:
                allowed += 1
            else:
                refused += 1

    start = time.monotonic()
    try:
        await asyncio.gather(*(client(start + 0.6) for _ in range(50)))
    finally:
        await rl.aclose()
    elapsed = time.monotonic() - start
    used = allowed * cost
    assert used <= capacity + rate * elapsed + cost
    # A refusal means the bucket was drained (less than one request's cost left).
    assert refused > 0
    assert used > capacity - cost


SHARED_KEY_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from gateway.config import RateLimitSettings
    from gateway.ratelimit import RedisRateLimiter

    url, prefix, start_at, run_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])

    async def main() -> None:
        rl = RedisRateLimiter.from_url(
            RateLimitSettings(requests_per_second=40, burst=10, tokens_per_minute=10**9),
            url,
            prefix=prefix,
            timeout_s=2.0,
        )
        await rl.check("warm-up", 0)  # connect and load the script before the window
        counts = {"allowed": 0, "refused": 0, "degraded": 0}

        async def client(deadline: float) -> None:
            # Past the window too until the limit has refused something, within a cap.
            while time.time() < deadline or (not counts["refused"] and time.time() < deadline + 5):
                decision = await rl.check("shared", 1)
                counts["degraded"] += decision.degraded
                counts["allowed" if decision.allowed else "refused"] += 1

        await asyncio.sleep(max(0.0, start_at - time.time()))
        first = time.time()
        # A process that started late still runs its full window (the bound uses the
        # measured span, so this only keeps both processes busy together).
        await asyncio.gather(*(client(first + run_s) for _ in range(20)))
        counts["first"], counts["last"] = first, time.time()
        await rl.aclose()
        print(json.dumps(counts))

    asyncio.run(main())
    """
)


async def test_two_processes_share_one_bucket(tmp_path: Path, prefix: str) -> None:
    script = tmp_path / "hammer.py"
    script.write_text(SHARED_KEY_SCRIPT)
    start_at = time.time() + 1.5  # both processes started and connected by then
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            REDIS_URL,
            prefix,
            repr(start_at),
            "1.0",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))

    assert all(r["degraded"] == 0 for r in results)
    assert all(r["refused"] > 0 for r in results)  # both processes hit the shared limit
    total = sum(r["allowed"] for r in results)
    elapsed = max(r["last"] for r in results) - min(r["first"] for r in results)
    assert total <= 10 + 40 * elapsed + 1
    # Were the bucket not shared, each process would have had its own 10 + 40/s: the
    # total would be about twice the bound above.
    assert total >= 10


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_down_never_raises(
    mode: Literal["open", "closed"], caplog: pytest.LogCaptureFixture
) -> None:
    rl = RedisRateLimiter.from_url(settings(mode=mode), f"redis://127.0.0.1:{closed_port()}/0")
    errors = metric("bastion_ratelimit_backend_errors_total")
    try:
        with caplog.at_level(logging.WARNING, logger="bastion.ratelimit"):
            start = time.monotonic()
            decision = await rl.check("secret-key-id", 10)
            await rl.adjust("secret-key-id", 5)
            # Within the back-off, Redis is not asked again: no new errors, same answer.
            assert await rl.check("secret-key-id", 10) == decision
            assert time.monotonic() - start < 1.0
        assert metric("bastion_ratelimit_backend_errors_total") == errors + 1
        assert metric("bastion_ratelimit_backend_up", backend="redis") == 0.0
        assert decision.degraded
        assert decision.allowed is (mode == "open")
        assert (decision.remaining_requests, decision.remaining_tokens) == (3, 600)
        headers = dict(decision.headers())
        if mode == "closed":
            assert headers[b"retry-after"] == b"1"
        else:
            assert b"retry-after" not in headers
        [record] = [r for r in caplog.records if r.name == "bastion.ratelimit"]
        assert mode in record.getMessage()
        assert "secret-key-id" not in caplog.text
    finally:
        await rl.aclose()


async def test_failures_log_one_line_not_one_per_request(caplog: pytest.LogCaptureFixture) -> None:
    rl = RedisRateLimiter(
        settings(),
        aioredis.Redis.from_url(
            f"redis://127.0.0.1:{closed_port()}/0", socket_connect_timeout=0.25
        ),
        backoff_s=0.0,  # ask Redis every time
        owns_client=True,
    )
    errors = metric("bastion_ratelimit_backend_errors_total")
    try:
        with caplog.at_level(logging.WARNING, logger="bastion.ratelimit"):
            for _ in range(20):
                assert (await rl.check("k", 1)).degraded
        assert metric("bastion_ratelimit_backend_errors_total") == errors + 20
        assert len([r for r in caplog.records if r.name == "bastion.ratelimit"]) == 1
    finally:
        await rl.aclose()


async def test_backend_recovers(redis_client: aioredis.Redis, prefix: str) -> None:
    clock_now = [0.0]
    rl = RedisRateLimiter(
        settings(mode="closed"),
        aioredis.Redis.from_url(REDIS_URL),
        prefix=prefix,
        owns_client=True,
        clock=lambda: clock_now[0],
    )
    try:
        # A failure from the client, then the back-off ends and Redis answers again.
        rl._failed(ConnectionError("simulated"))
        assert (await rl.check("k", 1)).degraded
        clock_now[0] = 1.0
        decision = await rl.check("k", 1)
        assert decision.allowed and not decision.degraded
        assert metric("bastion_ratelimit_backend_up", backend="redis") == 1.0
    finally:
        await rl.aclose()


@pytest.mark.parametrize("timeout_s", [0.1, 0.6])
async def test_a_redis_that_never_answers_costs_the_configured_wait(timeout_s: float) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads every command, answers none
        writer.close()

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    config = RateLimitSettings(redis_failure_mode="closed", redis_timeout_s=timeout_s)
    limiter = ratelimit.build_rate_limiter(config, f"redis://127.0.0.1:{port}/0")
    try:
        started = time.monotonic()
        decision = await limiter.check("k", 1)
        waited = time.monotonic() - started
        assert decision.degraded and not decision.allowed
        assert timeout_s * 0.95 <= waited < timeout_s + 0.4
    finally:
        await limiter.aclose()
        silent.close()

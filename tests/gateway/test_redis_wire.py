"""The pipelined Redis connection, against the real Redis server and a silent one."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import RateLimitSettings
from gateway.ratelimit import RedisRateLimiter
from gateway.redis_wire import PipelinedRedis, encode_command

REDIS_URL = os.environ.get("BASTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_py() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    yield client
    await client.aclose()


def test_command_encoding() -> None:
    assert encode_command("EVALSHA", "ab", 1, b"k", 0.5) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n$3\r\n0.5\r\n"
    )
    # Non-ASCII text as UTF-8; subclasses as their base types; anything else refused.
    assert encode_command("é", -7, 1e-9) == b"*3\r\n$2\r\n\xc3\xa9\r\n$2\r\n-7\r\n$5\r\n1e-09\r\n"

    class Name(str):
        pass

    assert encode_command(Name("k"), True, bytearray(b"v")) == (
        b"*3\r\n$1\r\nk\r\n$1\r\n1\r\n$1\r\nv\r\n"
    )
    with pytest.raises(TypeError, match="NoneType"):
        encode_command("GET", None)  # type: ignore[arg-type]


async def test_concurrent_calls_get_their_own_replies(redis_py: aioredis.Redis) -> None:
    client = PipelinedRedis(REDIS_URL, timeout_s=2)
    try:
        assert await client.ping()
        replies = await asyncio.gather(
            *(client.eval("return ARGV[1]", 0, str(i)) for i in range(300))
        )
        assert replies == [str(i).encode() for i in range(300)]
        with pytest.raises(NoScriptError):
            await client.evalsha("0" * 40, 0)
        with pytest.raises(ResponseError):
            await client.execute("NOSUCHCOMMAND")
        assert await client.ping()  # the connection survives error replies
    finally:
        await client.aclose()


async def test_select_from_the_url(redis_py: aioredis.Redis) -> None:
    key = f"bastion-test:{uuid.uuid4().hex}"
    client = PipelinedRedis(REDIS_URL.rsplit("/", 1)[0] + "/3", timeout_s=2)
    try:
        await client.execute("SET", key, "in-db-3", "EX", 30)
        other = aioredis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/3")
        assert await other.get(key) == b"in-db-3"
        assert await redis_py.get(key) is None  # db 0 does not have it
        await other.delete(key)
        await other.aclose()
    finally:
        await client.aclose()


async def test_silent_server_times_out_and_the_next_call_reconnects() -> None:
    connections = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_s=0.1)
    try:
        first = asyncio.create_task(client.ping())
        second = asyncio.create_task(client.ping())
        for call in (first, second):
            with pytest.raises(RedisTimeoutError):
                await call
        with pytest.raises(RedisTimeoutError):
            await client.ping()
        assert connections == 2  # the timed-out connection was dropped, not reused
    finally:
        await client.aclose()
        server.close()


async def test_each_call_gets_its_own_deadline_from_one_watchdog() -> None:
    """A server that answers the first PING only: the first call succeeds, a call sent
    later times out a whole timeout after it was sent, not at the first one's deadline."""

    async def answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"PING\r\n")
        writer.write(b"+PONG\r\n")
        await writer.drain()
        await reader.read()

    server = await asyncio.start_server(answers_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    loop = asyncio.get_running_loop()
    try:
        assert await client.ping()
        await asyncio.sleep(0.2)  # the first call's deadline would fall 0.1 s from now
        sent = loop.time()
        with pytest.raises(RedisTimeoutError):
            await client.ping()
        assert 0.28 <= loop.time() - sent < 1.0
    finally:
        await client.aclose()
        server.close()


async def test_refused_connection() -> None:
    client = PipelinedRedis("redis://127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(RedisConnectionError):
        await client.ping()


async def test_corrections_reach_other_processes_within_the_flush(
    redis_py: aioredis.Redis,
) -> None:
    prefix = f"bastion-test:{uuid.uuid4().hex}:"
    settings = RateLimitSettings(requests_per_second=100, burst=100, tokens_per_minute=6000)
    here = RedisRateLimiter.from_url(settings, REDIS_URL, prefix=prefix, timeout_s=2)
    there = RedisRateLimiter.from_url(settings, REDIS_URL, prefix=prefix, timeout_s=2)
    try:
        assert (await here.check("k", 100)).remaining_tokens == 5900
        await here.adjust("k", 2000)  # the answer used 2,000 more than estimated
        assert (await here.check("k", 0)).remaining_tokens < 4000  # at once, here
        await here.adjust("k", 1000)
        await asyncio.sleep(0.4)  # the background flush, for a key with no new request
        seen = (await there.check("k", 0)).remaining_tokens
        assert 2800 < seen < 3000, seen
    finally:
        await here.aclose()
        await there.aclose()
        keys = [k async for k in redis_py.scan_iter(match=prefix + "*")]
        if keys:
            await redis_py.delete(*keys)

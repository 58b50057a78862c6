"""A pipelined Redis connection for the rate limiter: one socket, replies in order.

Why not redis-py's asyncio client on the request path: measured through the gateway
(bench/proxy_overhead.py, bastion-secure), redis-py cost about 130 µs of the gateway's
CPU per call (connection-pool locking, command objects, pure-Python reply parsing),
more than the whole bare proxy. Here a call queues its command on a shared
connection and awaits its reply from a FIFO; hiredis (the C parser redis-py itself uses
when installed) parses replies. Concurrent requests share the socket, and the commands
of one turn of the event loop go out in one write (fewer system calls under load).

Only what the limiter needs: ``evalsha``/``eval`` (and ``ping``), AUTH and SELECT from
the URL, ``rediss://`` for TLS. Error replies become redis-py's exception types, so the
limiter handles both clients alike. A call that times out drops the connection (a late
reply would otherwise be handed to the next caller); the next call reconnects.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def encode_command(*args: str | int | float | bytes) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode()  # type: ignore[union-attr]
        elif kind is int:
            data = b"%d" % arg
        elif kind is float:
            data = repr(arg).encode()
        elif isinstance(arg, (bytes, bytearray)):
            data = bytes(arg)
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            raise TypeError(f"cannot send a {kind.__name__} to Redis")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def bulk(data: bytes) -> bytes:
    """One RESP bulk string (commands made of parts encoded ahead of time)."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _as_exception(error: hiredis.ReplyError) -> ResponseError:
    text = str(error)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    return ResponseError(text)


class _RespProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        # Kept: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call
        # (its fork check), and the request path would make three per command.
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._outbox: list[bytes] = []
        # When each waiter's reply is due (loop time), in the waiters' order; one timer
        # watches the oldest instead of a timer per command.
        self.deadlines: deque[float] = deque()
        self._watchdog: asyncio.TimerHandle | None = None

    def request(self, command: bytes, waiter: asyncio.Future[Any], timeout_s: float) -> None:
        """Send ``command``; ``waiter`` gets its reply, or the connection is aborted with a
        timeout error if no reply came within ``timeout_s``."""
        loop = self.loop
        deadline = loop.time() + timeout_s
        self.waiters.append(waiter)
        self.deadlines.append(deadline)
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._watch)
        self.send(command)

    def _watch(self) -> None:
        self._watchdog = None
        if not self.deadlines or self.lost:
            return
        oldest = self.deadlines[0]
        loop = self.loop
        if oldest <= loop.time():
            self.abort(RedisTimeoutError("Timed out waiting for Redis."))
        else:
            self._watchdog = loop.call_at(oldest, self._watch)

    def send(self, command: bytes) -> None:
        """Queue a command; everything queued in one turn of the loop goes in one write."""
        if not self._outbox:
            self.loop.call_soon(self._flush)
        self._outbox.append(command)

    def _flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError:
                self.abort(RedisConnectionError("Redis sent a malformed reply."))
                return
            if reply is False:
                return
            if not self.waiters:
                self.abort(RedisConnectionError("Redis sent a reply nobody asked for."))
                return
            waiter = self.waiters.popleft()
            self.deadlines.popleft()
            if waiter.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(_as_exception(reply))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_all(RedisConnectionError("Connection to Redis lost."))

    def _fail_all(self, error: Exception) -> None:
        self.deadlines.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def abort(self, error: Exception) -> None:
        self.lost = True
        self._fail_all(error)
        if self.transport is not None:
            self.transport.abort()


class PipelinedRedis:
    """``redis://[user:password@]host[:port][/db]`` (or ``rediss://``), one connection."""

    def __init__(self, url: str, timeout_s: float = 0.25) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"redis", "rediss"}:
            raise ValueError(f"not a redis:// URL: {parts.scheme}://...")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self._db = int(path) if path.isdigit() else 0
        self._timeout_s = timeout_s
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _RespProtocol:
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.lost:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._timeout_s):
                    _, protocol = await loop.create_connection(
                        _RespProtocol, self._host, self._port, ssl=self._ssl
                    )
            except TimeoutError as exc:
                raise RedisTimeoutError("Timed out connecting to Redis.") from exc
            except OSError as exc:
                raise RedisConnectionError(f"Cannot connect to Redis: {exc}") from exc
            self._protocol = protocol
            if self._password is not None:
                auth = ("AUTH", self._username, self._password) if self._username else None
                await self._send(protocol, *(auth or ("AUTH", self._password)))
            if self._db:
                await self._send(protocol, "SELECT", self._db)
            return protocol

    async def _send(self, protocol: _RespProtocol, *args: str | int | float | bytes) -> Any:
        return await self._submit(protocol, encode_command(*args))

    def _submit(self, protocol: _RespProtocol, command: bytes) -> asyncio.Future[Any]:
        if protocol.lost or protocol.transport is None:
            raise RedisConnectionError("Connection to Redis lost.")
        waiter: asyncio.Future[Any] = protocol.loop.create_future()
        protocol.request(command, waiter, self._timeout_s)
        return waiter

    async def execute(self, *args: str | int | float | bytes) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connection()
        return await self._submit(protocol, encode_command(*args))

    async def send_command(self, command: bytes) -> Any:
        """Send a command already in RESP form (:func:`encode_command`, or parts of one
        made ahead of time with :func:`bulk`) and return its reply."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connection()
        return await self._submit(protocol, command)

    async def evalsha(self, sha: str, numkeys: int, *args: str | int | float | bytes) -> Any:
        return await self.execute(b"EVALSHA", sha, numkeys, *args)

    async def eval(self, script: str, numkeys: int, *args: str | int | float | bytes) -> Any:
        return await self.execute(b"EVAL", script, numkeys, *args)

    async def ping(self) -> bool:
        return bool(await self.execute("PING") == b"PONG")

    async def aclose(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

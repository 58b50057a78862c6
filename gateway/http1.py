"""A lean HTTP/1.1 client for upstreams: keep-alive pools on asyncio, httptools to parse.

Why the gateway has its own client: on this machine one aiohttp request costs about
115 µs of CPU on the gateway's core, the same exchange on a bare asyncio protocol with
httptools about 12 µs (bench/upstream_clients.py measures both). At a few thousand
requests per second on one core that difference is a third of the gateway's budget.
The HTTP parsing itself is httptools (llhttp, as in uvicorn); what lives here is the
connection pool and the request/response plumbing, for the narrow case of talking to
known upstreams: no redirects, cookies, proxies or compression.

Behaviour: one request at a time per connection; idle connections are reused last-in
first-out, but not after ``IDLE_EXPIRY_S`` (servers close idle keep-alive connections,
uvicorn and so vLLM after 5 s, and a request racing that close would be lost); nothing
is re-sent by the client itself (the proxy decides about retries); the read timeout is
the longest silence between two reads; a body arriving faster than it is consumed
pauses reading from the socket.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools

from gateway.errors import GatewayError, UpstreamFailed, UpstreamTimeout

_PAUSE_ABOVE = 1 << 20  # bytes buffered before reading from the socket pauses
IDLE_EXPIRY_S = 4.0
_URL_CACHE_SIZE = 256


class _Target:
    __slots__ = ("host", "host_header", "path", "pool_key", "port", "ssl")

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise UpstreamFailed(f"Cannot send to {url!r}.")
        self.host = parts.hostname
        secure = parts.scheme == "https"
        self.port = parts.port or (443 if secure else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if secure else None
        self.host_header = parts.netloc.rpartition("@")[2]
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.pool_key = (parts.scheme, self.host, self.port)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks feed the current response."""

    def __init__(self) -> None:
        # Kept: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call
        # (its fork check); each answer waits at least once (HttpResponse._wait).
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.response: HttpResponse | None = None
        self.pool_key: tuple[str, str, int] = ("", "", 0)
        self._framed = False  # the answer says where its body ends (length or chunked)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamFailed("The upstream tried to switch protocols."))
        except httptools.HttpParserError:
            self._fail(UpstreamFailed("The upstream sent a malformed HTTP answer."))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is None or response.complete:
            return
        if response.status and not self._framed:
            response.finish(keep_alive=False)  # a body delimited by the connection's end
        else:
            response.fail(UpstreamFailed("The upstream closed the connection."))

    def pause_writing(self) -> None:  # large request bodies are written whole; nothing to do
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-type" and self.response is not None:
            self.response.content_type = value.decode("latin-1")
        elif lowered in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response.status = self.parser.get_status_code()
            self.response.headers_done()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response.finish(self.parser.should_keep_alive())

    def _fail(self, error: GatewayError) -> None:
        if self.response is not None:
            self.response.fail(error)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HttpResponse:
    """An upstream's answer; satisfies gateway.transport.UpstreamResponse."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_keep_alive",
        "_paused",
        "_pool",
        "_read_s",
        "_waiter",
        "complete",
        "content_type",
        "status",
    )

    def __init__(self, conn: _Connection, pool: HttpClient, read_s: float) -> None:
        self._conn = conn
        self._pool = pool
        self._read_s = read_s
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: GatewayError | None = None
        self._keep_alive = False
        self.status = 0
        self.content_type = "application/json"
        self.complete = False

    # fed by the connection
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def headers_done(self) -> None:
        self._wake()

    def feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_ABOVE and not self._paused and self._conn.transport:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def finish(self, keep_alive: bool) -> None:
        self.complete = True
        self._keep_alive = keep_alive
        self._wake()

    def fail(self, error: GatewayError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    async def _wait(self) -> None:
        """Until something new arrives, the answer fails, or the read timeout passes."""
        loop = self._conn.loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._read_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if waiter.result() is _TIMED_OUT:
            self._conn.abort()
            raise UpstreamTimeout("The upstream did not answer in time.")

    async def wait_headers(self) -> None:
        while not self.status and self._error is None:
            await self._wait()
        if self._error is not None and not self.status:
            raise self._error

    def _take(self) -> bytes:
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self._conn.transport:
            self._paused = False
            self._conn.transport.resume_reading()
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                yield self._take()
                continue
            if self.complete:
                return
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        try:
            parts = [chunk async for chunk in self.iter_chunks()]
        finally:
            await self.close()
        return b"".join(parts)

    async def close(self) -> None:
        conn = self._conn
        if conn.response is not self:
            return
        conn.response = None
        if self.complete and self._keep_alive and not conn.closed and not self._chunks:
            self._pool.release(conn)
        else:
            conn.abort()
            self._pool.forget(conn)


_TIMED_OUT = object()


def _expire(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class HttpClient:
    """Keep-alive pools per (scheme, host, port), for :class:`HttpResponse`."""

    def __init__(
        self,
        connect_s: float,
        read_s: float,
        pool_size: int = 1024,
        upstream_ssl: Mapping[str, ssl.SSLContext] | None = None,
    ) -> None:
        self._connect_s = connect_s
        self._read_s = read_s
        self._pool_size = pool_size
        # Longest base URL first, so a nested base URL wins over its prefix.
        self._ssl = sorted((upstream_ssl or {}).items(), key=lambda item: -len(item[0]))
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._targets: dict[str, _Target] = {}
        self._all: set[_Connection] = set()

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            context = None
            for base, ctx in self._ssl:
                if url.startswith(base) and url[len(base) : len(base) + 1] in ("", "/", "?"):
                    context = ctx
                    break
            target = _Target(url, context)
            if len(self._targets) >= _URL_CACHE_SIZE:
                self._targets.clear()
            self._targets[url] = target
        return target

    async def _connect(self, target: _Target) -> _Connection:
        while self._open >= self._pool_size:
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            await waiter
        self._open += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_s):
                _, conn = await loop.create_connection(
                    _Connection,
                    target.host,
                    target.port,
                    ssl=target.ssl,
                    server_hostname=target.host if target.ssl else None,
                )
        except TimeoutError as exc:
            self._slot_freed()
            raise UpstreamTimeout("Connecting to the upstream timed out.") from exc
        except (OSError, ssl.SSLError) as exc:
            self._slot_freed()
            raise UpstreamFailed(f"Cannot connect to the upstream: {type(exc).__name__}.") from exc
        except BaseException:
            self._slot_freed()
            raise
        self._all.add(conn)
        return conn

    def _slot_freed(self) -> None:
        self._open -= 1
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def release(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.pool_key, []).append(conn)

    def forget(self, conn: _Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self._slot_freed()

    async def _checkout(self, target: _Target) -> _Connection:
        idle = self._idle.get(target.pool_key)
        if idle:
            fresh_after = time.monotonic() - IDLE_EXPIRY_S
            while idle:
                conn = idle.pop()
                if conn.closed or conn.transport is None or conn.transport.is_closing():
                    self.forget(conn)
                elif conn.idle_since < fresh_after:
                    # The most recently used is last: everything left is older still.
                    for stale in [conn, *idle]:
                        stale.abort()
                        self.forget(stale)
                    idle.clear()
                else:
                    return conn
        conn = await self._connect(target)
        conn.pool_key = target.pool_key
        return conn

    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> HttpResponse:
        target = self._target(url)
        lines = [f"{method} {target.path} HTTP/1.1\r\nhost: {target.host_header}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        payload = body or b""
        if payload or method in {"POST", "PUT", "PATCH"}:
            lines.append(f"content-length: {len(payload)}\r\n")
        lines.append("\r\n")
        request = "".join(lines).encode("latin-1") + payload
        conn = await self._checkout(target)
        response = HttpResponse(conn, self, self._read_s)
        conn.response = response
        assert conn.transport is not None
        conn.transport.write(request)
        try:
            await response.wait_headers()
        except BaseException:
            conn.abort()
            self.forget(conn)
            raise
        return response

    async def aclose(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()

"""The lean HTTP/1.1 upstream client, against small raw servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway import http1
from gateway.errors import UpstreamFailed, UpstreamTimeout
from gateway.http1 import HttpClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server whose handler writes whatever bytes a test wants."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


def fixed(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[RawServer, str]]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> tuple[RawServer, str]:
        server = RawServer(handler)
        servers.append(server)
        return server, await server.start()

    yield start
    for server in servers:
        await server.stop()


async def test_keep_alive_reuses_one_connection(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            server.requests.append(await read_request(reader))
            writer.write(fixed(b'{"n": %d}' % len(server.requests)))
            await writer.drain()

    server, url = await serve(handler)
    client = HttpClient(connect_s=1, read_s=1)
    for n in (1, 2, 3):
        response = await client.send("POST", url + "/v1/x?a=1", {"x-request-id": "r"}, b"{}")
        assert response.status == 200 and response.content_type == "application/json"
        assert await response.read() == b'{"n": %d}' % n
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/x?a=1 HTTP/1.1\r\n")
    assert b"x-request-id: r\r\n" in first and b"content-length: 2\r\n" in first
    assert first.endswith(b"\r\n\r\n{}")
    await client.aclose()


async def test_chunked_body_streams_before_it_ends(serve) -> None:  # type: ignore[no-untyped-def]
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    _, url = await serve(handler)
    client = HttpClient(connect_s=1, read_s=2)
    response = await client.send("POST", url + "/s", {}, b"{}")
    assert response.content_type == "text/event-stream"
    chunks = response.iter_chunks()
    assert await chunks.__anext__() == b"data: 1"  # before the server sent the rest
    release.set()
    assert [c async for c in chunks] == [b"data: 2"]
    await response.close()
    await client.aclose()


async def test_body_delimited_by_connection_close(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    server, url = await serve(handler)
    client = HttpClient(connect_s=1, read_s=1)
    for _ in range(2):
        response = await client.send("GET", url + "/", {}, None)
        assert await response.read() == b"all of it"
    assert server.connections == 2  # never reused
    await client.aclose()


async def test_read_timeouts(serve) -> None:  # type: ignore[no-untyped-def]
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    _, url = await serve(silent)
    client = HttpClient(connect_s=1, read_s=0.2)
    with pytest.raises(UpstreamTimeout):
        await client.send("POST", url + "/", {}, b"{}")

    async def stalls_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(5)

    _, url = await serve(stalls_mid_body)
    response = await client.send("POST", url + "/", {}, b"{}")
    with pytest.raises(UpstreamTimeout):
        await response.read()
    await client.aclose()


async def test_refused_malformed_and_cut_answers(serve) -> None:  # type: ignore[no-untyped-def]
    client = HttpClient(connect_s=1, read_s=1)
    _, url = await serve(lambda r, w: asyncio.sleep(0))
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(UpstreamFailed, match="Cannot connect"):
        await client.send("GET", f"http://127.0.0.1:{port + 1 if port < 65535 else 1}/", {}, None)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    _, url = await serve(garbage)
    with pytest.raises(UpstreamFailed, match="malformed"):
        await client.send("GET", url + "/", {}, None)

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()

    _, url = await serve(cut)
    response = await client.send("GET", url + "/", {}, None)
    with pytest.raises(UpstreamFailed, match="closed"):
        await response.read()

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    _, url = await serve(drop)
    with pytest.raises(UpstreamFailed, match="closed"):
        await client.send("POST", url + "/", {}, b"{}")
    await client.aclose()


async def test_large_body_pauses_and_resumes_reading(serve) -> None:  # type: ignore[no-untyped-def]
    big = bytes(range(256)) * (40 * 1024)  # 10 MiB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(fixed(big))
        await writer.drain()
        await reader.read()

    _, url = await serve(handler)
    client = HttpClient(connect_s=1, read_s=2)
    response = await client.send("GET", url + "/", {}, None)
    received = bytearray()
    async for chunk in response.iter_chunks():
        received += chunk
        await asyncio.sleep(0)  # a slow consumer
    assert bytes(received) == big
    await response.close()
    await client.aclose()


async def test_idle_connections_expire(serve, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(fixed(b"ok"))
            await writer.drain()

    server, url = await serve(handler)
    monkeypatch.setattr(http1, "IDLE_EXPIRY_S", 0.1)
    client = HttpClient(connect_s=1, read_s=1)
    await (await client.send("GET", url + "/", {}, None)).read()
    await (await client.send("GET", url + "/", {}, None)).read()
    assert server.connections == 1
    await asyncio.sleep(0.2)
    await (await client.send("GET", url + "/", {}, None)).read()
    assert server.connections == 2
    await client.aclose()


async def test_pool_size_bounds_connections_and_cancel_frees_them(serve) -> None:  # type: ignore[no-untyped-def]
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await gate.wait()
            writer.write(fixed(b"ok"))
            await writer.drain()

    server, url = await serve(handler)
    client = HttpClient(connect_s=1, read_s=5, pool_size=1)
    first = asyncio.create_task(client.send("GET", url + "/", {}, None))
    second = asyncio.create_task(client.send("GET", url + "/", {}, None))
    await asyncio.sleep(0.1)
    assert server.connections == 1  # the second waits for the only slot
    first.cancel()  # a client that went away: its connection is dropped, the slot freed
    await asyncio.sleep(0.1)
    assert server.connections == 2
    gate.set()
    assert await (await second).read() == b"ok"
    await client.aclose()

"""What the counted process runs: the gateway serving N requests, in process over a socket
that only records (:func:`serve`) or as ``bastion serve`` does over TCP
(:func:`serve_over_sockets`, with :func:`load_and_upstream` in a child process that
valgrind does not follow)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.chain.variants import MODEL, settings_for, split_variant

SCRIPT = Path(__file__).resolve().parents[1] / "chain_instructions.py"
"""The script the load's child process runs (``--client``)."""


def chat_request(key: str) -> bytes:
    """The chat completion request every variant serves, with ``key`` as its API key."""
    from gateway_hotpath import REQUEST

    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
        b"Content-Type: application/json\r\nAccept: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (key.encode(), len(REQUEST), REQUEST)
    )


class RecordingSocket(asyncio.Transport):
    """Keeps what the protocol writes; wakes the driver when an answer is complete."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.answered: asyncio.Future[None] | None = None

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def serve(
    variant: str, requests: int, redis_url: str, concurrency: int, extra: dict[str, Any]
) -> None:
    """Serve ``requests`` requests in process (what valgrind counts)."""
    import uvicorn
    from gateway_hotpath import ZeroCostUpstream
    from uvicorn.server import ServerState

    from gateway.app import BastionApp
    from gateway.listener import ListenerProtocol

    # A file written late into it (seen once at exit) must not fail a finished count.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        settings = settings_for(variant, Path(tmp), redis_url, extra=extra)
        configure_logging_if_asked(settings)
        app = BastionApp(settings, ZeroCostUpstream())
        lifespan = app._lifespan(app)
        await lifespan.__aenter__()
        try:
            key = "none"
            if app.settings.auth.enabled:
                models = [MODEL] if split_variant(variant)[0] == "bastion-redis" else None
                key, _ = app.key_store.create(["app"], models=models)
                app.key_cache.load()
            config = uvicorn.Config(app, http=ListenerProtocol, lifespan="off", access_log=False)
            config.load()
            loop = asyncio.get_running_loop()
            request = chat_request(key)
            # One connection per concurrent request, as wrk's; each turn hands every
            # connection its next request and waits for all the answers.
            state = ServerState()
            connections = []
            for _ in range(concurrency):
                protocol = ListenerProtocol(config, state, {}, loop)
                socket = RecordingSocket()
                protocol.connection_made(socket)
                connections.append((protocol, socket))
            for _ in range(requests // concurrency):
                for protocol, socket in connections:
                    socket.answered = loop.create_future()
                    protocol.data_received(request)
                for _, socket in connections:
                    await socket.answered
                    answer = b"".join(socket.written)
                    socket.written.clear()
                    if not answer.startswith(b"HTTP/1.1 200 "):
                        raise SystemExit(f"{variant}: not a 200: {answer[:300]!r}")
            for protocol, _ in connections:
                protocol.connection_lost(None)
        finally:
            await lifespan.__aexit__(None, None, None)


async def serve_over_sockets(
    variant: str, requests: int, redis_url: str, concurrency: int, extra: dict[str, Any]
) -> None:
    """Serve ``requests`` requests as ``bastion serve`` does: uvicorn on a TCP port (TLS
    for bastion-secure), the gateway's own upstream client. The load and the upstream
    are a child process (``--client``), which valgrind does not follow: not counted."""
    import uvicorn

    from gateway.app import BastionApp
    from gateway.listener import ListenerProtocol
    from gateway.tls import uvicorn_options

    client = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--client",
        str(requests),
        str(concurrency),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None
    upstream = (await client.stdout.readline()).decode().split()[-1]
    # A file written late into it (seen once at exit) must not fail a finished count.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        settings = settings_for(variant, Path(tmp), redis_url, upstream, extra)
        configure_logging_if_asked(settings)
        app = BastionApp(settings)
        lifespan = app._lifespan(app)
        await lifespan.__aenter__()
        try:
            key = "none"
            if settings.auth.enabled:
                base = split_variant(variant)[0]
                models = [MODEL] if base in {"bastion-redis", "bastion-secure"} else None
                key, _ = app.key_store.create(["app"], models=models)
                app.key_cache.load()
            options: dict[str, Any] = {"http": ListenerProtocol}
            if settings.server.tls is not None:
                options.update(uvicorn_options(settings.server.tls, "httptools"))
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                lifespan="off",
                access_log=False,
                log_level="warning",
                loop="none",
                server_header=False,
                **options,
            )
            server = uvicorn.Server(config)
            serving = asyncio.create_task(server.serve())
            while not server.started:  # noqa: ASYNC110 (uvicorn sets a flag, no event)
                await asyncio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            scheme = "https" if settings.server.tls is not None else "http"
            client.stdin.write(f"{scheme} {port} {key}\n".encode())
            await client.stdin.drain()
            outcome = (await client.stdout.readline()).decode().strip()
            server.should_exit = True
            await serving
        finally:
            await lifespan.__aexit__(None, None, None)
    await client.wait()
    if outcome != "done":
        raise SystemExit(f"{variant}: the load failed: {outcome}")


LOGGING_ENV = "BENCH_CHAIN_LOGGING"
"""Set (by ``--logging``) in the counted process: configure logging as ``bastion serve``."""


def configure_logging_if_asked(settings: Any) -> None:
    if os.environ.get(LOGGING_ENV) == "1":
        from monitors.logs import configure_logging

        configure_logging(settings.logging, dev=False)


async def load_and_upstream(requests: int, concurrency: int) -> None:
    """The child of ``serve_over_sockets``: an upstream that answers every request with
    a fixed chat completion, then the load (``concurrency`` connections kept open)."""
    import ssl

    from gateway_hotpath import ANSWER

    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (len(ANSWER), ANSWER)
    )

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                break  # cancelled: the load is done and this process ends
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            writer.write(answer)
        writer.close()

    listening = await asyncio.start_server(upstream, "127.0.0.1", 0)
    print(f"upstream http://127.0.0.1:{listening.sockets[0].getsockname()[1]}", flush=True)
    scheme, port, key = (await asyncio.to_thread(sys.stdin.readline)).split()
    request = chat_request(key)
    tls = None
    if scheme == "https":
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE

    async def connection(turns: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port), ssl=tls)
        for _ in range(turns):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"not a 200: {head[:300]!r}")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
        writer.close()

    try:
        await asyncio.gather(*(connection(requests // concurrency) for _ in range(concurrency)))
        print("done", flush=True)
    except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
    listening.close()

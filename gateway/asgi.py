"""The ASGI contract as the gateway uses it, and the few helpers every route needs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any

from gateway.errors import RequestTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


RAW_HEADERS = "bastion.raw_headers"
"""An ASGI extension of the gateway's listener (gateway.listener), offered in the scope's
``extensions``: a ``http.response.start`` message may then carry, under this key, header
lines already written out (``name: value\\r\\n`` each, lower-case names, none that frames
the body), which the server writes after the message's ``headers``. The gateway's own
fixed sets of headers (the six ``x-ratelimit-*``) are then made by one bytes format,
not as pairs the server takes apart again line by line. Without the extension in the
scope (another server, a test client), the same headers go as pairs."""


def offers_raw_headers(scope: Scope) -> bool:
    extensions = scope.get("extensions")
    return extensions is not None and RAW_HEADERS in extensions


def raw_header_pairs(lines: bytes) -> list[tuple[bytes, bytes]]:
    """Header lines (``name: value\\r\\n`` each) as ASGI header pairs."""
    return [
        (name, value)
        for name, _, value in (line.partition(b": ") for line in lines.split(b"\r\n")[:-1])
    ]


class ClientDisconnected(Exception):
    """The client went away before its request was read; there is no one to answer."""


def request_id_of(scope: Scope) -> str:
    request_id: str = scope["state"]["request_id"]
    return request_id


def header_value(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = header_value(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    header_lines: bytes = b"",
) -> None:
    """``header_lines``: more headers, written out (only where the scope offers
    :data:`RAW_HEADERS`)."""
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(headers or ()),
        ],
    }
    if header_lines:
        start[RAW_HEADERS] = header_lines
    await send(start)
    await send({"type": "http.response.body", "body": body})


class DisconnectGuard:
    """Cancels the enclosed work when the client disconnects, and swallows that cancel.

    The request body must have been read already: from then on, ``receive()`` only
    returns ``http.disconnect``. Watching costs a task, about a tenth of the gateway's
    own time per request, so with ``watch_after_s`` the watch starts only once the work
    has taken that long: a client that gives up on a long generation still frees the
    upstream within that delay, and quick answers pay one timer instead of a task.
    """

    __slots__ = ("_armed", "_delay", "_receive", "_task", "_timer", "_watcher", "client_gone")

    def __init__(self, receive: Receive, watch_after_s: float = 0.0) -> None:
        self._receive = receive
        self._delay = watch_after_s
        self.client_gone = False
        self._armed = False
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DisconnectGuard:
        # One get_running_loop (on Python 3.11 a getpid() system call), not two.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._armed = True
        if self._delay > 0:
            self._timer = loop.call_later(self._delay, self._start_watch)
        else:
            self._start_watch()
        return self

    def _start_watch(self) -> None:
        self._timer = None
        if self._armed:
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        if self._armed:
            self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._armed = False
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if exc_type is asyncio.CancelledError and self.client_gone:
            self._task.uncancel()
            return True
        return False

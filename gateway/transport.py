"""The one narrow interface through which the proxy talks to upstreams.

The gateway's implementation is gateway/http1.py (httptools, its own keep-alive pool):
28.5 µs of CPU per upstream request against aiohttp's 127 µs, httpx over aiohttp 503 µs
and httpx's own pool 1,640 µs (httpx issue 3215), measured by ``bench/upstream_clients.py``
on this machine (32 concurrent, uvloop). The others live in bench/upstream_transports.py,
so the choice can be re-measured without making them runtime dependencies; a benchmark or
a test passes any implementation to ``BastionApp(settings, transport)``.

Backends raise only :class:`UpstreamFailed` and :class:`UpstreamTimeout`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

UpstreamSSL = Mapping[str, ssl.SSLContext]
"""An upstream's ``base_url`` -> the context for its requests (gateway.tls builds it)."""


class UpstreamResponse(Protocol):
    status: int
    content_type: str

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""

    async def close(self) -> None:
        """Abort: the connection is closed, so the upstream sees the client go away."""


class UpstreamTransport(Protocol):
    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> UpstreamResponse:
        """Send a request and return once the status line and headers arrived."""

    async def aclose(self) -> None: ...


def build_transport(
    connect_s: float, read_s: float, upstream_ssl: UpstreamSSL | None = None
) -> UpstreamTransport:
    """The gateway's upstream client (gateway/http1.py)."""
    from gateway.http1 import HttpClient

    return HttpClient(connect_s, read_s, upstream_ssl=upstream_ssl)

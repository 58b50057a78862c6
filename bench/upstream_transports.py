"""The upstream clients Bastion does not use, kept to re-measure the choice of its own.

``gateway/http1.py`` is the gateway's upstream client. CPU per upstream request on the
gateway's core, measured by ``bench/upstream_clients.py`` on this machine (32 concurrent,
uvloop): httptools 28.5 µs, aiohttp 127 µs, httpx over aiohttp 503 µs, httpx's own pool
1,640 µs (httpx issue 3215). These implement the same ``gateway.transport.UpstreamTransport``
so a benchmark passes one to ``BastionApp(settings, transport)``; they are not part of the
gateway's runtime (aiohttp and httpx-aiohttp are development dependencies).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Literal

import aiohttp

from gateway.errors import UpstreamFailed, UpstreamTimeout
from gateway.transport import UpstreamResponse, UpstreamSSL, UpstreamTransport

TransportName = Literal["httptools", "aiohttp", "httpx", "httpx-aiohttp"]


def _timeout_or_failure(exc: BaseException, url: str) -> UpstreamFailed | UpstreamTimeout:
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The upstream did not answer in time.")
    return UpstreamFailed(f"The upstream failed: {type(exc).__name__}.")


class _AiohttpResponse:
    __slots__ = ("_response", "_url", "content_type", "status")

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self._url = url
        self.status = response.status
        self.content_type = response.headers.get("content-type", "application/json")

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _timeout_or_failure(exc, self._url) from exc
        finally:
            self._response.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _timeout_or_failure(exc, self._url) from exc

    async def close(self) -> None:
        self._response.close()


class AiohttpTransport:
    """One shared aiohttp session with a keep-alive pool for all upstreams.

    A URL under a base URL of ``upstream_ssl`` is sent with that context (aiohttp keys
    pooled connections by it too); any other ``https`` URL with aiohttp's default checks.
    """

    def __init__(
        self,
        connect_s: float,
        read_s: float,
        pool_size: int = 1024,
        upstream_ssl: UpstreamSSL | None = None,
    ) -> None:
        self._connect_s = connect_s
        self._read_s = read_s
        self._pool_size = pool_size
        # Longest base URL first, so a nested base URL wins over its prefix.
        self._ssl = sorted((upstream_ssl or {}).items(), key=lambda item: -len(item[0]))
        self._session: aiohttp.ClientSession | None = None

    def _ssl_for(self, url: str) -> ssl.SSLContext | bool:
        for base, ctx in self._ssl:
            if url.startswith(base) and url[len(base) : len(base) + 1] in ("", "/", "?"):
                return ctx
        return True

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: aiohttp binds the session to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._pool_size, ttl_dns_cache=300, enable_cleanup_closed=True
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._connect_s, sock_read=self._read_s
                ),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> UpstreamResponse:
        session = self._get_session()
        ssl_context = self._ssl_for(url)
        try:
            response = await session.request(
                method, url, headers=headers, data=body, ssl=ssl_context
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _timeout_or_failure(exc, url) from exc
        return _AiohttpResponse(response, url)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _HttpxResponse:
    __slots__ = ("_response", "_url", "content_type", "status")

    def __init__(self, response: object, url: str) -> None:
        import httpx

        assert isinstance(response, httpx.Response)
        self._response = response
        self._url = url
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "application/json")

    async def read(self) -> bytes:
        import httpx

        try:
            return await self._response.aread()
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _timeout_or_failure(_httpx_cause(exc), self._url) from exc
        finally:
            await self._response.aclose()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        import httpx

        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _timeout_or_failure(_httpx_cause(exc), self._url) from exc

    async def close(self) -> None:
        await self._response.aclose()


def _httpx_cause(exc: BaseException) -> BaseException:
    import httpx

    return TimeoutError() if isinstance(exc, httpx.TimeoutException) else exc


class HttpxTransport:
    """httpx's AsyncClient, on its own pool or on aiohttp's (``httpx-aiohttp``).

    The contexts of ``upstream_ssl`` apply per origin (scheme, host and port).
    """

    def __init__(
        self,
        connect_s: float,
        read_s: float,
        pool_size: int = 1024,
        over_aiohttp: bool = False,
        upstream_ssl: UpstreamSSL | None = None,
    ) -> None:
        import httpx

        limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
        timeout = httpx.Timeout(connect=connect_s, read=read_s, write=read_s, pool=connect_s)
        mounts: dict[str, httpx.AsyncBaseTransport] = {}
        for base, ctx in (upstream_ssl or {}).items():
            origin = str(httpx.URL(base).copy_with(path="/", query=None)).rstrip("/")
            if over_aiohttp:
                from httpx_aiohttp import AiohttpTransport as HttpxOverAiohttp

                mounts.setdefault(origin, HttpxOverAiohttp(verify=ctx, limits=limits))
            else:
                mounts.setdefault(origin, httpx.AsyncHTTPTransport(verify=ctx, limits=limits))
        if over_aiohttp:
            from httpx_aiohttp import HttpxAiohttpClient

            self._client: httpx.AsyncClient = HttpxAiohttpClient(
                timeout=timeout, limits=limits, mounts=mounts
            )
        else:
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits, mounts=mounts)

    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> UpstreamResponse:
        import httpx

        request = self._client.build_request(method, url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise _timeout_or_failure(_httpx_cause(exc), url) from exc
        return _HttpxResponse(response, url)

    async def aclose(self) -> None:
        await self._client.aclose()


def build_transport(
    name: TransportName, connect_s: float, read_s: float, upstream_ssl: UpstreamSSL | None = None
) -> UpstreamTransport:
    """One upstream client by name (``httptools`` is the gateway's own)."""
    if name == "httptools":
        from gateway.http1 import HttpClient

        return HttpClient(connect_s, read_s, upstream_ssl=upstream_ssl)
    if name == "aiohttp":
        return AiohttpTransport(connect_s, read_s, upstream_ssl=upstream_ssl)
    over_aiohttp = name == "httpx-aiohttp"
    return HttpxTransport(connect_s, read_s, over_aiohttp=over_aiohttp, upstream_ssl=upstream_ssl)

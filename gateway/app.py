"""Wire the gateway: routes, middleware, and the objects that live as long as the app."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from gateway.asgi import ASGIApp, Receive, Scope, Send
from gateway.config import Settings, load_settings
from gateway.health import HealthChecker
from gateway.middleware.errors import ErrorMiddleware
from gateway.middleware.request_id import RequestIdMiddleware
from gateway.proxy import Forwarder, ProxyEndpoint
from gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.transport import UpstreamTransport, build_transport
from gateway.upstreams import UpstreamPool


class BastionApp:
    """The ASGI application: ``RequestId → Errors → Router``."""

    def __init__(self, settings: Settings, transport: UpstreamTransport | None = None) -> None:
        self.settings = settings
        self.started_at = int(time.time())
        self.pool = UpstreamPool(settings)
        self.transport = transport or build_transport(
            settings.server.upstream_transport,
            settings.timeouts.connect_s,
            settings.timeouts.read_s,
        )
        self.health = HealthChecker(settings.health_check, self.pool, self.transport)
        self.router = Router(routes=self._routes(), lifespan=self._lifespan)
        self._stack: ASGIApp = RequestIdMiddleware(ErrorMiddleware(self.router))

    def _routes(self) -> list[Route]:
        forwarder = Forwarder(self.settings, self.pool, self.transport)
        cap = self.settings.server.max_body_bytes

        def proxy(path: str, schema: Any, streams: bool) -> Route:
            endpoint = ProxyEndpoint(path, schema, forwarder, self.pool, cap, streams)
            return Route(path, endpoint, methods=["POST"])

        return [
            proxy("/v1/chat/completions", ChatCompletionRequest, streams=True),
            proxy("/v1/completions", CompletionRequest, streams=True),
            proxy("/v1/embeddings", EmbeddingRequest, streams=False),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/admin/upstreams", self.list_upstreams, methods=["GET"]),
        ]

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: object) -> AsyncIterator[None]:
        if self.settings.health_check.enabled:
            await self.health.probe_all()
            self.health.start()
        try:
            yield
        finally:
            await self.health.stop()
            await self.transport.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        await self._stack(scope, receive, send)

    async def list_models(self, request: Request) -> Response:
        data = [
            {"id": model, "object": "model", "created": self.started_at, "owned_by": "bastion"}
            for model in self.pool.models()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        ready, models = self.pool.ready()
        body = {
            "status": "ready" if ready else "not_ready",
            "models": models,
            "upstreams": [u.describe() for u in self.pool.upstreams],
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def list_upstreams(self, request: Request) -> Response:
        return JSONResponse({"upstreams": [u.describe() for u in self.pool.upstreams]})


def build_app(settings: Settings, transport: UpstreamTransport | None = None) -> BastionApp:
    return BastionApp(settings, transport)


def create_app() -> BastionApp:
    """uvicorn's factory for worker processes: configuration from ``BASTION_CONFIG``."""
    return build_app(load_settings())

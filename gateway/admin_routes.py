"""``/admin/keys``: create, list and revoke API keys over HTTP (admins only)."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.asgi import read_body
from gateway.config import Role
from gateway.errors import InvalidRequest, NotFound
from gateway.keys import KeyCache, KeyStore, parse_duration
from gateway.schemas import parse_json_model


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[Role] = Field(min_length=1)
    subject: str | None = Field(default=None, min_length=1, max_length=256)
    models: list[str] | None = None
    tier: str = Field(default="standard", min_length=1, max_length=64)
    expires_in: str | None = None
    description: str = Field(default="", max_length=256)


ADMIN_BODY_LIMIT = 64 * 1024


class KeyAdmin:
    def __init__(self, store: KeyStore, cache: KeyCache, tiers: dict[str, int]) -> None:
        self._store = store
        self._cache = cache
        self._tiers = tiers

    async def create(self, request: Request) -> Response:
        raw = await read_body(request.scope, request.receive, ADMIN_BODY_LIMIT)
        spec = parse_json_model(raw, CreateKeyRequest)
        if self._tiers and spec.tier not in self._tiers:
            raise InvalidRequest(
                f"Unknown tier '{spec.tier}'; configured: {', '.join(self._tiers)}.", param="tier"
            )
        try:
            expires = parse_duration(spec.expires_in) if spec.expires_in else None
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="expires_in") from exc
        key, info = await asyncio.to_thread(
            self._store.create,
            spec.roles,
            subject_id=spec.subject,
            models=spec.models,
            tier=spec.tier,
            expires_in=expires,
            description=spec.description,
        )
        # Usable at once in this process; the others pick it up on their next refresh.
        await self._cache.refresh()
        return JSONResponse({**info.as_json(), "key": key}, status_code=201)

    async def list(self, request: Request) -> Response:
        include_revoked = request.query_params.get("include_revoked") in {"1", "true"}
        keys = await asyncio.to_thread(self._store.all, include_revoked)
        return JSONResponse({"object": "list", "data": [k.as_json() for k in keys]})

    async def revoke(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        info = await asyncio.to_thread(self._store.revoke, key_id)
        if info is None:
            raise NotFound(f"There is no key '{key_id}'.")
        await self._cache.refresh()
        return JSONResponse(info.as_json())

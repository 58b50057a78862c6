"""``/admin/keys``: create, list and revoke API keys over HTTP (admins only)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from compliance.records import KEY_CREATED, KEY_REVOKED, AuditRecord
from gateway.asgi import read_body, request_id_of
from gateway.audit_trail import AuditTrail
from gateway.config import Role
from gateway.errors import InvalidRequest, NotFound
from gateway.keys import KeyCache, KeyStore, parse_duration
from gateway.middleware.auth import principal_of
from gateway.schemas import Name, check_json_value, parse_json_model


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[Role] = Field(min_length=1)
    subject: Name | None = None
    models: list[Name] | None = None
    tier: Annotated[Name, Field(max_length=64)] = "standard"
    expires_in: str | None = Field(default=None, max_length=64)
    description: Annotated[str, Field(max_length=256), AfterValidator(check_json_value)] = ""


ADMIN_BODY_LIMIT = 64 * 1024


class KeyAdmin:
    def __init__(
        self,
        store: KeyStore,
        cache: KeyCache,
        tiers: dict[str, int],
        audit: AuditTrail | None = None,
    ) -> None:
        self._store = store
        self._cache = cache
        self._tiers = tiers
        self._audit = audit

    async def _record(self, request: Request, kind: str, detail: dict[str, Any]) -> None:
        """Administrative actions are audited like model calls (the actor's key in clear)."""
        if self._audit is None:
            return
        actor = principal_of(request.scope)
        await self._audit.record(
            AuditRecord(
                kind=kind,
                request_id=request_id_of(request.scope),
                key_id=actor.key_id,
                route=request.url.path,
                status=200,
                detail=detail,
            )
        )

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
        described = info.as_json()
        # The subject a key acts for is personal data: not in the clear metadata.
        await self._record(
            request, KEY_CREATED, {"key": {k: v for k, v in described.items() if k != "subject"}}
        )
        return JSONResponse({**described, "key": key}, status_code=201)

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
        await self._record(request, KEY_REVOKED, {"key_id": key_id})
        return JSONResponse(info.as_json())

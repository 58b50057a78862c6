"""``/admin/keys``: create, list and revoke API keys over HTTP (admins only).

Separation of duties: an ``admin`` key manages keys, but over HTTP it may not mint a key
that reaches further than its own duties: an ``auditor`` key (which decrypts payloads),
another ``admin`` key, or a key bound to a subject the gateway already knows (audit
entries or keys for them: their export and erasure would then be the new key's). Those
need ``keys:manage_privileged``, which no built-in role holds, or a deployment that says
it accepts them (``admin.allow_privileged_keys``). The CLI, which holds the master key,
remains the operator's way to mint them.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import Engine, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from compliance.audit_schema import data_keys
from compliance.keyring import subject_owner
from compliance.records import KEY_CREATED, KEY_REVOKED, AuditRecord
from gateway.asgi import read_body, request_id_of
from gateway.audit_trail import AuditTrail
from gateway.config import Role
from gateway.errors import Forbidden, InvalidRequest, NotFound
from gateway.keys import KeyCache, KeyStore, parse_duration
from gateway.middleware.auth import principal_of
from gateway.schemas import Name, check_json_value, parse_json_model
from gateway.store import ApiKeyRow


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[Role] = Field(min_length=1)
    subject: Name | None = None
    models: list[Name] | None = None
    tier: Annotated[Name, Field(max_length=64)] = "standard"
    expires_in: str | None = Field(default=None, max_length=64)
    description: Annotated[str, Field(max_length=256), AfterValidator(check_json_value)] = ""


ADMIN_BODY_LIMIT = 64 * 1024
PRIVILEGED_ROLES = frozenset({"admin", "auditor"})
PRIVILEGED_PERMISSION = "keys:manage_privileged"
"""Mint privileged keys over HTTP; held by no built-in role (see the module's docstring)."""


class PrivilegedKey(Forbidden):
    code = "privileged_key"


def subject_is_known(engine: Engine, subject: str) -> bool:
    """Whether the subject has audit entries (a data key of theirs) or keys already."""
    with engine.connect() as connection:
        entries = connection.execute(
            select(data_keys.c.id).where(data_keys.c.owner == subject_owner(subject)).limit(1)
        ).first()
        keys = connection.execute(
            select(ApiKeyRow.id).where(ApiKeyRow.subject_id == subject).limit(1)
        ).first()
    return entries is not None or keys is not None


class KeyAdmin:
    def __init__(
        self,
        store: KeyStore,
        cache: KeyCache,
        tiers: dict[str, int],
        audit: AuditTrail | None = None,
        *,
        allow_privileged: bool = False,
    ) -> None:
        self._store = store
        self._cache = cache
        self._tiers = tiers
        self._audit = audit
        self._allow_privileged = allow_privileged

    async def _check_privileged(self, request: Request, spec: CreateKeyRequest) -> None:
        """403 ``privileged_key`` for a key beyond the caller's duties (module docstring)."""
        if self._allow_privileged or principal_of(request.scope).has(PRIVILEGED_PERMISSION):
            return
        how = "mint it with `bastion keys create`, or set admin.allow_privileged_keys"
        privileged = [role for role in spec.roles if role in PRIVILEGED_ROLES]
        if privileged:
            raise PrivilegedKey(
                f"A key with the role '{privileged[0]}' is not minted over HTTP: {how}.",
                param="roles",
            )
        if spec.subject is not None and await asyncio.to_thread(
            subject_is_known, self._store.engine, spec.subject
        ):
            raise PrivilegedKey(
                "A key for a subject who already has audit entries or keys is not minted "
                f"over HTTP (it would control their export and erasure): {how}.",
                param="subject",
            )

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
        await self._check_privileged(request, spec)
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
        await self._record(request, KEY_CREATED, {"key": info.as_audit_json()})
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
        await self._record(request, KEY_REVOKED, {"key_id": key_id})
        return JSONResponse(info.as_json())

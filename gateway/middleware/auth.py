"""Authentication (who is calling) and the per-route permission check (may they).

:class:`AuthenticationMiddleware` turns a ``Bearer`` API key, or a verified client
certificate mapped to a principal, into ``scope["state"]["principal"]``; a key that is
present but malformed, unknown, revoked or expired is refused with 401 at once.
:class:`Guarded` wraps a route's endpoint with the one permission it needs: no
principal is 401, a principal without the permission is 403.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from gateway.asgi import ASGIApp, Receive, Scope, Send
from gateway.config import ROLES, CertificatePrincipal
from gateway.errors import Forbidden, Unauthorized
from gateway.keys import UNKNOWN_KEY, KeyCache
from gateway.rbac import Principal
from gateway.schemas import check_path_params

DEV_PRINCIPAL = Principal(
    key_id="dev",
    roles=frozenset(ROLES),  # every role: authentication is off
    subject_id=None,
    models=None,
    tier="standard",
    via="dev",
)


def certificate_principals(
    entries: list[CertificatePrincipal],
) -> dict[str, Principal]:
    return {
        entry.subject: Principal(
            key_id=f"cert:{entry.subject}",
            roles=frozenset(entry.roles),
            subject_id=entry.subject_id,
            models=frozenset(entry.models) if entry.models is not None else None,
            tier=entry.tier,
            via="certificate",
        )
        for entry in entries
    }


def _bearer(scope: Scope) -> bytes | None:
    for key, value in scope["headers"]:
        if key == b"authorization":
            return value  # type: ignore[no-any-return]
    return None


class _NotCached(Exception):
    """A well-formed key the cache does not hold: the store decides (asynchronously)."""

    def __init__(self, presented: str, now: float) -> None:
        self.presented = presented
        self.now = now


class AuthenticationMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyCache | None,
        certificates: Mapping[str, Principal],
    ) -> None:
        self.app = app
        self._keys = keys
        self._certificates = certificates

    def _principal(self, scope: Scope) -> Principal | None:
        if self._keys is None:
            return DEV_PRINCIPAL
        header = _bearer(scope)
        if header is not None:
            scheme, _, credential = header.partition(b" ")
            if scheme.lower() != b"bearer" or not credential.strip():
                raise Unauthorized(
                    "The Authorization header must be 'Bearer <API key>'.", reason="malformed"
                )
            try:
                presented = credential.strip().decode("ascii")
            except UnicodeDecodeError:
                raise Unauthorized("Malformed API key.", reason="malformed") from None
            now = time.time()
            checked = self._keys.check(presented, now)
            if checked is UNKNOWN_KEY:  # perhaps made a moment ago: the store is asked
                raise _NotCached(presented, now)
            if isinstance(checked, str):
                raise Unauthorized(f"Incorrect API key: {checked}.", reason=checked.split()[0])
            return checked
        if self._certificates:
            tls = scope.get("extensions", {}).get("tls") or {}
            subject = tls.get("client_cert_name")
            if subject is not None:
                return self._certificates.get(subject)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                principal = self._principal(scope)
            except _NotCached as missing:
                assert self._keys is not None
                checked = await self._keys.check_missing(missing.presented, missing.now)
                if isinstance(checked, str):
                    reason = checked.split()[0]
                    raise Unauthorized(f"Incorrect API key: {checked}.", reason=reason) from None
                principal = checked
            scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def principal_of(scope: Scope) -> Principal:
    principal: Principal = scope["state"]["principal"]
    return principal


class Guarded:
    """A route endpoint that needs one permission."""

    def __init__(self, app: ASGIApp, permission: str) -> None:
        self.app = app
        self.permission = permission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.permission != "public":
            principal: Principal | None = scope["state"].get("principal")
            if principal is None:
                raise Unauthorized(
                    "You didn't provide an API key: send 'Authorization: Bearer <API key>'.",
                    reason="missing",
                )
            if not principal.has(self.permission):
                raise Forbidden(f"Your key's roles do not allow this ({self.permission}).")
        check_path_params(scope.get("path_params", {}))
        await self.app(scope, receive, send)

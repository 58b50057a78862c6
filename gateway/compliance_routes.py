"""The compliance officer's audit routes and the Art. 30 record of processing activities.

``GET /compliance/audit`` pages through entries (metadata only unless ``payloads=true``
with a ``reason``: opening payloads is itself recorded, durably, before the answer);
``GET /compliance/audit/verify`` runs the verifier in a thread and always answers 200,
the verdict being the body; ``GET /compliance/processing-record`` is generated from the
live configuration.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from compliance.audit_query import AuditFilter, BadCursor, query_page
from compliance.keyring import KeyRing
from compliance.processing_record import ProcessingFacts, processing_record
from compliance.reader import AuditReader, PayloadUnavailable
from compliance.records import CONTENT_VIEWED, AuditRecord
from compliance.verify import LogVerifier
from gateway.asgi import request_id_of
from gateway.audit_trail import AuditTrail
from gateway.config import Settings
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.middleware.auth import principal_of
from gateway.query_params import limit_param, time_param
from gateway.schemas import check_name, query_name

_TRUE = {"1", "true", "yes"}


def processing_facts(settings: Settings) -> ProcessingFacts:
    """What the configuration says about the processing (Art. 30, Art. 15)."""
    controller = getattr(settings, "controller", None)
    controller_json: dict[str, Any] = (
        controller.model_dump() if controller is not None else {"name": None, "contact": None}
    )
    tls = settings.server.tls
    return ProcessingFacts(
        controller=controller_json,
        recipients=[
            {
                "name": u.name,
                "url": str(u.url),
                "models": list(u.models),
                "kind": "inference upstream",
            }
            for u in settings.upstreams
        ],
        retention_days=settings.audit.retention_days,
        payloads_kept=settings.audit.payloads,
        tls=tls is not None,
        mutual_tls=tls is not None and tls.client_cert != "none",
        authentication=settings.auth.enabled,
        rate_limits=settings.rate_limits.enabled,
        audit_log=settings.audit.enabled,
    )


class ComplianceRoutes:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        master_key: bytes,
        signing_key: Ed25519PrivateKey | None,
        audit: AuditTrail | None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._keyring = KeyRing(engine, master_key)
        self._reader = AuditReader(engine, self._keyring)
        self._signing_key = signing_key
        self._audit = audit

    async def query(self, request: Request) -> Response:
        params = request.query_params
        where = AuditFilter(
            subject_id=query_name(params, "subject"),
            key_id=query_name(params, "key"),
            request_id=query_name(params, "request_id"),
            kinds=[check_name(kind, "kind") for kind in params.getlist("kind")] or None,
            since_us=time_param(request, "since"),
            until_us=time_param(request, "until"),
        )
        with_payloads = params.get("payloads", "").lower() in _TRUE
        reason = params.get("reason") or ""
        reason = check_name(reason, "reason", 1024).strip() if reason else ""
        if with_payloads and not reason:
            raise InvalidRequest("payloads=true needs a non-empty reason", param="reason")
        if with_payloads and self._audit is None:
            raise ServiceUnavailable(
                "The audit log is disabled: decrypted views cannot be recorded."
            )
        try:
            page = await asyncio.to_thread(
                query_page,
                self._engine,
                self._keyring,
                where,
                limit=limit_param(request),
                cursor=params.get("cursor"),
            )
        except BadCursor:
            raise InvalidRequest("cursor: not one this API returned", param="cursor") from None
        data = [entry.as_json() for entry in page.entries]
        if with_payloads:
            opened = [e for e in page.entries if e.payload is not None]
            if self._audit is not None:  # durable before any content goes out
                actor = principal_of(request.scope)
                await self._audit.record(
                    AuditRecord(
                        kind=CONTENT_VIEWED,
                        request_id=request_id_of(request.scope),
                        key_id=actor.key_id,
                        route=request.url.path,
                        status=200,
                        detail={"reason": reason, "entries": [e.id for e in opened]},
                    )
                )
            payloads = await asyncio.to_thread(self._open_all, page.entries)
            for item, payload in zip(data, payloads, strict=True):
                item.update(payload)
        return JSONResponse({"object": "list", "data": data, "next_cursor": page.next_cursor})

    def _open_all(self, found: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for entry in found:
            if entry.payload is None:
                out.append({"payload": None})
                continue
            try:
                out.append({"payload": self._reader.payload(entry)})
            except PayloadUnavailable as exc:
                out.append({"payload": None, "payload_unavailable": exc.reason})
        return out

    async def verify(self, request: Request) -> Response:
        if self._signing_key is None:
            raise ServiceUnavailable("No audit signing key is configured to verify against.")
        verifier = LogVerifier(self._engine, [self._signing_key.public_key()])
        report = await asyncio.to_thread(verifier.verify)
        if not report.ok:
            problem = report.problems[0]
            entry = f"{problem.writer_id}:{problem.seq}" if problem.seq is not None else None
            body: dict[str, Any] = {
                "ok": False,
                "first_problem": {
                    "entry": entry,
                    "chain": problem.writer_id,
                    "checkpoint": problem.checkpoint_id,
                    "reason": problem.reason,
                    "text": str(problem),
                },
                "problems": len(report.problems),
                "unsigned": report.unsigned,
            }
        else:
            body = {
                "ok": True,
                "entries": report.entries,
                "checkpoints": report.checkpoints,
                "chains": len(report.chains),
                "unsigned": report.unsigned,
            }
        return JSONResponse(body)

    async def processing_record(self, request: Request) -> Response:
        return JSONResponse(processing_record(processing_facts(self._settings)))

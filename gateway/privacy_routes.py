"""Data-subject rights over HTTP: access/export, rectification, erasure, restriction, CCPA.

Each route is open to ``privacy:manage`` (the compliance officer) and, through
``privacy:self``, to the subject themself: a key whose subject is the ``{subject_id}``
in the path (:class:`SubjectGuarded`). Every request goes into the ledger with its
legal deadline (compliance/privacy_ledger.py) and into the audit log.

Erasure order matters: the ``subject.erased`` entry is made durable first (it carries
the subject's pseudonym; made afterwards it would create a new data key linked to the
subject), then the subject's API keys are revoked and unlinked, the profile and flags
deleted with a tombstone left, and the data key destroyed (crypto-shredding). The answer
is a receipt signed with the audit signing key.

The access export is streamed: its audit entries are read, decrypted and sent a page at a
time (compliance/subject_export.py), however many there are.

The ledger's routes (``/privacy/requests``) are in gateway/privacy_requests.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import func
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from compliance.audit_writer import AuditWriteError, AuditWriterClosed
from compliance.erasure_receipt import sign_receipt
from compliance.keyring import KeyRing, subject_owner
from compliance.privacy_ledger import BLOCKED, RequestLedger
from compliance.privacy_store import PrivacyStore, subject_ref
from compliance.processing_record import subject_information
from compliance.records import SUBJECT_ERASED, AuditRecord, now_us
from compliance.subject_export import PAGE_SIZE, json_document, subject_entries
from gateway.asgi import Receive, Scope, Send, read_body, request_id_of
from gateway.audit_trail import AuditTrail, AuditUnavailable
from gateway.compliance_routes import processing_facts
from gateway.config import Settings
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.keys import KeyCache
from gateway.middleware.auth import Guarded, principal_of
from gateway.privacy_requests import Conflict, LedgerRoutes, Reason
from gateway.rbac import Principal
from gateway.restrictions import RestrictionCache
from gateway.schemas import check_json_value, check_path_params, parse_json_model
from gateway.store import ApiKeyRow

log = logging.getLogger("bastion.privacy")
BODY_LIMIT = 64 * 1024


class SubjectGuarded(Guarded):
    """``privacy:manage``, or ``privacy:self``: the caller's key acts for this very subject."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal: Principal | None = scope["state"].get("principal")
        subject = scope.get("path_params", {}).get("subject_id")
        if (
            principal is not None
            and not principal.has(self.permission)
            and principal.subject_id is not None
            and principal.subject_id == subject
        ):
            check_path_params(scope["path_params"])
            await self.app(scope, receive, send)  # privacy:self
            return
        await super().__call__(scope, receive, send)


class Rectification(BaseModel):
    """Checked whole before the ledger or the profile is touched: a value the store could
    not keep or serve again (a 20-digit integer, ``1e400``, a NUL) is a 400, not a
    request left open or a profile saved and then unreadable."""

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(default=None, max_length=256)
    email: str | None = Field(default=None, max_length=320)
    attributes: dict[str, Any] | None = None
    note: str | None = Field(default=None, max_length=512)

    @field_validator("display_name", "email", "attributes", "note")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return check_json_value(value)


class DoNotSell(BaseModel):
    model_config = ConfigDict(extra="forbid")

    do_not_sell: bool = True


def _key_json(row: ApiKeyRow) -> dict[str, Any]:
    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": row.id,
        "roles": row.roles,
        "models": row.models,
        "tier": row.tier,
        "description": row.description,
        "created_at": when(row.created_at),
        "expires_at": when(row.expires_at),
        "revoked_at": when(row.revoked_at),
    }


class PrivacyRoutes:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        master_key: bytes,
        tombstone_key: bytes,
        signing_key: Ed25519PrivateKey | None,
        audit: AuditTrail | None,
        key_cache: KeyCache,
        restrictions: RestrictionCache,
        ledger: RequestLedger | None = None,
        erase_events: Callable[[str], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        """``erase_events``: deletes a subject's shipped request events (the cluster and
        the spool) and says what it deleted where; None when events are not shipped."""
        self._settings = settings
        self._erase_events = erase_events
        self._engine = engine
        self._keyring = KeyRing(engine, master_key)
        self.export_page = PAGE_SIZE
        self._tombstone_key = tombstone_key
        self._signing_key = signing_key
        self._audit = audit
        self._keys = key_cache
        self._restrictions = restrictions
        self.store = PrivacyStore(engine)
        self.ledger = ledger or RequestLedger(engine)
        # The ledger's own routes (gateway/privacy_requests.py), by the names app.py wires.
        self.requests = LedgerRoutes(
            self.ledger, self.store, tombstone_key, self._record, self._body
        )
        self.list_requests = self.requests.list
        self.log_request = self.requests.log
        self.complete_request = self.requests.complete
        self.extend_request = self.requests.extend

    async def _record(
        self, request: Request, kind: str, subject: str | None, detail: dict[str, Any]
    ) -> str | None:
        """Audit the action (durably, before the answer); the entry id, or None."""
        if self._audit is None:
            return None
        route = request.scope.get("route")
        record = AuditRecord(
            kind=kind,
            request_id=request_id_of(request.scope),
            key_id=principal_of(request.scope).key_id,
            subject_id=subject,
            # The template, never the path: a subject id is not stored in clear.
            route=route.path if route is not None else None,
            status=200,
            detail=detail,
        )
        try:
            ref = await self._audit.writer.append(record)
        except (AuditWriteError, AuditWriterClosed) as exc:
            raise AuditUnavailable("The audit log cannot record this request; try again.") from exc
        return ref.id

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await read_body(request.scope, request.receive, BODY_LIMIT)
        return parse_json_model(raw or b"{}", model)

    # -- access and portability (Art. 15, 20) --------------------------------------

    async def access(self, request: Request) -> Response:
        subject = request.path_params["subject_id"]
        ref = subject_ref(self._tombstone_key, subject)
        receipt = await asyncio.to_thread(self.store.tombstone, ref)
        if receipt is not None:  # recorded without the subject: no new link to them
            await self._record(request, "subject.accessed", None, {"erased": True})
            return JSONResponse({"subject": subject, "erased": True, "erasure_receipt": receipt})
        row = await asyncio.to_thread(self.ledger.open, "access", subject)
        await self._record(request, "subject.accessed", subject, {"ledger": row.id})
        head = await asyncio.to_thread(self._export_head, subject)
        pages = subject_entries(self._engine, self._keyring, subject, page_size=self.export_page)
        # The first page before the answer starts: a failure there is still a clean error.
        first = await asyncio.to_thread(next, pages)

        def tail() -> dict[str, Any]:  # once every entry is out: the request is answered
            self.ledger.close(row.id)
            return {"requests": [r.as_json() for r in self.ledger.list(subject_id=subject)]}

        # A sync iterator: Starlette draws each piece in a worker thread, off the loop.
        body = json_document(head, "audit_entries", itertools.chain([first], pages), tail)
        return StreamingResponse(body, media_type="application/json")

    def _export_head(self, subject: str) -> dict[str, Any]:
        with Session(self._engine) as session:
            keys = session.scalars(
                select(ApiKeyRow).where(ApiKeyRow.subject_id == subject).order_by(ApiKeyRow.id)
            )
            api_keys = [_key_json(k) for k in keys]
        return {
            "format": "bastion.subject-export.v1",
            "generated_at": datetime.now(UTC).isoformat(),
            "subject": subject,
            "profile": self.store.profile(subject),
            "profile_history": self.store.profile_history(subject),
            "flags": self.store.flags(subject).as_json(),
            "api_keys": api_keys,
            "information": subject_information(processing_facts(self._settings)),
        }

    # -- rectification (Art. 16) ----------------------------------------------------

    async def rectify(self, request: Request) -> Response:
        subject = request.path_params["subject_id"]
        spec: Rectification = await self._body(request, Rectification)
        changes = spec.model_dump(exclude_none=True, exclude={"note"})
        if not changes:
            raise InvalidRequest("Nothing to rectify: give display_name, email or attributes.")
        row = await asyncio.to_thread(self.ledger.open, "rectification", subject)
        actor = principal_of(request.scope).key_id
        result = await asyncio.to_thread(
            self.store.rectify, subject, changes, actor=actor, note=spec.note
        )
        await self._record(
            request,
            "subject.rectified",
            subject,
            {"ledger": row.id, "version": result["version"], "fields": sorted(changes)},
        )
        await asyncio.to_thread(self.ledger.close, row.id)
        history = await asyncio.to_thread(self.store.profile_history, subject)
        return JSONResponse({"subject": subject, "profile": result["data"], "history": history})

    # -- erasure (Art. 17) ----------------------------------------------------------

    async def erase(self, request: Request) -> Response:
        subject = request.path_params["subject_id"]
        if self._audit is None or self._signing_key is None:
            raise ServiceUnavailable("Erasure needs the audit log and its signing key.")
        row = await asyncio.to_thread(self.ledger.open, "erasure", subject)
        hold = (await asyncio.to_thread(self.store.flags, subject)).legal_hold
        if hold is not None:
            await asyncio.to_thread(self.ledger.close, row.id, BLOCKED, f"legal hold: {hold}")
            await self._record(request, "subject.erasure_blocked", subject, {"ledger": row.id})
            raise Conflict(
                f"Erasure is blocked by a legal hold (Art. 17(3)): {hold}", code="legal_hold"
            )
        entry = await self._record(request, SUBJECT_ERASED, subject, {"ledger": row.id})
        revoked = await asyncio.to_thread(self._revoke_keys, subject)
        await self._keys.refresh()
        events = None if self._erase_events is None else await self._erase_events(subject)
        receipt = await asyncio.to_thread(self._shred, subject, row.id, entry, revoked, events)
        await self._restrictions.refresh()
        return JSONResponse(receipt)

    def _revoke_keys(self, subject: str) -> list[str]:
        """Revoke the subject's keys and drop the link (the rows stay: key ids are in the log)."""
        with self._engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("PRAGMA secure_delete=ON")
            ids = list(
                connection.scalars(select(ApiKeyRow.id).where(ApiKeyRow.subject_id == subject))
            )
            connection.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.subject_id == subject, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
            connection.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.subject_id == subject)
                .values(subject_id=None, description="", updated_at=func.now())
            )
        return ids

    def _shred(
        self,
        subject: str,
        ledger_id: str,
        entry: str | None,
        revoked: list[str],
        events: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        assert self._signing_key is not None
        ref = subject_ref(self._tombstone_key, subject)
        pseudonyms = self._keyring.ids_for(subject_owner(subject))
        erased_us = now_us()
        body: dict[str, Any] = {
            "subject_ref": ref,
            "subject_pseudonyms": pseudonyms,
            "erased_us": erased_us,
            "erased_at": datetime.fromtimestamp(erased_us / 1e6, UTC).isoformat(),
            "audit_entry": entry,
            "ledger_request": ledger_id,
            "destroyed": {
                "data_keys": len(pseudonyms),
                "api_keys_revoked": revoked,
                "profile": True,
                "flags": True,
            },
        }
        if events is not None:  # the shipped request events: cluster and spool
            body["destroyed"]["events"] = events
        receipt = sign_receipt(self._signing_key, body)
        removed = self.store.erase(subject, ref, receipt)
        self.ledger.pseudonymise(subject, f"erased:{ref}")
        self.ledger.close(ledger_id)
        # The writer's keyring too: it must drop its cached copy of the key.
        assert self._audit is not None
        shred = self._audit.writer.keyring.destroy_subject(subject)
        log.info("erased a subject: %s, %d data key(s)", removed, shred.keys)
        return receipt

    # -- restriction (Art. 18), CCPA, legal hold ---------------------------------------

    async def restrict(self, request: Request) -> Response:
        return await self._set_restriction(request, True)

    async def lift_restriction(self, request: Request) -> Response:
        return await self._set_restriction(request, False)

    async def _set_restriction(self, request: Request, on: bool) -> Response:
        subject = request.path_params["subject_id"]
        spec: Reason = await self._body(request, Reason)
        row = await asyncio.to_thread(
            self.ledger.open, "restriction" if on else "lift_restriction", subject
        )
        flags = await asyncio.to_thread(
            self.store.set_flags, subject, restricted=on, restricted_reason=spec.reason or None
        )
        kind = "subject.restricted" if on else "subject.unrestricted"
        await self._record(request, kind, subject, {"ledger": row.id})
        await asyncio.to_thread(self.ledger.close, row.id)
        await self._restrictions.refresh()  # this process at once, the others within refresh_s
        return JSONResponse({"subject": subject, **flags.as_json()})

    async def do_not_sell(self, request: Request) -> Response:
        subject = request.path_params["subject_id"]
        spec: DoNotSell = await self._body(request, DoNotSell)
        row = await asyncio.to_thread(self.ledger.open, "do_not_sell", subject)
        flags = await asyncio.to_thread(self.store.set_flags, subject, do_not_sell=spec.do_not_sell)
        await self._record(
            request, "subject.do_not_sell", subject, {"ledger": row.id, "value": spec.do_not_sell}
        )
        await asyncio.to_thread(self.ledger.close, row.id)
        return JSONResponse({"subject": subject, **flags.as_json()})

    async def set_legal_hold(self, request: Request) -> Response:
        subject = request.path_params["subject_id"]
        spec: Reason = await self._body(request, Reason)
        if not spec.reason.strip():
            raise InvalidRequest("A legal hold needs a reason.", param="reason")
        flags = await asyncio.to_thread(self.store.set_flags, subject, legal_hold=spec.reason)
        await self._record(request, "subject.legal_hold", subject, {"set": True})
        return JSONResponse({"subject": subject, **flags.as_json()})

    async def clear_legal_hold(self, request: Request) -> Response:
        subject = request.path_params["subject_id"]
        flags = await asyncio.to_thread(self.store.set_flags, subject, legal_hold=None)
        await self._record(request, "subject.legal_hold", subject, {"set": False})
        return JSONResponse({"subject": subject, **flags.as_json()})

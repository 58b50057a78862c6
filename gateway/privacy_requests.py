"""The request ledger over HTTP (GDPR Art. 12(3)), for the compliance officer.

``GET /privacy/requests`` lists requests and their deadlines; requests that arrive by
letter, e-mail or phone are logged with the day they were received
(``POST /privacy/requests``: the deadline runs from receipt) and closed by hand once
answered (``POST /privacy/requests/{id}/complete``); ``.../extend`` adds two months.
Each change is recorded in the audit log before the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from compliance.privacy_ledger import (
    CHANNELS,
    REFUSED,
    ExtensionRefused,
    LedgerRefused,
    RequestLedger,
)
from compliance.privacy_store import PrivacyStore, subject_ref
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.schemas import Name, query_name

Recorder = Callable[[Request, str, str | None, dict[str, Any]], Awaitable[str | None]]
"""Audits an action durably: ``(request, kind, subject or None, detail)``."""
BodyReader = Callable[[Request, type[BaseModel]], Awaitable[Any]]


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=512)


Right = Literal[
    "access",
    "rectification",
    "erasure",
    "restriction",
    "objection",
    "portability",
    "do_not_sell",
    "do-not-sell",
]
Channel = Literal["letter", "email", "phone", "in_person", "other"]
assert get_args(Channel) == CHANNELS


class LoggedRequest(BaseModel):
    """A request received outside the API, as the compliance officer logs it."""

    model_config = ConfigDict(extra="forbid")

    subject: Name
    right: Right
    received: datetime | date
    """The day (or moment) it arrived; the deadline runs from it. A day means 00:00 UTC."""
    channel: Channel
    note: str | None = Field(default=None, max_length=1024)


class Completion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["completed", "refused"] = "completed"
    reason: str | None = Field(default=None, max_length=1024)


class LedgerRoutes:
    def __init__(
        self,
        ledger: RequestLedger,
        store: PrivacyStore,
        tombstone_key: bytes,
        record: Recorder,
        body: BodyReader,
    ) -> None:
        self._ledger = ledger
        self._store = store
        self._tombstone_key = tombstone_key
        self._record = record
        self._body = body

    async def list(self, request: Request) -> Response:
        params = request.query_params
        rows = await asyncio.to_thread(
            self._ledger.list,
            subject_id=query_name(params, "subject"),
            status=query_name(params, "status"),
        )
        return JSONResponse({"object": "list", "data": [r.as_json() for r in rows]})

    async def log(self, request: Request) -> Response:
        """A request received by letter, e-mail, phone...: into the ledger, due from receipt."""
        spec: LoggedRequest = await self._body(request, LoggedRequest)
        received = spec.received
        if not isinstance(received, datetime):
            received = datetime(received.year, received.month, received.day, tzinfo=UTC)
        right = spec.right.replace("-", "_")
        # An erased subject is logged by their reference: no new link to them.
        ref = subject_ref(self._tombstone_key, spec.subject)
        erased = await asyncio.to_thread(self._store.tombstone, ref) is not None
        subject = f"erased:{ref}" if erased else spec.subject
        try:
            row = await asyncio.to_thread(
                self._ledger.log, right, subject, received, spec.channel, spec.note
            )
        except LedgerRefused as exc:  # the right and channel were checked above: the date
            raise InvalidRequest(f"{exc}.", param="received") from None
        detail = {"ledger": row.id, "type": right, "channel": spec.channel}
        await self._record(request, "privacy.request_logged", None if erased else subject, detail)
        return JSONResponse(row.as_json(), status_code=201)

    async def complete(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        spec: Completion = await self._body(request, Completion)
        try:
            row = await asyncio.to_thread(
                self._ledger.complete, request_id, spec.status, spec.reason
            )
        except KeyError:
            raise NotFound(f"There is no request '{request_id}'.") from None
        except LedgerRefused as exc:
            if spec.status == REFUSED and not (spec.reason or "").strip():
                raise InvalidRequest(f"{exc}.", param="reason") from None
            raise Conflict(f"Cannot close the request: {exc}.", code="request_closed") from None
        await self._record(
            request, "privacy.request_completed", None, {"ledger": row.id, "status": row.status}
        )
        return JSONResponse(row.as_json())

    async def extend(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        spec: Reason = await self._body(request, Reason)
        try:
            row = await asyncio.to_thread(self._ledger.extend, request_id, spec.reason)
        except KeyError:
            raise NotFound(f"There is no request '{request_id}'.") from None
        except ExtensionRefused as exc:
            raise Conflict(f"Extension refused: {exc}.", code="extension_refused") from exc
        await self._record(request, "privacy.request_extended", None, {"ledger": row.id})
        return JSONResponse(row.as_json())

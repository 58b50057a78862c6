"""The gateway's side of the audit log: one entry per model call, durable before it completes.

:class:`AuditTrail` owns this process's :class:`~compliance.audit_writer.AuditWriter` (its
own hash chain, group commit in a background thread). Each model call gets a
:class:`CallRecord` that the proxy completes **before the last byte of the answer goes
out**: the final body of a whole answer, or the final chunk of a stream, is sent only once
the entry is committed. A client that saw a complete answer can therefore rely on its
entry existing, even if the gateway is killed the next instant; a commit that fails turns
the answer into a 503 instead (nothing acknowledged goes unrecorded). Calls refused before
forwarding (403, 404, 429...) are recorded before their error goes out, calls cut short
(client gone, upstream failure mid-stream) right after, with what was delivered.

Payloads (the request body, the answer or the stream's events as delivered) are sealed
under the caller's data key by the compliance package; with ``audit.payloads: false``
only the metadata is kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine

from compliance.appender import CheckpointPolicy
from compliance.audit_writer import AuditWriteError, AuditWriter, AuditWriterClosed
from compliance.chain import default_writer_id
from compliance.records import REQUEST, AuditRecord
from gateway.config import AuditSettings
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.guards.call_summary import guard_summary
from gateway.pipeline import CallContext
from gateway.store_probe import StoreProbe
from gateway.watermark.answer_filter import STATE_KEY as WATERMARK_STATE
from monitors.metrics_sink import AuditMetrics

log = logging.getLogger("bastion.audit")


class AuditUnavailable(ServiceUnavailable):
    code = "audit_unavailable"


class AuditTrail:
    """This process's audit writer, started in the app's lifespan."""

    def __init__(
        self,
        settings: AuditSettings,
        engine: Engine,
        master_key: bytes,
        signing_key: Ed25519PrivateKey,
    ) -> None:
        self.settings = settings
        self._engine = engine
        self._master_key = master_key
        self._signing_key = signing_key
        self._writer: AuditWriter | None = None

    @property
    def writer(self) -> AuditWriter:
        if self._writer is None:
            raise RuntimeError("the audit trail is not started")
        return self._writer

    async def start(self) -> None:
        policy = CheckpointPolicy(
            self.settings.checkpoint_every_entries, self.settings.checkpoint_every_s
        )
        # One chain per process: the host and pid say whose it is (compliance.chain's
        # rule, which makes any host name a valid id).
        writer_id = default_writer_id()
        self._writer = await asyncio.to_thread(
            AuditWriter.open,
            self._engine,
            self._master_key,
            self._signing_key,
            writer_id=writer_id,
            policy=policy,
            queue_size=self.settings.queue_size,
            observer=AuditMetrics(),
        )
        log.info("audit log: writing chain %s", writer_id)

    async def stop(self) -> None:
        if self._writer is not None:
            await self._writer.aclose()

    async def record(self, record: AuditRecord) -> None:
        """Append ``record`` and wait until it is durable; 503 if it cannot be."""
        try:
            await self.writer.append(record)
        except (AuditWriteError, AuditWriterClosed) as exc:
            log.error("audit entry for %s not written: %s", record.request_id, exc)
            raise AuditUnavailable("The audit log cannot record this call; try again.") from exc

    async def complete(self, call: CallContext) -> None:
        """The call's entry, durable before its answer's last byte (DurableSink)."""
        event = call.event
        refused = call.upstream_started is None and event.status >= 400
        payload: dict[str, Any] | None = None
        if self.settings.payloads:
            payload = _refusal_payload(call) if refused else _call_payload(call)
        ttft = None if call.first_byte is None else call.first_byte - call.started
        guard = ";".join(
            f"{v.stage}:{v.scanner}={v.action}" for v in event.guard_verdicts if v.action != "pass"
        )
        record = AuditRecord(
            kind=REQUEST,
            time_us=event.time_us,
            request_id=event.request_id,
            key_id=event.key_id,
            subject_id=event.subject_id,
            model=event.model_served or event.model,
            route=event.route,
            status=event.status,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            latency_us=int(event.duration_s * 1e6),
            ttft_us=None if ttft is None else int(ttft * 1e6),
            guard=guard[:_GUARD_CHARS] or None,
            watermark=call.state.get(WATERMARK_STATE),
            detail={"client_request_id": cid} if (cid := event.client_request_id) else None,
            payload=payload,
        )
        await self.record(record)


class AuditCheck:
    """Before anything is forwarded: the call must be recordable (a request check).

    An entry is written after the upstream answered, so whatever could stop it must be
    found before: a request the audit's encoder cannot take (orjson stops at 254 levels
    of nesting) is refused with 400, and a store that does not answer (its probe) or a
    writer that takes no more entries with 503.
    """

    def __init__(self, trail: AuditTrail, store: StoreProbe) -> None:
        self._trail = trail
        self._store = store

    async def check(self, call: CallContext) -> None:
        if not self._store.up or not self._trail.writer.accepting:
            raise AuditUnavailable("The audit log cannot record this call; try again.")
        if self._trail.settings.payloads:
            try:
                orjson.dumps(call.request, option=_ENCODING)
            except orjson.JSONEncodeError as exc:
                raise InvalidRequest(
                    f"The request cannot be recorded in the audit log ({exc}).",
                    code="unrecordable_request",
                ) from exc


# The record's guard summary is a text column of bounded width (compliance.records).
_GUARD_CHARS = 200
_ENCODING = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
# Refusals keep what identifies the request, not the request: a client refused for its
# rate or its key cannot make the audit store grow with the bodies it sends.
_EXCERPT_BYTES = 512


def _call_payload(call: CallContext) -> dict[str, Any]:
    payload: dict[str, Any] = {"request": call.request}
    guards = guard_summary(call)
    if guards is not None:  # what was scanned, found and changed (descriptions, no matches)
        payload["guards"] = guards
    if call.answer is not None:
        payload["response"] = _json_or_text(call.answer)
    cut = call.event.cut
    if call.delivered or cut is not None:
        payload["delivered"] = b"".join(call.delivered).decode("utf-8", "replace")
    if cut is not None:
        payload["cut"] = cut
    return payload


def _refusal_payload(call: CallContext) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "request_sha256": hashlib.sha256(call.raw).hexdigest(),
        "request_bytes": len(call.raw),
        "request_excerpt": call.raw[:_EXCERPT_BYTES].decode("utf-8", "replace"),
    }
    if call.answer is not None:
        payload["response"] = _json_or_text(call.answer)
    return payload


def _json_or_text(body: bytes) -> Any:
    """The answer as JSON when it is JSON the record can encode, else as text."""
    try:
        value = orjson.loads(body)
        orjson.dumps(value, option=_ENCODING)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return body.decode("utf-8", "replace")
    return value

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
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine

from compliance.appender import CheckpointPolicy
from compliance.audit_writer import AuditWriteError, AuditWriter, AuditWriterClosed
from compliance.records import REQUEST, AuditRecord
from gateway.config import AuditSettings
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.rbac import Principal

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
        # One chain per process: the host and pid say whose it is.
        writer_id = f"{socket.gethostname()[:40]}-{os.getpid()}-{os.urandom(3).hex()}"
        self._writer = await asyncio.to_thread(
            AuditWriter.open,
            self._engine,
            self._master_key,
            self._signing_key,
            writer_id=writer_id,
            policy=policy,
            queue_size=self.settings.queue_size,
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

    def call(
        self, principal: Principal, route: str, request_id: str, body: dict[str, Any]
    ) -> CallRecord:
        return CallRecord(
            self,
            principal=principal,
            route=route,
            request_id=request_id,
            request=body if self.settings.payloads else None,
        )


@dataclass(slots=True)
class CallRecord:
    """One model call on its way through the gateway; becomes one audit entry."""

    trail: AuditTrail
    principal: Principal
    route: str
    request_id: str
    request: dict[str, Any] | None
    model: str | None = None
    started: float = field(default_factory=time.perf_counter)
    started_us: int = field(default_factory=lambda: time.time_ns() // 1000)
    first_byte: float | None = None
    delivered: list[bytes] = field(default_factory=list)
    """Stream events sent so far (kept only when payloads are)."""
    recorded: bool = False

    def note_delivered(self, events: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
        if self.request is not None and events:
            self.delivered.append(events)

    async def complete(
        self,
        status: int,
        *,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        watermark: bytes | None,
        answer: bytes | None = None,
        cut: str | None = None,
    ) -> None:
        """Write the entry and wait for it to be durable (once per call)."""
        if self.recorded:
            return
        self.recorded = True
        payload: dict[str, Any] | None = None
        if self.request is not None:
            payload = {"request": self.request}
            if answer is not None:
                payload["response"] = _json_or_text(answer)
            if self.delivered or cut is not None:
                payload["delivered"] = b"".join(self.delivered).decode("utf-8", "replace")
            if cut is not None:
                payload["cut"] = cut
        now = time.perf_counter()
        ttft = None if self.first_byte is None else self.first_byte - self.started
        record = AuditRecord(
            kind=REQUEST,
            time_us=self.started_us,
            request_id=self.request_id,
            key_id=self.principal.key_id,
            subject_id=self.principal.subject_id,
            model=self.model,
            route=self.route,
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_us=int((now - self.started) * 1e6),
            ttft_us=None if ttft is None else int(ttft * 1e6),
            watermark=None if watermark is None else watermark.decode("ascii", "replace"),
            payload=payload,
        )
        await self.trail.record(record)

    async def refused(self, error: GatewayError) -> None:
        """A call answered with an error before or instead of forwarding."""
        await self.complete(
            error.status,
            prompt_tokens=None,
            completion_tokens=None,
            watermark=None,
            answer=error.body(),
        )


def _json_or_text(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")

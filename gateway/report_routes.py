"""``POST /compliance/exports`` (signed bundle) and ``GET /compliance/reports/ai-act``.

Thin HTTP glue over :mod:`compliance.export_bundle` and :mod:`compliance.ai_act_report`:
parse, call the builder off the event loop, record the export in the audit log (durable
before the answer), answer. The bundle is the response body (``application/x-tar``), built
in a temporary directory that is removed once it has been sent.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from compliance import ai_act_report
from compliance.audit_writer import AuditWriteError, AuditWriterClosed
from compliance.export_bundle import ExportError, ExportQuery, build_export, export_records
from compliance.keyring import KeyRing
from compliance.records import AuditRecord, EntryRef
from gateway.asgi import read_body, request_id_of
from gateway.audit_trail import AuditTrail, AuditUnavailable
from gateway.config import Settings
from gateway.credentials import load_audit_signing_key, load_master_key
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.middleware.auth import principal_of
from gateway.rbac import ROLE_PERMISSIONS
from gateway.schemas import parse_json_model
from monitors.multiprocess import exposition_registry

EXPORT_BODY_LIMIT = 256 * 1024


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: datetime
    until: datetime
    subjects: list[str] | None = Field(default=None, max_length=10_000)
    keys: list[str] | None = Field(default=None, max_length=10_000)
    payloads: bool = False
    reason: str | None = Field(default=None, max_length=2000)
    third_party: bool = False


def _us(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


class ComplianceReports:
    """Exports and the AI Act report, for callers holding ``audit:read``."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        audit: AuditTrail | None,
        sinks: Callable[[], dict[str, str]] = dict,
    ) -> None:
        """``sinks``: the running gateway's event sinks by name, with what each does now."""
        self._settings = settings
        self._engine = engine
        self._audit = audit
        self._sinks = sinks

    async def export(self, request: Request) -> Response:
        raw = await read_body(request.scope, request.receive, EXPORT_BODY_LIMIT)
        spec = parse_json_model(raw, ExportRequest)
        if spec.payloads and not (spec.reason or "").strip():
            raise InvalidRequest("A reason is required to export payloads.", param="reason")
        try:
            query = ExportQuery(
                _us(spec.since),
                _us(spec.until),
                tuple(spec.subjects) if spec.subjects is not None else None,
                tuple(spec.keys) if spec.keys is not None else None,
                spec.payloads,
                spec.reason,
                spec.third_party,
            )
        except ExportError as exc:
            raise InvalidRequest(f"{str(exc).capitalize()}.") from exc
        if self._audit is None:
            raise ServiceUnavailable("Exports need the audit log, and audit.enabled is false.")
        master_key = load_master_key(self._settings)
        signing_key = load_audit_signing_key(self._settings)
        directory = Path(tempfile.mkdtemp(prefix="bastion-export-"))
        try:
            result = await asyncio.to_thread(
                build_export,
                self._engine,
                KeyRing(self._engine, master_key),
                signing_key,
                query,
                directory,
            )
            principal = principal_of(request.scope)
            refs = []
            for record in export_records(
                query,
                result,
                key_id=principal.key_id,
                request_id=request_id_of(request.scope),
                route=request.url.path,
            ):
                refs.append(await self._record(record))
        except ExportError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise ServiceUnavailable(f"The export cannot be made: {exc}.") from exc
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return FileResponse(
            result.path,
            media_type="application/x-tar",
            filename=result.path.name,
            headers={
                "x-bastion-export-id": result.export_id,
                "x-bastion-export-entry": str(refs[-1]),
                "x-bastion-manifest-sha256": result.manifest_sha256,
            },
            background=BackgroundTask(shutil.rmtree, directory, ignore_errors=True),
        )

    async def _record(self, record: AuditRecord) -> EntryRef:
        """Durable before the answer, as AuditTrail.record; the entry's id is returned."""
        assert self._audit is not None
        try:
            return await self._audit.writer.append(record)
        except (AuditWriteError, AuditWriterClosed) as exc:
            raise AuditUnavailable("The audit log cannot record this export; try again.") from exc

    async def ai_act(self, request: Request) -> Response:
        fmt = request.query_params.get("format")
        if fmt is None:
            accept = request.headers.get("accept", "")
            fmt = "html" if "text/html" in accept else "markdown"
        if fmt not in ("markdown", "md", "html"):
            raise InvalidRequest("format must be markdown or html.", param="format")
        try:
            days = int(request.query_params.get("days", "30"))
        except ValueError:
            days = 0
        if not 1 <= days <= 3660:
            raise InvalidRequest("days must be a whole number from 1 to 3660.", param="days")
        figures = await asyncio.to_thread(ai_act_report.measure, self._engine, days)
        text = ai_act_report.render_markdown(self.facts(), figures, figures.until_us)
        if fmt == "html":
            page = ai_act_report.render_html(text)
            return Response(page, media_type="text/html; charset=utf-8")
        return Response(text, media_type="text/markdown; charset=utf-8")

    def facts(self) -> ai_act_report.SystemFacts:
        s = self._settings
        limits = s.rate_limits
        sinks = self._sinks()
        return ai_act_report.SystemFacts(
            version=_version(),
            models=tuple(s.models()),
            upstreams=tuple(
                ai_act_report.UpstreamFacts(u.name, tuple(u.models), u.weight) for u in s.upstreams
            ),
            roles={role: tuple(sorted(p)) for role, p in ROLE_PERMISSIONS.items()},
            auth_enabled=s.auth.enabled,
            tls=s.server.tls is not None,
            client_certificates=s.server.tls.client_cert if s.server.tls else "none",
            rate_limits=(
                f"{limits.requests_per_second:g} requests/s and "
                f"{limits.tokens_per_minute} tokens/min per key"
                if limits.enabled
                else None
            ),
            audit_enabled=s.audit.enabled,
            audit_payloads=s.audit.payloads,
            retention_days=s.audit.retention_days,
            retention_interval_s=s.audit.retention_interval_s,
            checkpoint_every_entries=s.audit.checkpoint_every_entries,
            checkpoint_every_s=s.audit.checkpoint_every_s,
            database=self._engine.dialect.name,
            watermark_enabled=s.watermark.enabled,
            watermark_gamma=s.watermark.gamma,
            watermark_delta=s.watermark.delta,
            watermark_z_threshold=s.watermark.z_threshold,
            events_shipped="events" in sinks,
            events_status=sinks.get("events", "off"),
            event_sinks=tuple(sinks),
            watermark_counter=_watermark_counter(),
        )


def _version() -> str:
    try:
        return importlib.metadata.version("bastion")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _watermark_counter() -> dict[str, float]:
    """bastion_watermark_verdicts_total of every worker, by verdict."""
    counts = {}
    registry = exposition_registry()
    for verdict in ("watermarked", "absent"):
        value = registry.get_sample_value("bastion_watermark_verdicts_total", {"verdict": verdict})
        counts[verdict] = value or 0.0
    return counts

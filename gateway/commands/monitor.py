"""``bastion monitor`` and ``bastion anomalies``: anomaly detection with the gateway's
configuration (its store, master key and audit log); the commands live in
monitors/anomaly/cli.py, which knows nothing of the gateway."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.audit_trail import AuditTrail
from gateway.commands.common import load
from gateway.credentials import derive_key, load_audit_signing_key, load_master_key
from gateway.store import make_engine
from monitors.anomaly.cli import MonitorContext, make_apps
from monitors.anomaly.records import audit_callback


def monitor_context(config: Path | None, database_url: str | None) -> MonitorContext:
    """What the commands need, from the gateway's configuration; flags go to the audit log."""
    settings = load(config, **({"database_url": database_url} if database_url else {}))
    engine = make_engine(settings.database_url)
    master_key = load_master_key(settings)
    mac_key = derive_key(master_key, "anomaly-model")
    if not settings.audit.enabled:
        return MonitorContext(engine, settings.anomaly, mac_key)
    trail = AuditTrail(settings.audit, engine, master_key, load_audit_signing_key(settings))

    @contextlib.asynccontextmanager
    async def audit_log() -> AsyncIterator[None]:
        await trail.start()
        try:
            yield
        finally:
            await trail.stop()

    return MonitorContext(
        engine,
        settings.anomaly,
        mac_key,
        on_flag=[audit_callback(trail.record)],
        lifespan=audit_log,
    )


monitor_app, anomalies_app = make_apps(monitor_context)

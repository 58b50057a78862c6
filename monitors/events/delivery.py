"""Sending rendered event documents: retries, backoff, setup checks, per-item accounting.

:class:`Delivery` is the half of the shipper that talks to the cluster. ``ship`` sends a
batch with ``_bulk`` and returns what could not be delivered (for the spool): connection
errors, timeouts, 429 and 5xx are retried twice with exponential backoff (0.2 s, 0.4 s)
within ``timeout_s``, then the cluster is left alone for a growing pause (1 s doubling
to 30 s, :meth:`Delivery.up`). Per-document errors other than 429 are final: counted by
error type and logged once per type, without the values the cluster quotes. Before the
first bulk, after an outage and every five minutes it checks the index template and
lifecycle policy and installs what is missing (a restarted cluster may have lost them).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from monitors import metrics
from monitors.events.cluster import (
    Cluster,
    ClusterForbidden,
    ClusterRejected,
    ClusterUnavailable,
)
from monitors.events.settings import EventSettings
from monitors.events.templates import daily_index

log = logging.getLogger("bastion.events")

_ATTEMPTS = 3
_RETRY_BASE_S = 0.2
_PAUSE_MAX_S = 30.0
_SETUP_EVERY_S = 300.0

# bastion_events_failed_total{reason}: the bulk item's error type when it is one of
# these, "other" otherwise (label values stay bounded), "request_rejected" when the
# cluster refused the whole request.
_KNOWN_ERRORS = frozenset(
    {
        "mapper_parsing_exception",
        "strict_dynamic_mapping_exception",
        "document_parsing_exception",
        "illegal_argument_exception",
        "index_not_found_exception",
        "cluster_block_exception",
        "index_closed_exception",
        "invalid_index_name_exception",
        "security_exception",
        "action_request_validation_exception",
    }
)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _redact(reason: str) -> str:
    """A cluster's reason without the values it quotes (they may be personal data)."""
    reason = reason.split("Preview of field")[0]
    return _QUOTED.sub("…", reason).strip()


@dataclass(slots=True)
class Item:
    """One rendered document: what a bulk line and a spool record are made of."""

    time_us: int
    doc_id: str
    source: bytes

    def record(self) -> tuple[int, bytes]:
        return self.time_us, self.doc_id.encode() + b"\n" + self.source

    @classmethod
    def from_record(cls, time_us: int, payload: bytes) -> Item:
        doc_id, _, source = payload.partition(b"\n")
        return cls(time_us, doc_id.decode(), source)


@dataclass
class ShipperStats:
    """Counters since start (this process), beside the Prometheus metrics."""

    offered: int = 0
    sent: int = 0
    duplicates: int = 0
    """Refused as already indexed (``_id`` seen before): a replay of something delivered."""
    failed: dict[str, int] = field(default_factory=dict)
    """Documents refused for good, by error type (bounded, as the metric's label)."""
    retried: int = 0
    """Documents sent again after a 429, a timeout or a connection error."""
    spooled: int = 0
    overflowed: int = 0
    """Offered while the memory queue was full: written straight to the spool."""
    dropped: int = 0
    """Lost because the spool was full: its oldest segment was dropped."""
    lost: int = 0
    """Lost because neither the queue nor the spool could take them (disk error)."""


class OnceLog:
    """Warnings logged once per kind (a cluster outage or a bad document per batch would
    otherwise flood the log); ``forget`` re-arms kinds by prefix."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, message: str, *args: Any) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.warning(message, *args)

    def forget(self, prefix: str) -> None:
        self._seen = {k for k in self._seen if not k.startswith(prefix)}


class Delivery:
    """Sends items to one cluster; see the module docstring."""

    def __init__(
        self, settings: EventSettings, cluster: Cluster, stats: ShipperStats, log_once: OnceLog
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.stats = stats
        self._log_once = log_once
        self.down_until = 0.0
        """Monotonic time before which the cluster is left alone."""
        self._pause = 0.0
        self._setup_at: float | None = None  # monotonic time of the last check; None: due

    def target(self, item: Item) -> str:
        if self.cluster.data_stream:
            return self.settings.data_stream
        return daily_index(self.settings, item.time_us)

    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def _mark_down(self, reason: str) -> None:
        self._pause = min(max(self._pause * 2, 1.0), _PAUSE_MAX_S)
        self.down_until = time.monotonic() + self._pause
        self._setup_at = None  # a cluster that comes back may have lost the template
        self._log_once(f"down:{reason.split(':')[0]}", "event cluster unavailable: %s", reason)

    def _mark_up(self) -> None:
        if self._pause:
            log.info("event cluster reachable again")
            self._log_once.forget("down:")
        self._pause = 0.0

    async def _ensure_setup(self) -> None:
        now = time.monotonic()
        if self._setup_at is not None and now - self._setup_at < _SETUP_EVERY_S:
            return
        try:
            report = await self.cluster.ensure_setup()
        except ClusterRejected as exc:
            # Our template or policy refused: shipping into indices without our mapping
            # would create them with guessed types, so hold the events in the spool
            # (bounded, visible in the spool metrics) until an operator fixes it.
            self._log_once("setup-rejected", "event index setup refused: %s", exc)
            raise ClusterUnavailable(f"setup refused: {exc}") from exc
        except ClusterForbidden as exc:
            # A least-privilege writer may index without being allowed to read templates
            # or policies: ship anyway, and say once who should run the setup.
            self._setup_at = now
            self._log_once(
                "setup-forbidden",
                "cannot check the event index template (%s): run `bastion events setup` "
                "with a credential that may manage templates and lifecycle policies",
                exc,
            )
            return
        self._setup_at = now
        if report.template != "present" or report.lifecycle not in ("present", "unavailable"):
            log.info("event index setup: %s", "; ".join(report.lines()))
        for note in report.notes:
            self._log_once(f"setup:{note[:20]}", "event cluster: %s", note)

    async def ship(self, items: list[Item]) -> list[Item]:
        """Send items; return those still undelivered (to spool). Never raises."""
        pending = items
        started = time.monotonic()
        for attempt in range(_ATTEMPTS):
            if attempt:
                self.stats.retried += len(pending)
                metrics.EVENTS_RETRIED.inc(len(pending))
                await asyncio.sleep(_RETRY_BASE_S * 2 ** (attempt - 1))
            try:
                await self._ensure_setup()
                outcome = await self.cluster.bulk(
                    [(self.target(i), i.doc_id, i.source) for i in pending]
                )
            except ClusterUnavailable as exc:
                if attempt + 1 == _ATTEMPTS or time.monotonic() - started > self.settings.timeout_s:
                    self._mark_down(str(exc))
                    return pending
                continue
            except ClusterRejected as exc:
                self._fail("request_rejected", len(pending), f"request refused: {exc}")
                return []
            self._mark_up()
            self.stats.sent += outcome.indexed
            self.stats.duplicates += outcome.duplicates
            metrics.EVENTS_SENT.inc(outcome.indexed + outcome.duplicates)
            for _, kind, reason in outcome.failed:
                label = kind if kind in _KNOWN_ERRORS else "other"
                self._fail(label, 1, f"{kind}: {_redact(reason)}")
            pending = [pending[p] for p in outcome.retry]
            if not pending:
                return []
        self._mark_down("429 from the cluster")
        return pending

    def _fail(self, reason: str, count: int, message: str) -> None:
        self.stats.failed[reason] = self.stats.failed.get(reason, 0) + count
        metrics.EVENTS_FAILED.labels(reason).inc(count)
        kind = message.split(":")[0]
        self._log_once(f"fail:{kind}", "event documents refused for good (%s): %s", reason, message)

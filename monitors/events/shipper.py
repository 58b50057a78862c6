"""The event sink that ships request events to Elasticsearch/OpenSearch.

On the request path, :meth:`EventShipper.offer` only puts the event into a bounded
memory queue (about a microsecond); when that queue is full, the event is rendered and
appended to the on-disk spool instead (a ``write``, no ``fsync``: the loop syncs it on
its next turn), so a burst is never dropped while the spool has room.

A background task (:meth:`start` / :meth:`stop`, from the app's lifespan) takes batches
of ``batch_size`` events or whatever came in ``flush_interval_s``, renders them as ECS
documents and sends them with ``_bulk``. A request that fails for a reason worth retrying
(connection error, timeout, 429, 5xx) is retried with exponential backoff, then the
batch goes to the spool and the cluster is left alone for a growing pause (up to 30 s).
While the spool holds anything, new batches are appended behind it and the spool is
replayed from its head, so documents reach the cluster in the order they were spooled;
the ``_id`` (the gateway request id) makes a document sent twice a refused duplicate.

Per-document errors other than 429 are final: counted by reason and logged once per
error type (never with the document). Before the first bulk, after the cluster was
unreachable, and every five minutes, the shipper checks the index template and lifecycle
policy and installs them when missing (a restarted cluster may have lost them).

Several worker processes: each has its own spool directory under ``spool_dir``; a live
shipper adopts and replays the spool of a process that died (see :mod:`.spool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from monitors import metrics
from monitors.events.cluster import (
    Cluster,
    ClusterForbidden,
    ClusterRejected,
    ClusterUnavailable,
)
from monitors.events.ecs import document_id, to_document
from monitors.events.settings import ClusterAuth, EventSettings, cluster_auth
from monitors.events.spool import Spool, SpoolBatch
from monitors.events.templates import daily_index
from monitors.request_event import RequestEvent

log = logging.getLogger("bastion.events")

_ATTEMPTS = 3
_RETRY_BASE_S = 0.2
_PAUSE_MAX_S = 30.0
_SETUP_EVERY_S = 300.0
_ORPHAN_SCAN_EVERY_S = 10.0

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
class _Item:
    """One rendered document: what a bulk line and a spool record are made of."""

    time_us: int
    doc_id: str
    source: bytes

    def record(self) -> tuple[int, bytes]:
        return self.time_us, self.doc_id.encode() + b"\n" + self.source

    @classmethod
    def from_record(cls, time_us: int, payload: bytes) -> _Item:
        doc_id, _, source = payload.partition(b"\n")
        return cls(time_us, doc_id.decode(), source)


@dataclass
class ShipperStats:
    """Counters since start (this process); the metrics module reads them."""

    offered: int = 0
    sent: int = 0
    duplicates: int = 0
    """Refused as already indexed (``_id`` seen before): a replay of something delivered."""
    failed: dict[str, int] = field(default_factory=dict)
    """Documents refused for good, by reason: mapping, index, rejected, other."""
    retried: int = 0
    """Documents sent again after a 429, a timeout or a connection error."""
    spooled: int = 0
    overflowed: int = 0
    """Offered while the memory queue was full: written straight to the spool."""
    dropped: int = 0
    """Lost because the spool was full: its oldest segment was dropped."""
    lost: int = 0
    """Lost because neither the queue nor the spool could take them (disk error)."""


class EventShipper:
    """``EventSink`` for shipped events: ``offer`` never blocks; see the module docstring."""

    name = "events"

    def __init__(
        self,
        settings: EventSettings,
        *,
        auth: ClusterAuth | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if settings.url is None:
            raise ValueError("events.url is not set: no shipper")
        self.settings = settings
        self.stats = ShipperStats()
        self._auth = auth if auth is not None else cluster_auth(settings)
        self._transport = transport
        self._queue: asyncio.Queue[RequestEvent | None] = asyncio.Queue(settings.queue_size)
        self._spool: Spool | None = None
        self._adopted: list[Spool] = []
        self._cluster: Cluster | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._unsynced = False
        self._ship_lock = asyncio.Lock()
        self._down_until = 0.0
        self._pause = 0.0
        self._setup_at: float | None = None  # monotonic time of the last check; None: due
        self._orphans_at = 0.0
        self._logged: set[str] = set()
        self._in_flight: list[_Item] = []  # a live batch being sent (spooled if cancelled)

    # the request path ------------------------------------------------------------------

    def offer(self, event: RequestEvent) -> None:
        """Queue the event; never waits (see the module docstring). Call it from the event
        loop's thread, as the gateway's sinks are (an asyncio queue is not thread-safe)."""
        self.stats.offered += 1
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._overflow(event)

    def _overflow(self, event: RequestEvent) -> None:
        if self._spool is None:
            self._lose(1)
            return
        try:
            dropped = self._spool.append([self._render(event).record()], sync=False)
        except OSError as exc:
            self._lose(1)
            self._log_once("spool", "event spool not writable: %s", exc.strerror)
            return
        self._unsynced = True
        self.stats.overflowed += 1
        self._dropped(dropped)

    def _lose(self, count: int) -> None:
        self.stats.lost += count
        metrics.EVENT_SINK_DROPPED.labels(self.name).inc(count)

    def _dropped(self, count: int) -> None:
        if count:
            self.stats.dropped += count
            metrics.EVENTS_DROPPED.inc(count)

    # life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open this process's spool and start shipping in the background."""
        s = self.settings
        self._spool = await asyncio.to_thread(Spool.create, s.spool_dir, s.spool_max_bytes)
        self._cluster = Cluster(s, self._auth, transport=self._transport)
        self._task = asyncio.create_task(self._run(), name="bastion-events")

    async def stop(self) -> None:
        """Ship or spool what is queued, then close; nothing offered before is lost."""
        self._stopping = True
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)  # wake the collector
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.settings.timeout_s * 2 + 5)
            except TimeoutError:  # wait_for cancelled the task
                log.warning("event shipper did not finish in time; spooling the rest")
        # A batch cut off mid-send may have reached the cluster: spooling it again is
        # harmless (its _ids turn a second delivery into refused duplicates).
        queued = [self._render(e) for e in self._drain_queue() if e is not None]
        rest = [*self._in_flight, *queued]
        self._in_flight = []
        if rest and self._spool is not None:
            await self._to_spool(rest)
        for spool in [*self._adopted, *([self._spool] if self._spool else [])]:
            await asyncio.to_thread(spool.close)
        self._adopted.clear()
        if self._cluster is not None:
            await self._cluster.aclose()

    def _drain_queue(self) -> list[RequestEvent | None]:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return items

    # the background task -------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if await self._turn():
                    return
            except (OSError, ValueError, orjson.JSONDecodeError) as exc:
                # A full disk or a corrupt record must not end shipping for good: the
                # next turn tries again, and offer() keeps queueing meanwhile.
                self._log_once(f"turn:{type(exc).__name__}", "event shipper: %r", exc)
                await asyncio.sleep(1.0)

    async def _turn(self) -> bool:
        """One batch in, one batch of replay out; True when stopping is done."""
        replaying = self._spool_events() > 0 and self._cluster_up()
        events = await self._collect(0.0 if replaying else self.settings.flush_interval_s)
        if self._unsynced and self._spool is not None:
            self._unsynced = False
            await asyncio.to_thread(self._spool.sync)
        async with self._ship_lock:
            if events:
                items = [self._render(e) for e in events]
                if self._spool_events() == 0 and self._cluster_up():
                    self._in_flight = items
                    leftover = await self._ship(items)
                    self._in_flight = []
                    await self._to_spool(leftover)
                else:
                    await self._to_spool(items)
            if self._stopping:
                self._publish_gauges()
                return True
            if self._cluster_up():
                await self._replay_one()
        self._publish_gauges()
        return False

    async def _collect(self, wait_s: float) -> list[RequestEvent]:
        events: list[RequestEvent] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while len(events) < self.settings.batch_size:
            try:
                event = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or self._stopping:
                    break
                try:
                    event = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if event is not None:
                events.append(event)
        return events

    def _render(self, event: RequestEvent) -> _Item:
        doc = to_document(event, self.settings)
        return _Item(event.time_us, document_id(event), orjson.dumps(doc))

    def _target(self, item: _Item) -> str:
        assert self._cluster is not None
        if self._cluster.data_stream:
            return self.settings.data_stream
        return daily_index(self.settings, item.time_us)

    def _cluster_up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _mark_down(self, reason: str) -> None:
        self._pause = min(max(self._pause * 2, 1.0), _PAUSE_MAX_S)
        self._down_until = time.monotonic() + self._pause
        self._setup_at = None  # a cluster that comes back may have lost the template
        self._log_once(f"down:{reason.split(':')[0]}", "event cluster unavailable: %s", reason)

    def _mark_up(self) -> None:
        if self._pause:
            log.info("event cluster reachable again")
            self._logged = {k for k in self._logged if not k.startswith("down:")}
        self._pause = 0.0

    async def _ensure_setup(self) -> None:
        assert self._cluster is not None
        now = time.monotonic()
        if self._setup_at is not None and now - self._setup_at < _SETUP_EVERY_S:
            return
        try:
            report = await self._cluster.ensure_setup()
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

    async def _ship(self, items: list[_Item]) -> list[_Item]:
        """Send items; return those still undelivered (to spool). Never raises."""
        assert self._cluster is not None
        pending = items
        started = time.monotonic()
        for attempt in range(_ATTEMPTS):
            if attempt:
                self.stats.retried += len(pending)
                metrics.EVENTS_RETRIED.inc(len(pending))
                await asyncio.sleep(_RETRY_BASE_S * 2 ** (attempt - 1))
            try:
                await self._ensure_setup()
                outcome = await self._cluster.bulk(
                    [(self._target(i), i.doc_id, i.source) for i in pending]
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

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message, *args)

    # the spool ---------------------------------------------------------------------------

    def _spool_events(self) -> int:
        return sum(s.events for s in self._spools())

    def _spools(self) -> list[Spool]:
        return [*([self._spool] if self._spool else []), *self._adopted]

    async def _to_spool(self, items: list[_Item]) -> None:
        if not items:
            return
        assert self._spool is not None
        try:
            dropped = await asyncio.to_thread(self._spool.append, [i.record() for i in items])
        except OSError as exc:
            self._lose(len(items))
            self._log_once("spool", "event spool not writable: %s", exc.strerror)
            return
        self.stats.spooled += len(items)
        self._dropped(dropped)

    async def _replay_one(self) -> None:
        """Send one batch from the head of the oldest non-empty spool, if any."""
        spool = await self._next_spool()
        if spool is None:
            return
        batch: SpoolBatch = await asyncio.to_thread(spool.read, self.settings.batch_size)
        items = [
            _Item.from_record(t, p) for t, p in zip(batch.times_us, batch.payloads, strict=True)
        ]
        if items and await self._ship(items):
            return  # undelivered: they stay at the head of the spool
        await asyncio.to_thread(spool.consume, batch)
        if spool is not self._spool and spool.events == 0:
            self._adopted.remove(spool)
            await asyncio.to_thread(spool.close)

    async def _next_spool(self) -> Spool | None:
        for spool in self._adopted:  # a dead process's events are older than ours
            if spool.events:
                return spool
        if self._spool is not None and self._spool.events:
            return self._spool
        now = time.monotonic()
        if now - self._orphans_at >= _ORPHAN_SCAN_EVERY_S:
            self._orphans_at = now
            await asyncio.to_thread(self._adopt_orphans)
            for spool in self._adopted:
                if spool.events:
                    return spool
        return None

    def _adopt_orphans(self) -> None:
        mine = {s.directory for s in self._spools()}
        for directory in Spool.directories(self.settings.spool_dir):
            if directory in mine:
                continue
            spool = Spool.adopt(directory, self.settings.spool_max_bytes)
            if spool is None:
                continue
            if spool.events:
                log.info("replaying the event spool of a stopped process (%d events)", spool.events)
                self._adopted.append(spool)
            else:
                spool.close()

    def _publish_gauges(self) -> None:
        events, size, age = self.spool_gauges()
        metrics.EVENTS_SPOOL_EVENTS.set(events)
        metrics.EVENTS_SPOOL_BYTES.set(size)
        metrics.EVENTS_SPOOL_OLDEST_AGE.set(age)

    def spool_gauges(self) -> tuple[int, int, float]:
        """(events, bytes, age of the oldest event in seconds) over this process's spools."""
        spools = self._spools()
        oldest = [s.oldest_time_us for s in spools if s.oldest_time_us is not None and s.events]
        age = max(time.time() - min(oldest) / 1e6, 0.0) if oldest else 0.0
        return sum(s.events for s in spools), sum(s.bytes for s in spools), age

    # erasure -------------------------------------------------------------------------------

    async def erase_subject(self, subject_id: str) -> dict[str, Any]:
        """Delete a subject's events here and in the cluster; counts per place for the receipt.

        Holds the shipping lock, so no batch of this process is in flight meanwhile:
        queued events are removed, every spool under ``spool_dir`` (live workers' too)
        gets tombstones, then the cluster runs a delete-by-query on ``user.id``. Documents
        carry ``user.id`` only with ``include_subject``; without it the queue and spools
        hold nothing that names the subject, but the delete-by-query still runs (documents
        shipped under an earlier configuration). ``cluster.error`` is set when the
        cluster could not be reached: the erasure is then incomplete there.
        """
        if self._cluster is None:
            raise RuntimeError("erase_subject before start()")
        needle = b'"user":{"id":' + orjson.dumps(subject_id) + b"}"

        def matches(payload: bytes) -> bool:
            if needle not in payload:
                return False
            doc = orjson.loads(payload.partition(b"\n")[2])
            return bool(doc.get("user", {}).get("id") == subject_id)

        async with self._ship_lock:
            queued = 0
            if self.settings.include_subject:
                kept = []
                for event in self._drain_queue():
                    if event is not None and event.subject_id == subject_id:
                        queued += 1
                    else:
                        kept.append(event)
                for event in kept:
                    self._queue.put_nowait(event)
            spooled, spools = await asyncio.to_thread(self._purge_spools, matches)
            cluster: dict[str, Any] = {"index_pattern": self.settings.index_pattern}
            try:
                cluster["deleted"] = await self._cluster.delete_by_query("user.id", subject_id)
            except (ClusterUnavailable, ClusterRejected) as exc:
                cluster["deleted"] = None
                cluster["error"] = str(exc)
        return {
            "cluster": cluster,
            "spool": {"deleted": spooled, "spools": spools},
            "queue": {"deleted": queued},
        }

    def _purge_spools(self, matches: Any) -> tuple[int, int]:
        own = {s.directory: s for s in self._spools()}
        erased = visited = 0
        for directory in Spool.directories(self.settings.spool_dir):
            spool = own.get(directory)
            visitor = spool is None
            try:
                if spool is None:
                    spool = Spool(directory, self.settings.spool_max_bytes)
                erased += spool.purge(matches)
                visited += 1
            except FileNotFoundError:  # removed meanwhile by its owner: nothing left there
                continue
            finally:
                if visitor and spool is not None:
                    spool.close()
        return erased, visited

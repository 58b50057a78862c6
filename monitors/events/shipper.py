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
policy and installs them when missing (a restarted cluster may have lost them). That
side lives in :mod:`.delivery`.

Several worker processes: each has its own spool directory under ``spool_dir``; a live
shipper adopts and replays the spool of a process that died (see :mod:`.spool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx
import orjson

from monitors import metrics
from monitors.events.cluster import Cluster, ClusterRejected, ClusterUnavailable
from monitors.events.delivery import Delivery, Item, OnceLog, ShipperStats
from monitors.events.ecs import document_id, to_document
from monitors.events.settings import ClusterAuth, EventSettings, cluster_auth
from monitors.events.spool import Spool, SpoolBatch
from monitors.request_event import RequestEvent

log = logging.getLogger("bastion.events")

_ORPHAN_SCAN_EVERY_S = 10.0


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
        self._delivery: Delivery | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._unsynced = False
        self._ship_lock = asyncio.Lock()
        self._orphans_at = 0.0
        self._log_once = OnceLog()
        self._in_flight: list[Item] = []  # a live batch being sent (spooled if cancelled)

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
        cluster = Cluster(s, self._auth, transport=self._transport)
        self._delivery = Delivery(s, cluster, self.stats, self._log_once)
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
        if self._delivery is not None:
            await self._delivery.cluster.aclose()

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
        replaying = self._spool_events() > 0 and self._up()
        events = await self._collect(0.0 if replaying else self.settings.flush_interval_s)
        if self._unsynced and self._spool is not None:
            self._unsynced = False
            await asyncio.to_thread(self._spool.sync)
        async with self._ship_lock:
            if events:
                items = [self._render(e) for e in events]
                if self._spool_events() == 0 and self._up():
                    self._in_flight = items
                    leftover = await self._ship(items)
                    self._in_flight = []
                    await self._to_spool(leftover)
                else:
                    await self._to_spool(items)
            if self._stopping:
                self._publish_gauges()
                return True
            if self._up():
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

    def _render(self, event: RequestEvent) -> Item:
        doc = to_document(event, self.settings)
        return Item(event.time_us, document_id(event), orjson.dumps(doc))

    @property
    def delivery(self) -> Delivery:
        """The cluster side (after :meth:`start`): ``delivery.cluster``, ``down_until``."""
        if self._delivery is None:
            raise RuntimeError("the shipper has not started")
        return self._delivery

    def _up(self) -> bool:
        return self._delivery is not None and self._delivery.up()

    def status(self) -> str:
        """What it does now: ``starting``, ``delivering``, or ``spooling`` (cluster down)."""
        if self._delivery is None:
            return "starting"
        return "delivering" if self._up() else "spooling"

    async def _ship(self, items: list[Item]) -> list[Item]:
        return await self.delivery.ship(items)

    # the spool ---------------------------------------------------------------------------

    def _spool_events(self) -> int:
        return sum(s.events for s in self._spools())

    def _spools(self) -> list[Spool]:
        return [*([self._spool] if self._spool else []), *self._adopted]

    async def _to_spool(self, items: list[Item]) -> None:
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
            Item.from_record(t, p) for t, p in zip(batch.times_us, batch.payloads, strict=True)
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
        cluster = self.delivery.cluster  # raises before start()
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
            place: dict[str, Any] = {"index_pattern": self.settings.index_pattern}
            try:
                place["deleted"] = await cluster.delete_by_query("user.id", subject_id)
            except (ClusterUnavailable, ClusterRejected) as exc:
                place["deleted"] = None
                place["error"] = str(exc)
        return {
            "cluster": place,
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

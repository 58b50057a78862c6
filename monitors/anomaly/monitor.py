"""``AnomalyMonitor``: the gateway's event sink for anomaly detection.

``offer`` only appends the event to a bounded queue (when full the event is dropped and
counted): nothing is added to the request path. A background task, started and stopped
with the app's lifespan, records the queued events every ``flush_s`` in one insert (in a
thread), and, when ``score_in_process``, runs the scorer's tick, which only the holder of
the ``anomaly-scorer`` lease gets past: with several workers or gateways one of them
scores everybody's events. Flags go to each ``on_flag`` callback (the lead wires the
audit writer and the event stream): plain functions or coroutines, given the flag record.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import Engine

from monitors.anomaly import store
from monitors.anomaly.features import event_row
from monitors.anomaly.scorer import AnomalyScorer, TickResult
from monitors.anomaly.settings import AnomalySettings
from monitors.metrics import EVENT_SINK_DROPPED
from monitors.request_event import RequestEvent

log = logging.getLogger("bastion.anomaly")
FlagCallback = Callable[[dict[str, Any]], Awaitable[None] | None]


async def deliver(flags: list[dict[str, Any]], callbacks: Sequence[FlagCallback]) -> None:
    """Hand each flag to every callback; one failing callback does not stop the others."""
    for flag in flags:
        for callback in callbacks:
            try:
                outcome = callback(flag)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                log.exception("anomaly: a flag callback failed")


class AnomalyMonitor:
    name = "anomaly"

    def __init__(
        self,
        engine: Engine,
        settings: AnomalySettings,
        mac_key: bytes,
        *,
        on_flag: Sequence[FlagCallback] = (),
        holder: str | None = None,
        scorer: AnomalyScorer | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.on_flag = list(on_flag)
        self.scorer = scorer or AnomalyScorer(engine, settings, mac_key, holder=holder)
        self._queue: deque[RequestEvent] = deque()
        self.dropped = 0
        self.recorded = 0
        self._task: asyncio.Task[None] | None = None
        self._next_tick = 0.0

    def offer(self, event: RequestEvent) -> None:
        """Queue the event; never blocks, never raises."""
        if len(self._queue) >= self.settings.queue_max:
            self.dropped += 1
            EVENT_SINK_DROPPED.labels(self.name).inc()
            return
        self._queue.append(event)

    def _drain(self) -> list[tuple[Any, ...]]:
        rows = []
        while self._queue:
            row = event_row(self._queue.popleft())
            if row is not None:
                rows.append(row)
        return rows

    async def flush(self) -> None:
        """Record what is queued (in a thread)."""
        rows = self._drain()
        if rows:
            await asyncio.to_thread(store.insert_events, self.engine, rows)
            self.recorded += len(rows)

    async def tick(self) -> TickResult:
        """One scorer tick (in a thread), its flags delivered."""
        result = await asyncio.to_thread(self.scorer.tick)
        await deliver(result.flags, self.on_flag)
        return result

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.flush()
                if self.settings.score_in_process and loop.time() >= self._next_tick:
                    self._next_tick = loop.time() + min(self.settings.window_s / 3, 10.0)
                    await self.tick()
            # A monitor must outlive any failure (database away, a bug): say so, go on.
            except Exception as exc:
                log.warning("anomaly monitor: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.settings.flush_s)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="bastion-anomaly")

    async def stop(self) -> None:
        """Stop the loop, record what is still queued, give the lease up."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush()
            await asyncio.to_thread(self.scorer.release)
        except Exception as exc:
            log.warning("anomaly monitor: stopping: %s", exc)

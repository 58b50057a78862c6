"""Is the store the request path writes to answering? Asked in the background, not per call.

Every model call's audit entry goes to the store after the upstream answered: with the
store down, a call would be forwarded (and the upstream would do the work) only to be
answered 503 when its entry cannot be written. The probe runs ``SELECT 1`` on a schedule
in a thread; the audit's request check refuses calls at once while it says down, and
``/readyz`` says not ready, so a load balancer sends the traffic elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sqlalchemy import Engine, text

log = logging.getLogger("bastion.store")


class StoreProbe:
    def __init__(self, engine: Engine, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        self._engine = engine
        self._interval = interval_s
        self._timeout = timeout_s
        self.up = True
        """The last probe's answer (True until one failed)."""
        self.error: str | None = None
        self.checked_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def _select_one(self) -> None:
        with self._engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    async def probe(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.to_thread(self._select_one)
        except Exception as exc:  # any driver error means: not answering
            if self.up:
                log.error("the store is not answering: %s", type(exc).__name__)
            self.up, self.error = False, type(exc).__name__
        else:
            if not self.up:
                log.warning("the store answers again")
            self.up, self.error = True, None
        self.checked_at = time.time()
        return self.up

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.probe()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="bastion-store-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

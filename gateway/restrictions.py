"""Which data subjects' processing is restricted (GDPR Art. 18), kept in memory.

The request path asks on every model call (``RestrictionCheck``), so the set lives in
memory and is re-read from the privacy store every ``refresh_s``; the privacy routes
refresh it at once when they restrict or lift a restriction.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import Engine

from compliance.privacy_store import restricted_subjects
from gateway.errors import Forbidden
from gateway.rbac import Principal

log = logging.getLogger("bastion.privacy")


class SubjectRestricted(Forbidden):
    code = "subject_restricted"


class RestrictionCache:
    """Restricted subjects in memory, re-read every ``refresh_s`` (cheap on the hot path)."""

    def __init__(self, engine: Engine, refresh_s: float) -> None:
        self._engine = engine
        self._refresh_s = refresh_s
        self._restricted: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None

    def is_restricted(self, subject_id: str) -> bool:
        return subject_id in self._restricted

    def check(self, principal: Principal) -> None:
        """403 ``subject_restricted`` for a restricted subject's model call."""
        if principal.subject_id is not None and principal.subject_id in self._restricted:
            raise SubjectRestricted(
                "Processing of this data subject's requests is restricted (GDPR Art. 18)."
            )

    async def refresh(self) -> None:
        self._restricted = frozenset(await asyncio.to_thread(restricted_subjects, self._engine))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:  # the store may be briefly unreachable; keep what we know
                log.exception("refreshing restricted subjects failed; keeping the cached set")

    async def start(self) -> None:
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="bastion-restrictions")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

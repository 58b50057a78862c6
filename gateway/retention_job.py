"""Audit retention on a schedule: every gateway process offers, one at a time runs.

Each process (every uvicorn worker of every gateway on one database) ticks every
``min(interval, ttl / 3)`` seconds and tries to take or renew the ``audit-retention``
lease (compliance/job_lease.py). The holder runs
:func:`compliance.retention.apply_retention` when the last run, by whichever process,
is ``audit.retention_interval_s`` old; the others wait for the lease to expire, which it
does ``ttl`` after its holder stops renewing it (killed, hung, cut off from the
database). The run itself is in a thread, off the event loop; between chunks it renews
the lease and stops if it lost it or the gateway is stopping. A failed run is logged and
tried again an interval later: retention never takes the gateway down.

Each process also signs the tails that dead writers left unsigned
(compliance/unsigned_tails.py) at its first tick, without waiting for the lease (which a
killed holder keeps for ``ttl``): a gateway restarted after a SIGKILL signs what its
previous life left as it starts. The lease holder signs them again before each run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine

from compliance.job_lease import JobLease
from compliance.retention import RetentionResult, apply_retention
from compliance.unsigned_tails import TailsResult, sign_unsigned_tails
from gateway.config import AuditSettings

log = logging.getLogger("bastion.retention")
LEASE_NAME = "audit-retention"
LEASE_TTL_S = 60.0
"""A dead holder is replaced within this (plus a tick); renewed every third of it."""


class RetentionJob:
    def __init__(
        self,
        engine: Engine,
        signing_key: Ed25519PrivateKey,
        *,
        days: float,
        interval_s: float,
        ttl_s: float = LEASE_TTL_S,
        holder: str | None = None,
    ) -> None:
        self.lease = JobLease(engine, LEASE_NAME, holder, ttl_s=ttl_s)
        self.interval_s = interval_s
        self._engine = engine
        self._signing_key = signing_key
        self._days = days
        self._tick_s = min(interval_s, ttl_s / 3) if interval_s > 0 else 0.0
        self._stopping = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: asyncio.Future[RetentionResult | None] | None = None
        self._tails_signed = False
        self.tails: TailsResult | None = None
        """What the last signing of unsigned tails did (tests and curiosity)."""
        self.runs = 0
        """Runs this process made (tests and curiosity)."""

    @classmethod
    def configured(
        cls, settings: AuditSettings, engine: Engine, signing_key: Ed25519PrivateKey
    ) -> RetentionJob | None:
        """The job the configuration asks for; None when ``retention_interval_s`` is 0."""
        if settings.retention_interval_s <= 0:
            return None
        return cls(
            engine,
            signing_key,
            days=settings.retention_days,
            interval_s=settings.retention_interval_s,
        )

    def run_once(self) -> RetentionResult | None:
        """Take or renew the lease; if held and due, run retention. Blocks: call in a thread.

        The result, or None when another process holds the lease or the job is not due.
        """
        if not self._tails_signed:
            self._sign_tails()  # at start, lease or not: a dead holder's lease lasts ttl_s
        if not self.lease.acquire():
            return None
        state = self.lease.state()
        started_us = time.time_ns() // 1000
        due = state.last_run_us is None or (
            started_us - state.last_run_us >= self.interval_s * 1_000_000
        )
        if not due or self._stopping.is_set():
            return None
        self._sign_tails()
        # The attempt counts as the run: one that fails is tried again an interval later.
        if not self.lease.record_run(started_us):
            return None
        started = time.monotonic()
        result = apply_retention(
            self._engine, self._signing_key, days=self._days, proceed=self._proceed
        )
        self.runs += 1
        _log_result(result, self._days, time.monotonic() - started)
        return result

    def _sign_tails(self) -> None:
        self._tails_signed = True
        tails = self.tails = sign_unsigned_tails(self._engine, self._signing_key)
        if tails.signed:
            log.info(
                "audit: signed %d entries in %d chain(s) that no checkpoint covered (a writer "
                "killed before its final checkpoint, or a live writer's latest)",
                tails.entries,
                len(tails.signed),
            )
        for problem in tails.refused:
            log.error("audit: an unsigned tail does not verify, left unsigned: %s", problem)

    def _proceed(self) -> bool:
        if self._stopping.is_set():
            return False
        if not self.lease.acquire():
            log.warning("audit retention: lost the lease to another process; stopping this run")
            return False
        return True

    def _tick(self) -> RetentionResult | None:
        try:
            return self.run_once()
        # A background job must outlive any failure (database away, a bug): say so, go on.
        except Exception as exc:
            log.warning(
                "audit retention failed (%s: %s); next try in %g s",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                self._tick_s,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return None

    async def _loop(self) -> None:
        while True:
            self._current = asyncio.ensure_future(asyncio.to_thread(self._tick))
            # Shielded: stopping cancels the loop, the run ends at its next chunk instead.
            await asyncio.shield(self._current)
            await asyncio.sleep(self._tick_s)

    async def start(self) -> None:
        if self._task is None and self.interval_s > 0:
            self._stopping.clear()
            self._task = asyncio.create_task(self._loop(), name="bastion-retention")

    async def stop(self) -> None:
        """Stop ticking, let a run in progress end at its next chunk, give the lease up."""
        if self._task is None:
            return
        self._stopping.set()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._current is not None:
            await asyncio.gather(self._current, return_exceptions=True)
            self._current = None
        try:
            await asyncio.to_thread(self.lease.release)
        except Exception as exc:  # it expires by itself; shutting down must go on
            log.warning("audit retention: could not release the lease (%s)", exc)


def _log_result(result: RetentionResult, days: float, seconds: float) -> None:
    """One line per run: counts only (writer ids and seqs at most, never subjects)."""
    message = (
        "audit retention: deleted %d entries older than %g days from %d chain(s), "
        "%d anchor(s) signed, in %.2f s%s"
    )
    tail = " (stopped early)" if result.stopped else ""
    args = (result.total, days, len(result.deleted), result.anchors, seconds, tail)
    if result.refused:
        log.error(
            message + "; refused %d chain(s) that do not verify, first: %s",
            *args,
            len(result.refused),
            result.refused[0],
        )
    else:
        log.info(message, *args)

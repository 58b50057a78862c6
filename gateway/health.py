"""Active health checks: probe every upstream periodically and mark it (un)healthy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gateway.config import HealthCheckSettings
from gateway.errors import GatewayError
from gateway.transport import UpstreamTransport
from gateway.upstreams import Upstream, UpstreamPool
from monitors.metrics_sink import UpstreamMetrics

log = logging.getLogger("bastion.health")


class HealthChecker:
    """Probes ``GET url+path`` on every upstream; 2xx within the timeout is a pass.

    An upstream turns unhealthy after ``unhealthy_after`` consecutive failed probes and
    healthy again after ``healthy_after`` consecutive passes.
    """

    def __init__(
        self, settings: HealthCheckSettings, pool: UpstreamPool, transport: UpstreamTransport
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._transport = transport
        self._task: asyncio.Task[None] | None = None
        self._metrics = UpstreamMetrics()

    async def probe(self, upstream: Upstream) -> None:
        url = upstream.base_url + self._settings.path
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                response = await self._transport.send("GET", url, upstream.request_headers, None)
                await response.read()
            passed = 200 <= response.status < 300
            error = None if passed else f"status {response.status}"
        except (GatewayError, TimeoutError) as exc:
            passed, error = False, type(exc).__name__
        self._record(upstream, passed, error)

    def _record(self, upstream: Upstream, passed: bool, error: str | None) -> None:
        upstream.last_probe_error = error
        if passed:
            upstream.probe_failures = 0
            upstream.probe_successes += 1
            if not upstream.healthy and upstream.probe_successes >= self._settings.healthy_after:
                upstream.healthy = True
                log.warning("upstream %s is healthy again", upstream.name)
        else:
            upstream.probe_successes = 0
            upstream.probe_failures += 1
            if upstream.healthy and upstream.probe_failures >= self._settings.unhealthy_after:
                upstream.healthy = False
                log.warning("upstream %s is unhealthy: %s", upstream.name, error)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(u) for u in self._pool.upstreams))
        for upstream in self._pool.upstreams:  # sampled once a round: health and breaker
            self._metrics.health(upstream.name, upstream.healthy)
            self._metrics.breaker(upstream.name, upstream.breaker.state.value)

    async def _run(self) -> None:
        interval = self._settings.interval_s
        while True:
            started = time.monotonic()
            await self.probe_all()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def start(self) -> None:
        if self._settings.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="bastion-health-checks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

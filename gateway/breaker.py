"""A circuit breaker per upstream: stop sending traffic to an upstream that keeps failing.

closed --(failure_threshold consecutive failures)--> open
open --(open_s elapsed)--> half_open: exactly one probe request is let through
half_open --probe succeeds--> closed;  --probe fails--> open again (for another open_s)
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED = BreakerState.CLOSED


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        open_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.consecutive_failures = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.open_s:
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = False
        return self._state

    def available(self) -> bool:
        """Whether a request may be sent now (without reserving the half-open probe)."""
        if self._state is _CLOSED:  # the hot path: one comparison
            return True
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._probe_in_flight

    def acquire(self) -> bool:
        """Reserve the right to send one request; in half-open, only one caller wins."""
        if self._state is _CLOSED:
            return True
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self._probe_in_flight = False
        self._state = BreakerState.CLOSED

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        self._probe_in_flight = False
        state = self.state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self.consecutive_failures >= self.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()

    def release(self) -> None:
        """Give back a reservation whose request ended with no verdict (client went away)."""
        self._probe_in_flight = False

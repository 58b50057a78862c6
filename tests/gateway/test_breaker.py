"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

from gateway.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(failure_threshold=3, open_s=10, clock=FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.acquire()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.available() and not breaker.acquire()


def test_a_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, open_s=10, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_half_open_lets_exactly_one_probe_through_and_success_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=10, clock=clock)
    breaker.record_failure()
    clock.now += 9.9
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.2
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.acquire()
    assert not breaker.acquire() and not breaker.available()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.acquire() and breaker.acquire()


def test_failed_probe_reopens_for_another_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.acquire()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 9
    assert breaker.state is BreakerState.OPEN
    clock.now += 1
    assert breaker.state is BreakerState.HALF_OPEN


def test_released_probe_can_be_taken_again() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=1, clock=clock)
    breaker.record_failure()
    clock.now += 1
    assert breaker.acquire()
    breaker.release()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.acquire()

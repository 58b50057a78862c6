"""Job leases: one holder among concurrent contenders (threads, processes), on SQLite and
PostgreSQL; renewal; takeover once a lease expires; release."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData, delete

from compliance import privacy_schema
from compliance.job_lease import JobLease, job_leases, metadata
from gateway.store import make_engine

ROUNDS = 12


@pytest.fixture
def leases(engine: Engine) -> Iterator[Engine]:
    with engine.begin() as connection:
        connection.execute(delete(job_leases))
    yield engine


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1_000_000)


def test_threads_racing_for_a_lease_leave_one_holder(leases: Engine) -> None:
    contenders = 6
    start = threading.Barrier(contenders)
    won: dict[str, list[str]] = {f"job-{n}": [] for n in range(ROUNDS)}

    def contend(holder: str) -> None:
        for name in won:
            lease = JobLease(leases, name, holder, ttl_s=60)
            start.wait()
            if lease.acquire():
                won[name].append(holder)

    threads = [threading.Thread(target=contend, args=(f"t{n}",)) for n in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(len(holders) == 1 for holders in won.values()), won
    # The holder renews; nobody else gets it while it lasts.
    for name, (holder,) in won.items():
        assert JobLease(leases, name, holder).acquire()
        assert not JobLease(leases, name, "late").acquire()


def _contend(url: str, holder: str, names: list[str], start: Any, results: Any) -> None:
    engine = make_engine(url)
    try:
        for name in names:
            lease = JobLease(engine, name, holder, ttl_s=60)
            start.wait(timeout=60)
            results.put((name, holder, lease.acquire()))
    finally:
        engine.dispose()


def test_processes_racing_for_a_lease_leave_one_holder(leases: Engine) -> None:
    context = multiprocessing.get_context("spawn")
    contenders = 3
    start = context.Barrier(contenders)
    results = context.Queue()
    names = [f"proc-job-{n}" for n in range(ROUNDS)]
    url = leases.url.render_as_string(hide_password=False)
    processes = [
        context.Process(target=_contend, args=(url, f"p{n}", names, start, results))
        for n in range(contenders)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in range(contenders * ROUNDS)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for name in names:
        winners = [holder for n, holder, won in outcomes if n == name and won]
        assert len(winners) == 1, (name, outcomes)


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_renew(leases: Engine) -> None:
    clock = Clock()
    first = JobLease(leases, "retention", "a", ttl_s=30, clock=clock)
    second = JobLease(leases, "retention", "b", ttl_s=30, clock=clock)
    assert first.acquire() and not second.acquire()
    clock.advance(20)
    assert first.acquire()  # renewed: good for 30 s from now
    clock.advance(20)
    assert not second.acquire()
    assert first.record_run() and first.state().last_run_us == clock.now
    clock.advance(31)  # the holder stopped renewing
    assert not first.state().held
    assert second.acquire()
    state = second.state()
    assert (state.held, state.holder) == (True, "b")
    assert state.last_run_us == clock.now - 31_000_000  # the schedule carries over
    assert not first.acquire() and not first.record_run()
    second.release()  # given up: taken at once, no waiting for expiry
    assert first.acquire()


def test_the_migration_matches_the_tables(leases: Engine) -> None:
    ours = {"bastion_job_leases", "privacy_requests"}
    target = MetaData()
    for table in (job_leases, privacy_schema.requests):
        table.to_metadata(target)
    assert metadata.tables.keys() == {"bastion_job_leases"}

    def include(name: str | None, kind: str, parent: object) -> bool:
        return kind != "table" or name in ours

    with leases.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_name": include, "compare_type": True}
        )
        assert compare_metadata(context, target) == []

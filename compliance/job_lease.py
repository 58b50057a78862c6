"""Leases in the database: one holder at a time for a job that many processes could run.

A lease is a row of ``bastion_job_leases``: the job's name, its holder and when the
holding expires (µs since the epoch). :meth:`JobLease.acquire` takes the lease, or renews
it for its holder, in one transaction made of two conditional statements:

    UPDATE ... SET holder = me, expires = now + ttl
        WHERE name = job AND (holder = me OR expires <= now)
    INSERT ... ON CONFLICT (name) DO NOTHING            -- only if the UPDATE matched nothing

On PostgreSQL two contenders updating one row are serialised by its row lock, and the
second re-checks the ``WHERE`` against the row the first committed, so it matches nothing;
two inserting the missing row meet on the primary key, and the second does nothing. On
SQLite the first statement takes the database's write lock, so the two statements of one
contender never interleave with another's. Either way exactly one contender holds the
lease until it expires or is released; a holder that dies is replaced once its lease
expires. Renew well within ``ttl`` (a third of it, say).

Expiry compares the clocks of the contenders' hosts: keep them in sync (NTP) to well
within ``ttl``. The row also remembers when the job last ran (``last_run_us``), so that a
new holder keeps the fleet's schedule instead of starting it over.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Engine, MetaData, String, Table, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

metadata = MetaData()

job_leases = Table(
    "bastion_job_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("last_run_us", BigInteger, nullable=True),
)
"""Owned by Alembic (``gateway/migrations/versions/0004_job_leases.py``)."""


def _now_us() -> int:
    return time.time_ns() // 1000


def holder_id() -> str:
    """``host-pid-random``: unique per process, readable in the table."""
    return f"{socket.gethostname()[:80]}-{os.getpid()}-{os.urandom(3).hex()}"


@dataclass(frozen=True, slots=True)
class LeaseState:
    held: bool
    """Whether the caller holds the lease now (until ``expires_us``)."""
    holder: str | None
    expires_us: int | None
    last_run_us: int | None


class JobLease:
    """The lease named ``name``, as seen by one would-be holder."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        holder: str | None = None,
        *,
        ttl_s: float = 60.0,
        clock: Callable[[], int] = _now_us,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.engine = engine
        self.name = name
        self.holder = holder or holder_id()
        self.ttl_us = int(ttl_s * 1_000_000)
        self._clock = clock

    def acquire(self) -> bool:
        """Take the lease if it is free or expired, renew it if ours; True if we hold it."""
        now = self._clock()
        expires = now + self.ttl_us
        with self.engine.begin() as connection:
            taken = connection.execute(
                update(job_leases)
                .where(
                    job_leases.c.name == self.name,
                    or_(job_leases.c.holder == self.holder, job_leases.c.expires_us <= now),
                )
                .values(holder=self.holder, expires_us=expires)
            ).rowcount
            if taken == 1:
                return True
            dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
            # RETURNING, not rowcount: drivers disagree on the count of a skipped insert.
            inserted = connection.execute(
                dialect.insert(job_leases)
                .values(name=self.name, holder=self.holder, expires_us=expires)
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(job_leases.c.name)
            ).first()
        return inserted is not None

    def release(self) -> None:
        """Give the lease up now (if ours), so another process need not wait for expiry."""
        with self.engine.begin() as connection:
            connection.execute(
                update(job_leases)
                .where(job_leases.c.name == self.name, job_leases.c.holder == self.holder)
                .values(expires_us=0)
            )

    def record_run(self, when_us: int | None = None) -> bool:
        """Remember that the job ran (only while we hold the lease); False if we do not."""
        when = when_us if when_us is not None else self._clock()
        with self.engine.begin() as connection:
            done = connection.execute(
                update(job_leases)
                .where(
                    job_leases.c.name == self.name,
                    job_leases.c.holder == self.holder,
                    job_leases.c.expires_us > self._clock(),
                )
                .values(last_run_us=when)
            ).rowcount
        return done == 1

    def state(self) -> LeaseState:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(job_leases).where(job_leases.c.name == self.name)
            ).first()
        if row is None:
            return LeaseState(False, None, None, None)
        held = row.holder == self.holder and row.expires_us > self._clock()
        return LeaseState(held, row.holder, row.expires_us, row.last_run_us)

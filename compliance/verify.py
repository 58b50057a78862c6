"""LogVerifier: every link of every chain, every checkpoint signature.

Each writer's chain is walked (:func:`compliance.chain_walk.walk_chain`) from its genesis
hash, or from the signed retention anchor that explains why its oldest entries are gone.
Checkpoints whose signature does not check are reported and not trusted. The report
names, per chain, the first bad entry and why; entries after a chain's last checkpoint
are linked but not yet signed, reported as ``unsigned`` rather than as a failure.

With ``jobs > 1`` chains are cut at checkpoints into segments verified by that many
processes: a segment starts from a signed head and must end on the next one, so the
segments together check exactly what one walk would. One core does about as much as the
database can stream to one Python process; large logs go faster with more.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, create_engine

from compliance.chain import FINAL, Checkpoint
from compliance.chain_walk import (
    Problem,
    Progress,
    Signed,
    WalkResult,
    chain_start,
    first_seq,
    last_seq,
    load_checkpoints,
    snapshot,
    sort_checkpoints,
    walk_chain,
    writer_ids,
)
from compliance.signing import CheckpointVerifier

__all__ = ["ChainStatus", "LogVerifier", "Problem", "Start", "VerifyReport"]


@dataclass(frozen=True, slots=True)
class Start:
    """Where verification begins: a time (every chain from its last checkpoint at or
    before it), or an entry ``writer:seq`` (that chain, from its last checkpoint before
    the entry). Either way the starting hash is one a genuine checkpoint signed."""

    time_us: int | None = None
    writer_id: str | None = None
    seq: int | None = None


@dataclass(slots=True)
class ChainStatus:
    writer_id: str
    verified_from: int
    """First sequence number checked."""
    last_seq: int
    signed_seq: int
    """Sequence number of the last genuine checkpoint the chain passed through."""
    closed: bool
    """The chain ends with a ``final`` checkpoint (its writer closed it)."""

    @property
    def unsigned(self) -> int:
        return max(0, self.last_seq - self.signed_seq)


@dataclass(slots=True)
class VerifyReport:
    entries: int = 0
    checkpoints: int = 0
    chains: list[ChainStatus] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned(self) -> int:
        return sum(c.unsigned for c in self.chains)


@dataclass(frozen=True, slots=True)
class Segment:
    """Part of a chain: the entries after ``start_seq`` up to ``until_seq`` (None: all)."""

    writer_id: str
    start_seq: int
    start_hash: bytes
    until_seq: int | None
    signed: Signed


class LogVerifier:
    """Verifies the audit log in ``engine`` against trusted checkpoint public keys."""

    def __init__(self, engine: Engine, public_keys: Iterable[Ed25519PublicKey]) -> None:
        self._engine = engine
        self._signatures = CheckpointVerifier(public_keys)

    def estimate(self) -> int:
        """About how many entries a full verification reads (for progress bars)."""
        with self._engine.connect() as connection:
            total = 0
            for writer in writer_ids(connection):
                low, high = first_seq(connection, writer), last_seq(connection, writer)
                if low is not None and high is not None:
                    total += high - low + 1
            return total

    def verify(
        self,
        start: Start | None = None,
        *,
        progress: Progress | None = None,
        jobs: int = 1,
        segment_entries: int = 200_000,
    ) -> VerifyReport:
        """Check the log (or its part from ``start``) with ``jobs`` processes."""
        report = VerifyReport()
        with snapshot(self._engine) as connection:
            all_checkpoints = load_checkpoints(connection)
            report.checkpoints = len(all_checkpoints)
            genuine, bad = sort_checkpoints(all_checkpoints, self._signatures)
            report.problems.extend(bad)
            writers = writer_ids(connection)
            if start is not None and start.writer_id is not None:
                if start.writer_id not in writers:
                    report.problems.append(Problem(start.writer_id, None, "no such chain"))
                writers = [w for w in writers if w == start.writer_id]
            plans: list[Segment] = []
            for writer in writers:
                plan = _plan(connection, writer, genuine.get(writer, {}), start)
                if isinstance(plan, Problem):
                    report.problems.append(plan)
                else:
                    plans.append(plan)
            if jobs <= 1:
                walks = [[_walk(connection, plan, progress)] for plan in plans]
        if jobs > 1:
            url = self._engine.url.render_as_string(hide_password=False)
            walks = _walk_in_parallel(url, plans, jobs, segment_entries, progress)
        for plan, results in zip(plans, walks, strict=True):
            _add_chain(report, plan, results)
        return report


def _plan(
    connection: Connection, writer: str, signed: Signed, start: Start | None
) -> Segment | Problem:
    """The whole chain to check: from its natural start, or a later chosen checkpoint."""
    anchor = chain_start(connection, writer, signed)
    if isinstance(anchor, Problem):
        return anchor
    seq, head = anchor
    later = _chosen_start(signed, start)
    if later is not None and later.seq > seq:
        seq, head = later.seq, later.head_hash
    return Segment(writer, seq, head, None, signed)


def _chosen_start(signed: Signed, start: Start | None) -> Checkpoint | None:
    """The last genuine checkpoint at or before ``start``, if any."""
    if start is None:
        return None
    best: Checkpoint | None = None
    for seq, cps in signed.items():
        for checkpoint in cps:
            if start.seq is not None and seq >= start.seq:
                continue
            if start.time_us is not None and checkpoint.time_us > start.time_us:
                continue
            if best is None or seq > best.seq:
                best = checkpoint
    return best


def _walk(connection: Connection, segment: Segment, progress: Progress | None) -> WalkResult:
    return walk_chain(
        connection,
        segment.writer_id,
        segment.start_seq,
        segment.start_hash,
        segment.signed,
        until_seq=segment.until_seq,
        progress=progress,
    )


def _add_chain(report: VerifyReport, plan: Segment, results: list[WalkResult]) -> None:
    """Fold the walks of one chain's consecutive segments into the report."""
    report.entries += sum(r.entries for r in results)
    last = results[-1]
    closed = any(c.kind == FINAL for c in plan.signed.get(last.seq, []))
    signed_seq = max(r.signed_seq for r in results)
    report.chains.append(
        ChainStatus(plan.writer_id, plan.start_seq + 1, last.seq, signed_seq, closed)
    )
    problem = next((r.problem for r in results if r.problem is not None), None)
    if problem is not None:
        report.problems.append(problem)


def split(plan: Segment, size: int) -> list[Segment]:
    """Cut a chain at genuine checkpoints into segments of at least ``size`` entries."""
    cuts: list[int] = []
    last = plan.start_seq
    for seq in sorted(s for s in plan.signed if s > plan.start_seq):
        if seq - last >= size:
            cuts.append(seq)
            last = seq
    bounds = [plan.start_seq, *cuts]
    segments = []
    for i, begin in enumerate(bounds):
        until = bounds[i + 1] if i + 1 < len(bounds) else None
        head = plan.start_hash if i == 0 else plan.signed[begin][0].head_hash
        signed = {
            s: cps for s, cps in plan.signed.items() if s > begin and (until is None or s <= until)
        }
        segments.append(Segment(plan.writer_id, begin, head, until, signed))
    return segments


def _walk_segment(url: str, segment: Segment) -> WalkResult:
    """In a worker process: walk one segment over a connection of its own."""
    engine = create_engine(url)
    try:
        with snapshot(engine) as connection:
            return _walk(connection, segment, None)
    finally:
        engine.dispose()


def _walk_in_parallel(
    url: str, plans: list[Segment], jobs: int, size: int, progress: Progress | None
) -> list[list[WalkResult]]:
    pieces = [split(plan, size) for plan in plans]
    results: list[list[WalkResult | None]] = [[None] * len(p) for p in pieces]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {
            pool.submit(_walk_segment, url, segment): (i, j)
            for i, segments in enumerate(pieces)
            for j, segment in enumerate(segments)
        }
        for future in as_completed(futures):
            i, j = futures[future]
            result = future.result()
            results[i][j] = result
            if progress is not None:
                progress(result.entries)
    return [[r for r in chain if r is not None] for chain in results]

"""Retention: old entries go, signed anchors keep what remains verifiable."""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, delete, func, select, update

from compliance.appender import ChainAppender
from compliance.audit_schema import checkpoints, entries
from compliance.records import now_us
from compliance.retention import apply_retention
from compliance.verify import VerifyReport
from tests.compliance.conftest import AppenderFactory
from tests.compliance.records import request_record

Verify = Callable[..., VerifyReport]
NOW = now_us()
DAY = 86_400 * 1_000_000


def aged_log(
    make_appender: AppenderFactory,
    writer_id: str = "w1",
    old: int = 25,
    young: int = 15,
    close: bool = True,
) -> ChainAppender:
    """``old`` entries from 100 days ago, then ``young`` from today; a checkpoint every 10."""
    appender = make_appender(writer_id, every_entries=10)
    for n in range(1, old + young + 1):
        when = NOW - 100 * DAY + n if n <= old else NOW - 1_000 + n
        appender.append(request_record(n, time_us=when))
    if close:
        appender.close()
    return appender


def kinds_by_seq(engine: Engine, writer_id: str = "w1") -> list[tuple[int, str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(checkpoints.c.seq, checkpoints.c.kind)
            .where(checkpoints.c.writer_id == writer_id)
            .order_by(checkpoints.c.seq)
        )
        return [(r.seq, r.kind) for r in rows]


def seqs(engine: Engine, writer_id: str = "w1") -> list[int]:
    with engine.connect() as connection:
        return list(
            connection.scalars(
                select(entries.c.seq)
                .where(entries.c.writer_id == writer_id)
                .order_by(entries.c.seq)
            )
        )


def test_retention_deletes_old_entries_and_anchors_the_rest(
    engine: Engine, make_appender: AppenderFactory, signing_key: Ed25519PrivateKey, verify: Verify
) -> None:
    aged_log(make_appender)
    dry = apply_retention(engine, signing_key, days=90, now=NOW, dry_run=True)
    assert dry.deleted == {"w1": 25} and len(seqs(engine)) == 40
    result = apply_retention(engine, signing_key, days=90, now=NOW, chunk=7)
    assert (result.deleted, result.anchors, result.refused) == ({"w1": 25}, 4, [])
    assert seqs(engine) == list(range(26, 41))
    assert kinds_by_seq(engine) == [
        (25, "retention"),
        (30, "periodic"),
        (40, "periodic"),
        (40, "final"),
    ]
    report = verify()
    assert report.ok, report.problems
    assert (report.entries, report.chains[0].verified_from) == (15, 26)
    again = apply_retention(engine, signing_key, days=90, now=NOW)
    assert again.total == 0 and verify().ok


def test_a_retained_chain_still_catches_tampering_and_extra_deletions(
    engine: Engine, make_appender: AppenderFactory, signing_key: Ed25519PrivateKey, verify: Verify
) -> None:
    aged_log(make_appender)
    apply_retention(engine, signing_key, days=90, now=NOW)
    with engine.begin() as connection:
        connection.execute(update(entries).where(entries.c.seq == 33).values(status=500))
    assert [(p.writer_id, p.seq) for p in verify().problems] == [("w1", 33)]
    with engine.begin() as connection:
        connection.execute(delete(entries).where(entries.c.seq <= 27))  # beyond the anchor
    report = verify()
    assert [(p.writer_id, p.seq) for p in report.problems] == [("w1", 26)]
    assert "without a retention anchor" in str(report.problems[0])


def test_retention_refuses_to_launder_tampered_entries(
    engine: Engine, make_appender: AppenderFactory, signing_key: Ed25519PrivateKey, verify: Verify
) -> None:
    aged_log(make_appender)
    with engine.begin() as connection:
        connection.execute(update(entries).where(entries.c.seq == 12).values(model="other"))
    result = apply_retention(engine, signing_key, days=90, now=NOW, chunk=10)
    assert [(p.writer_id, p.seq) for p in result.refused] == [("w1", 12)]
    assert seqs(engine)[0] == 11  # the verified first chunk went; the tampered one stays
    assert [(p.writer_id, p.seq) for p in verify().problems] == [("w1", 12)]


def test_closed_expired_chains_go_whole_and_live_ones_keep_an_anchor(
    engine: Engine, make_appender: AppenderFactory, signing_key: Ed25519PrivateKey, verify: Verify
) -> None:
    aged_log(make_appender, "closed", old=12, young=0)
    live = aged_log(make_appender, "live", old=12, young=0, close=False)
    result = apply_retention(engine, signing_key, days=90, now=NOW)
    assert result.deleted == {"closed": 12, "live": 12}
    assert kinds_by_seq(engine, "closed") == [] and seqs(engine, "closed") == []
    assert kinds_by_seq(engine, "live") == [(12, "retention")]
    assert verify().ok
    live.append(request_record(13))  # the writer goes on after the anchor
    live.close()
    report = verify()
    assert report.ok and report.entries == 1
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(entries)).scalar_one() == 1

"""The data-subject request ledger: deadlines of GDPR Art. 12(3), with an injected clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from compliance.privacy_ledger import (
    ExtensionRefused,
    LedgerRefused,
    RequestLedger,
    add_months,
    to_us,
)
from compliance.privacy_store import PrivacyStore, do_not_sell_subjects
from gateway.store import make_engine, migrate


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_due_one_month_and_one_extension_within_it(engine: Engine) -> None:
    clock = Clock(datetime(2026, 1, 31, 12, tzinfo=UTC))
    ledger = RequestLedger(engine, clock)
    row = ledger.open("access", "alice")
    assert row.due_us == to_us(datetime(2026, 2, 28, 12, tzinfo=UTC))
    clock.now += timedelta(days=20)
    extended = ledger.extend(row.id, "complex request, many systems")
    assert extended.extended_due_us == to_us(datetime(2026, 4, 30, 12, tzinfo=UTC))
    assert extended.extension_reason == "complex request, many systems"
    with pytest.raises(ExtensionRefused, match="already"):
        ledger.extend(row.id, "again")


def test_extension_refused_after_the_first_month(engine: Engine) -> None:
    clock = Clock(datetime(2026, 3, 1, tzinfo=UTC))
    ledger = RequestLedger(engine, clock)
    row = ledger.open("erasure", "bob")
    clock.now = add_months(clock.now, 1) + timedelta(seconds=1)
    with pytest.raises(ExtensionRefused, match="first month"):
        ledger.extend(row.id, "too late")
    with pytest.raises(ExtensionRefused, match="reason"):
        ledger.extend(row.id, " ")
    ledger.close(row.id)
    closed = ledger.get(row.id)
    assert closed is not None and closed.status == "completed" and closed.completed_us


def test_do_not_sell_and_pseudonymised_ledger(engine: Engine) -> None:
    store = PrivacyStore(engine)
    store.set_flags("carol", do_not_sell=True)
    store.set_flags("dave", do_not_sell=False, restricted=True)
    assert do_not_sell_subjects(engine) == {"carol"}
    ledger = RequestLedger(engine)
    ledger.open("access", "carol")
    assert ledger.pseudonymise("carol", "erased:x") == 1
    assert [r.subject for r in ledger.list()] == ["erased:x"]


def test_a_request_received_by_letter_is_due_a_month_after_receipt(engine: Engine) -> None:
    clock = Clock(datetime(2026, 3, 20, 9, tzinfo=UTC))
    ledger = RequestLedger(engine, clock)
    received = datetime(2026, 2, 27, tzinfo=UTC)  # it sat in the post room for three weeks
    row = ledger.log("objection", "erin", received, "letter", "ref 2026/17")
    assert (row.received_us, row.due_us) == (
        to_us(received),
        to_us(datetime(2026, 3, 27, tzinfo=UTC)),
    )
    assert (row.status, row.channel, row.note) == ("open", "letter", "ref 2026/17")
    listed = ledger.list(subject_id="erin")[0].as_json()
    assert listed["channel"] == "letter" and listed["due"] == "2026-03-27T00:00:00+00:00"
    # Extension is still measured from receipt: within the first month, three months in all.
    assert ledger.extend(row.id, "many systems").extended_due_us == to_us(
        datetime(2026, 5, 27, tzinfo=UTC)
    )
    naive = ledger.log("portability", "erin", datetime(2026, 3, 1), "email")
    assert naive.received_us == to_us(datetime(2026, 3, 1, tzinfo=UTC))
    assert ledger.open("access", "erin").as_json()["channel"] == "api"


@pytest.mark.parametrize(
    ("received", "channel", "refusal"),
    [
        (datetime(2026, 3, 20, 10, tzinfo=UTC), "letter", "future"),
        (datetime(2025, 3, 18, tzinfo=UTC), "letter", "more than a year"),
        (datetime(2026, 3, 1, tzinfo=UTC), "pigeon", "unknown channel"),
    ],
)
def test_a_logged_request_needs_a_plausible_date_and_channel(
    engine: Engine, received: datetime, channel: str, refusal: str
) -> None:
    ledger = RequestLedger(engine, Clock(datetime(2026, 3, 20, 9, tzinfo=UTC)))
    with pytest.raises(LedgerRefused, match=refusal):
        ledger.log("access", "erin", received, channel)
    with pytest.raises(LedgerRefused, match="unknown right"):
        ledger.log("telepathy", "erin", datetime(2026, 3, 1, tzinfo=UTC), "letter")
    assert ledger.list() == []


def test_completing_a_request_by_hand(engine: Engine) -> None:
    clock = Clock(datetime(2026, 3, 20, 9, tzinfo=UTC))
    ledger = RequestLedger(engine, clock)
    row = ledger.log("erasure", "erin", datetime(2026, 3, 18, tzinfo=UTC), "phone", "Erin E.")
    with pytest.raises(LedgerRefused, match="reason"):
        ledger.complete(row.id, "refused", " ")
    clock.now += timedelta(days=2)
    done = ledger.complete(row.id)
    assert (done.status, done.completed_us) == ("completed", to_us(clock.now))
    with pytest.raises(LedgerRefused, match="completed already"):
        ledger.complete(row.id, "refused", "manifestly unfounded")
    with pytest.raises(KeyError):
        ledger.complete("0" * 16)
    other = ledger.log("access", "erin", datetime(2026, 3, 19, tzinfo=UTC), "email")
    refused = ledger.complete(other.id, "refused", "identity not established")
    assert (refused.status, refused.status_reason) == ("refused", "identity not established")
    # Erasure keeps the rows, but neither the subject id nor the free-text notes.
    assert ledger.pseudonymise("erin", "erased:x") == 2
    assert [(r.subject, r.note) for r in ledger.list()] == [("erased:x", None)] * 2

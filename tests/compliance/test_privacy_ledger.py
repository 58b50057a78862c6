"""The data-subject request ledger: deadlines of GDPR Art. 12(3), with an injected clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from compliance.privacy_ledger import ExtensionRefused, RequestLedger, add_months, to_us
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

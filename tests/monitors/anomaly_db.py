"""A migrated database of each kind for the anomaly tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from gateway.store import make_engine, migrate
from tests.databases import database


@pytest.fixture(params=["sqlite", "postgresql"])
def anomaly_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with database(request.param, tmp_path) as url:
        engine = make_engine(url)
        migrate(engine)
        yield engine
        engine.dispose()

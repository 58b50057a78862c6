"""The SQL store's engine: a SQLite file is created private (issue 14, item 11)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from compliance.private_files import make_private_directory, open_private
from gateway.store import make_engine, migrate, sqlite_file


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def loose_umask():  # type: ignore[no-untyped-def]
    old = os.umask(0o022)  # the usual default: files 0644, folders 0755
    yield
    os.umask(old)


@pytest.mark.usefixtures("loose_umask")
def test_a_new_sqlite_store_and_its_new_folders_are_private(tmp_path: Path) -> None:
    existing = tmp_path / "srv"
    existing.mkdir(mode=0o755)
    path = existing / "state" / "db" / "bastion.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        migrate(engine)
    finally:
        engine.dispose()
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
    assert mode(existing) == 0o755  # a folder that was there keeps its mode
    for side in (path.with_name("bastion.db-wal"), path.with_name("bastion.db-shm")):
        if side.exists():
            assert mode(side) == 0o600, side


@pytest.mark.usefixtures("loose_umask")
def test_private_files_and_folders(tmp_path: Path) -> None:
    make_private_directory(tmp_path / "a" / "b")
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700
    loose = tmp_path / "a" / "old.tar"
    loose.write_bytes(b"x")
    os.chmod(loose, 0o644)
    with open_private(loose) as out:
        out.write(b"new")
    assert mode(loose) == 0o600 and loose.read_bytes() == b"new"


def test_which_urls_name_a_file(tmp_path: Path) -> None:
    assert sqlite_file(f"sqlite:///{tmp_path}/x.db") == tmp_path / "x.db"
    assert sqlite_file("sqlite:///relative.db") == Path("relative.db")
    assert sqlite_file("sqlite://") is None
    assert sqlite_file("sqlite:///:memory:") is None
    assert sqlite_file("sqlite:///file:x.db?mode=ro&uri=true") is None

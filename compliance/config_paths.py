"""Paths written in a configuration file are relative to that file, not to the folder a
command happens to run in (one rule for ``bastion``'s gateway and compliance commands).
"""

from __future__ import annotations

from pathlib import Path

SQLITE_PREFIX = "sqlite:///"


def resolve_path(value: str | Path, base: Path) -> Path:
    """``value`` as written in a configuration file that lives in folder ``base``."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def resolve_database_url(url: str, base: Path) -> str:
    """A relative SQLite file in ``url`` made absolute against ``base``; others unchanged."""
    if not url.startswith(SQLITE_PREFIX):
        return url
    rest = url.removeprefix(SQLITE_PREFIX)
    if not rest or rest.startswith("/") or rest.startswith(":memory:"):
        return url
    return SQLITE_PREFIX + str(resolve_path(rest, base))


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite"):
        return None
    _, _, rest = url.partition(":///")
    rest = rest.split("?", 1)[0]
    if not rest or rest.startswith(":memory:"):
        return None
    return Path(rest)

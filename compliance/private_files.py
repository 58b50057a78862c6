"""Files that hold personal data or secrets are created private: 0600, in 0700 folders.

The SQLite store (subject ids, privacy profiles), signing keys and export bundles are made
readable by their owner only, whatever the process's umask. Only what we create is
changed: an existing folder (the working directory, /tmp) keeps its mode.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def make_private_directory(path: Path) -> None:
    """Create ``path`` and any missing parent, each 0700; existing ones are left alone."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:
            continue  # made meanwhile by another process: theirs
        os.chmod(directory, DIRECTORY_MODE)  # mkdir's mode is masked by the umask


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 (folders as :func:`make_private_directory`)
    unless it exists; True if this call created it."""
    make_private_directory(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def open_private(path: Path, mode: str = "wb"):  # type: ignore[no-untyped-def]
    """``open(path, mode)`` for writing a new or replaced file, created 0600."""
    make_private_directory(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # a file that existed keeps its mode otherwise
    return os.fdopen(fd, mode)

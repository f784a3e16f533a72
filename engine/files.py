"""Small durable file-system steps shared by the model store and its version history."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "fsync_dir", "is_temp_file", "link_or_copy", "make_dirs", "write_synced"]

FILE_MODE = 0o644
DIR_MODE = 0o755
_TEMP_FILE = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")        # what storage.atomic_write_bytes writes first


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is the temp file of an atomic write (left behind only by a crash)."""
    return _TEMP_FILE.fullmatch(name) is not None


def make_dirs(path: Path) -> None:
    """``mkdir -p`` that gives every folder it creates mode 0o755 (less if the umask says so).

    pathlib's ``mkdir(parents=True)`` creates the parents with 0o777 minus the umask: world-writable
    folders in the data root when the engine runs with umask 0.
    """
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link to ``source`` (no data copied), or a fsynced copy where links are not supported."""
    try:
        os.link(source, target)
    except OSError:
        if not source.is_file():
            raise
        write_synced(target, source.read_bytes())   # no hard links here (FAT, some network shares)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, FILE_MODE)

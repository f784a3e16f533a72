"""The kept versions of one model: immutable folders ``model_versions/<role>/<roi>/<n>/``.

The served version stays where it always was (``models/<role>/<roi>/``, see ``engine.storage``);
every version that was ever served is also kept here under its number, as hard links to the same
files (copies where the file system has none), so keeping it costs no space until it is replaced.
Nothing in a version folder is ever written again: files are only ever replaced by renames.

A version folder appears in one rename (``.staging-<id>`` -> ``<n>``) and disappears in one
(``<n>`` -> ``.trash-<id>``, then removed), so a crash never leaves half a version under a number;
hidden leftovers are ignored by every reader and removed by ``recover``. Every file of the served
folder is kept, whatever its name (temp files of an interrupted write excepted), so files other
parts of the engine add to a model travel with its versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from engine.files import DIR_MODE, fsync_dir, is_temp_file, link_or_copy, make_dirs

__all__ = ["VersionHistory", "copy_folder_files"]

_NUMBER = re.compile(r"[1-9][0-9]{0,8}")
_LEFTOVER = re.compile(r"\.(?:staging|trash)-[0-9a-f]{8}")
_REMOVED = re.compile(r"\..+\.trash-[0-9a-f]{8}")        # a whole history being removed (``remove_all``)


def copy_folder_files(source: Path, target: Path) -> list[str]:
    """Hard-link (or copy) every plain file of ``source`` into the existing folder ``target``;
    returns the names. Temp files of an interrupted atomic write are left out."""
    names = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.is_symlink() and not is_temp_file(path.name):
            link_or_copy(path, target / path.name)
            names.append(path.name)
    return names


class VersionHistory:
    """The version folders of one model (``folder`` is ``model_versions/<role>/<roi>``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, number: int) -> Path:
        return self.folder / str(int(number))

    def numbers(self) -> list[int]:
        """Numbers of the complete versions kept, ascending."""
        if not self.folder.is_dir():
            return []
        return sorted(int(p.name) for p in self.folder.iterdir()
                      if _NUMBER.fullmatch(p.name) and (p / "manifest.json").is_file())

    def has(self, number: int) -> bool:
        return (self.path(number) / "manifest.json").is_file()

    def manifest(self, number: int) -> dict[str, Any] | None:
        """The manifest of version ``number`` as stored (not verified), None when unreadable."""
        try:
            data = json.loads((self.path(number) / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def keep(self, source: Path, number: int) -> bool:
        """Keep the files of the model folder ``source`` as version ``number``, unless that version
        is kept already; returns whether it was added. Raises OSError (nothing half-kept)."""
        if self.has(number):
            return False
        make_dirs(self.folder)
        staging = self.folder / f".staging-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir(mode=DIR_MODE)
            copy_folder_files(source, staging)
            fsync_dir(staging)
            if self.path(number).exists():          # a folder without manifest: an older tool's debris
                self._discard(self.path(number))
            os.rename(staging, self.path(number))
            fsync_dir(self.folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True

    def prune(self, kept: int, active: int | None) -> list[int]:
        """Remove all but the ``kept`` newest versions, never the ``active`` one; returns the numbers
        removed (oldest first)."""
        numbers = self.numbers()
        newest = set(numbers[-kept:]) if kept > 0 else set()
        removed = [n for n in numbers if n not in newest and n != active]
        for number in removed:
            self._discard(self.path(number))
        return removed

    def remove_all(self) -> None:
        if self.folder.exists():
            self._discard(self.folder, self.folder.with_name(f".{self.folder.name}.trash-{uuid.uuid4().hex[:8]}"))

    def recover(self) -> None:
        """Remove what a crash left: staging folders of a version being kept, trash being removed
        (this whole folder, when it is the trash of a removed history)."""
        if _REMOVED.fullmatch(self.folder.name):
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self.folder.is_dir():
            for path in self.folder.iterdir():
                if _LEFTOVER.fullmatch(path.name):
                    shutil.rmtree(path, ignore_errors=True)

    def _discard(self, path: Path, trash: Path | None = None) -> None:
        """One rename out of sight, then the removal (a crash in between leaves only hidden trash)."""
        trash = trash or self.folder / f".trash-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

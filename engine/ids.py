"""Validation of the identifiers that become folder and file names."""

from __future__ import annotations

import re

from engine.errors import InvalidId, ReservedRecipe

__all__ = ["DEFAULT_RECIPE", "MAX_ID_LENGTH", "check_filename", "check_id", "check_recipe"]

MAX_ID_LENGTH = 128
DEFAULT_RECIPE = "default"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]*")
# names Windows refuses as files or folders, whatever the extension
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def _check(kind: str, value: object, pattern: re.Pattern[str], max_length: int) -> str:
    if not isinstance(value, str):
        raise InvalidId(f"{kind} must be a string")
    if not value or len(value) > max_length:
        raise InvalidId(f"{kind} must have 1..{max_length} characters")
    if not pattern.fullmatch(value) or ".." in value or value.endswith((".", " ")):
        raise InvalidId(
            f"{kind} {value[:40]!r} may only hold ASCII letters, digits, '_', '-' and '.' "
            "(no path separators, no '..')"
        )
    if value.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise InvalidId(f"{kind} {value!r} is a reserved device name on Windows")
    return value


def check_id(kind: str, value: object) -> str:
    """A role, ROI or model id safe to use as one folder name.

    Raises:
        InvalidId: empty, too long, unsafe characters, traversal.
    """
    return _check(kind, value, _ID, MAX_ID_LENGTH)


def check_filename(value: object) -> str:
    """A dataset sample file name: one safe path component (spaces allowed).

    Raises:
        InvalidId: unsafe name.
    """
    return _check("filename", value, _FILENAME, 200)


def check_recipe(value: str | None) -> str | None:
    """None for the default recipe (the seed's layout), else a validated recipe id.

    Raises:
        ReservedRecipe: ``last`` is reserved by the GUI.
        InvalidId: unsafe id.
    """
    if value is None or value == "" or value == DEFAULT_RECIPE:
        return None
    if isinstance(value, str) and value.lower() == "last":
        raise ReservedRecipe("recipe_id 'last' is reserved")
    return check_id("recipe_id", value)

"""Every check of a value a caller hands the engine, in one place.

Each check returns the value in canonical form or raises an ``InvalidInput`` subclass (400), so
both doors report the same fault with the same code: identifiers that become folder and file
names, finite numbers, labels, heatmap formats, JSON metadata. ``stored_calibration`` checks what
scoring reads back from disk (500 ``corrupt_model``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from engine.errors import CorruptModel, InvalidId, InvalidInput, ReservedRecipe

__all__ = [
    "DEFAULT_RECIPE",
    "HEATMAP_FORMATS",
    "LABELS",
    "MAX_ID_LENGTH",
    "check_filename",
    "check_id",
    "check_recipe",
    "heatmap_format",
    "is_finite",
    "json_object",
    "label",
    "non_negative_number",
    "percentile_fraction",
    "positive_number",
    "stored_calibration",
]

MAX_ID_LENGTH = 128
DEFAULT_RECIPE = "default"
LABELS: tuple[Literal["ok"], Literal["ng"]] = ("ok", "ng")
HEATMAP_FORMATS = ("png", "uint8", "float32", "none")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]*")
# names Windows refuses as files or folders, whatever the extension
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


# --- identifiers ---------------------------------------------------------------------------

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


# --- numbers -------------------------------------------------------------------------------

def is_finite(value: object) -> bool:
    """True for an int or float that is finite as a float (False for bools, NaN, inf, huge ints)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:   # an int beyond the float range
        return False


def _number(value: object, name: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:   # OverflowError: an int beyond float range
        raise InvalidInput(f"{name} must be a number, got {value!r}") from exc
    if isinstance(value, bool) or not math.isfinite(number):
        raise InvalidInput(f"{name} must be a finite number, got {value!r}")
    return number


def positive_number(value: object, name: str = "mm_per_px") -> float:
    """A finite number > 0 (numeric text accepted, as a form field would carry it).

    Raises:
        InvalidInput: not a number, not finite, or <= 0.
    """
    number = _number(value, name)
    if number <= 0:
        raise InvalidInput(f"{name} must be a finite number > 0, got {value!r}")
    return number


def non_negative_number(value: object, name: str) -> float:
    """A finite int or float >= 0 (no text: JSON and msgpack carry numbers as numbers).

    Raises:
        InvalidInput: not a number, not finite, or < 0.
    """
    if not is_finite(value) or value < 0:  # type: ignore[operator]
        raise InvalidInput(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def percentile_fraction(value: object) -> float:
    """A percentile as a fraction: values in (0, 1] are fractions, values in (1, 100] percents.

    Raises:
        InvalidInput: not a finite number in (0, 100].
    """
    # an int is finite however large (is_finite is False only beyond the float range)
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not (isinstance(value, int) or math.isfinite(value)) or not 0 < value <= 100:
        raise InvalidInput(f"score_percentile must be in (0, 1] (fraction) or (1, 100] (percent), got {value!r}")
    return float(value) / 100.0 if value > 1 else float(value)


# --- labels, formats, metadata -------------------------------------------------------------

def label(value: object) -> Literal["ok", "ng"]:
    """``ok`` or ``ng``.

    Raises:
        InvalidInput: anything else.
    """
    if value == "ok" or value == "ng":
        return value  # type: ignore[return-value]
    raise InvalidInput(f"label must be 'ok' or 'ng', got {value!r}")


def heatmap_format(value: object) -> str:
    """One of ``png``, ``uint8``, ``float32``, ``none``.

    Raises:
        InvalidInput: anything else.
    """
    if isinstance(value, str) and value in HEATMAP_FORMATS:
        return value
    raise InvalidInput(f"heatmap must be png, uint8, float32 or none, got {value!r}")


def json_object(value: object, name: str = "meta") -> dict[str, Any] | None:
    """None, or a dict that serializes as plain JSON (stored as a file and read back later).

    Raises:
        InvalidInput: not a dict, or bytes, non-text keys, deep nesting.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(f"{name} must be a JSON object")
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"{name} must be plain JSON (text keys, no binary, not deeply nested): "
                           f"{type(exc).__name__}") from None
    return value


def stored_calibration(calibration: dict[str, Any] | None, where: str) -> None:
    """calibration.json is not checksummed (it is the source of truth): check what scoring reads.

    Raises:
        CorruptModel: threshold or area_mm2_thr missing or not a finite number.
    """
    if calibration is None:
        return
    for name in ("threshold", "area_mm2_thr"):
        value = calibration.get(name)
        if not is_finite(value):
            raise CorruptModel(f"model {where}: calibration.json has no valid {name} ({value!r}); calibrate again")

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
from datetime import datetime
from typing import Any, Literal

from engine.errors import CorruptModel, InvalidId, InvalidInput, PayloadTooLarge, ReservedRecipe
from engine.limits import ValueRefused, check_structure

__all__ = [
    "DEFAULT_RECIPE",
    "HEATMAP_FORMATS",
    "LABELS",
    "MAX_ID_LENGTH",
    "MM_PER_PX_RANGE",
    "check_filename",
    "check_id",
    "check_recipe",
    "heatmap_format",
    "is_finite",
    "json_object",
    "label",
    "mm_per_px",
    "non_negative_number",
    "percentile_fraction",
    "positive_number",
    "sample_metadata",
    "stored_calibration",
]

MAX_ID_LENGTH = 128
DEFAULT_RECIPE = "default"
LABELS: tuple[Literal["ok"], Literal["ng"]] = ("ok", "ng")
HEATMAP_FORMATS = ("png", "uint8", "float32", "none")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]*")
# names Windows refuses as files or folders, whatever the extension and trailing blanks ("con .png")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
# millimetres per pixel a camera can have (0.001 um to 1 m per pixel): areas stay finite numbers
MM_PER_PX_RANGE = (1e-6, 1e3)
# numeric text as a form field carries it: no "0.1_0", "inf", "nan", hex or blanks (float() takes them)
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


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
    if value.split(".")[0].rstrip(" ").lower() in _WINDOWS_RESERVED:
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
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise InvalidInput(f"{name} must be a decimal number, got {value[:40]!r}")
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


def mm_per_px(value: object, name: str = "mm_per_px") -> float:
    """A scale in millimetres per pixel, within ``MM_PER_PX_RANGE`` (numeric text accepted).

    Raises:
        InvalidInput: not a finite number, or outside the range.
    """
    number = positive_number(value, name)
    low, high = MM_PER_PX_RANGE
    if not low <= number <= high:
        raise InvalidInput(f"{name} must be in [{low:g}, {high:g}] mm per pixel, got {value!r}")
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


def json_object(value: object, name: str = "meta", *, max_depth: int = 32,
                max_bytes: int = 64 * 1024) -> dict[str, Any] | None:
    """None, or a dict that serializes as standard JSON (stored as a file and read back later):
    text keys, finite numbers, at most ``max_depth`` levels and ``max_bytes`` bytes as JSON.

    Raises:
        InvalidInput: not a dict, or bytes, non-text keys, NaN/Infinity, deep nesting.
        PayloadTooLarge: larger than ``max_bytes``.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(f"{name} must be a JSON object")
    try:
        check_structure(value, max_depth=max_depth, max_items=max_bytes)   # each item is >= 1 byte of JSON
        size = len(json.dumps(value, allow_nan=False))    # ASCII: non-ASCII text is escaped
    except ValueRefused as exc:
        raise (PayloadTooLarge if exc.too_large else InvalidInput)(f"{name}: {exc}") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"{name} must be standard JSON (text keys, finite numbers, no binary): "
                           f"{type(exc).__name__}") from None
    if size > max_bytes:
        raise PayloadTooLarge(f"{name} is {size} bytes as JSON; the limit is {max_bytes}")
    return value


# what the existing GUI reads back from a sample's metadata, typed (shared GUI_CLIENT.md)
_META_TEXT = ("role_id", "roi_id", "label", "filename", "created_at_utc", "source_path")


def sample_metadata(value: object, *, max_depth: int = 32, max_bytes: int = 64 * 1024) -> dict[str, Any] | None:
    """``json_object``, with the fields the GUI reads back typed as its reader needs them:
    ``mm_per_px`` a finite number > 0, ``angle`` a finite number or null, ``timestamp`` an ISO 8601
    date-time or null, the text fields text or null (each only when present; others are free).

    Raises:
        InvalidInput: not a JSON object, or one of those fields of the wrong type.
    """
    meta = json_object(value, max_depth=max_depth, max_bytes=max_bytes)
    if meta is None:
        return None
    mm = meta.get("mm_per_px", 1.0)
    if not is_finite(mm) or mm <= 0:
        raise InvalidInput(f"meta.mm_per_px must be a finite number > 0, got {mm!r}")
    if meta.get("angle") is not None and not is_finite(meta["angle"]):
        raise InvalidInput(f"meta.angle must be a finite number or null, got {meta['angle']!r}")
    for name in _META_TEXT:
        if meta.get(name) is not None and not isinstance(meta[name], str):
            raise InvalidInput(f"meta.{name} must be text or null, got {meta[name]!r}")
    stamp = meta.get("timestamp")
    try:
        if stamp is not None:
            datetime.fromisoformat(stamp.removesuffix("Z") if isinstance(stamp, str) else "")
    except ValueError:
        raise InvalidInput(f"meta.timestamp must be an ISO 8601 date-time or null, got {stamp!r}") from None
    return meta


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

"""Property-based fuzzing of request validation: shapes, ids, percentiles, mm_per_px, image bytes.

Whatever the input, each validator returns a valid value or raises one of the engine's typed errors
(``EngineError`` subclasses); never another exception. ``FUZZ_EXAMPLES`` sets the number of
examples per test (default 200; docs/reliability.md gives the longer command).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from engine.errors import (
    CorruptModel,
    EngineError,
    InvalidId,
    InvalidImage,
    InvalidInput,
    InvalidShape,
    PayloadTooLarge,
)
from engine.images import decode_image, from_array
from engine.masks import parse_shape, shape_mask
from engine.validate import (
    MAX_ID_LENGTH,
    check_filename,
    check_id,
    check_recipe,
    percentile_fraction,
    positive_number,
    stored_calibration,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
# no subnormal floats: the engine flushes denormals to zero (engine.features, for CPU speed), and
# hypothesis refuses to generate them once that processor flag is set
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# anything JSON or msgpack can carry, and a few Python values the engine API may be handed
NUMBERS = st.integers() | st.floats(allow_subnormal=False) | st.integers(min_value=10**300, max_value=10**400)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=30) | st.binary(max_size=30)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=16)


# --- shapes --------------------------------------------------------------------------------------

NEAR_NUMBERS = NUMBERS | st.sampled_from([0, -1, 0.5, 1e308, -1e308, "10", None, True, [], {}])
SHAPE_DICTS = st.fixed_dictionaries(
    {"kind": st.sampled_from(["rect", "circle", "annulus", "ellipse", "", None, 3])},
    optional={k: NEAR_NUMBERS for k in ("x", "y", "w", "h", "cx", "cy", "r", "r_inner")}
    | {"extra": VALUES},
)
SHAPES = (SHAPE_DICTS | VALUES | (SHAPE_DICTS | VALUES).map(lambda v: json.dumps(v, default=repr))
          | st.text(max_size=60) | st.binary(max_size=60))


@FUZZ
@given(shape=SHAPES, height=st.integers(1, 64), width=st.integers(1, 64))
def test_parse_shape_and_mask_raise_only_invalid_shape(shape: Any, height: int, width: int) -> None:
    try:
        parsed = parse_shape(shape)
    except InvalidShape:
        return
    try:
        mask = shape_mask(parsed, height, width)
    except InvalidShape:
        return
    if mask is not None:
        assert mask.shape == (height, width) and mask.dtype == bool and mask.any()


@FUZZ
@given(kind=st.sampled_from(["rect", "circle", "annulus"]),
       nums=st.lists(st.floats(-100, 200, allow_subnormal=False), min_size=4, max_size=4), size=st.integers(8, 64))
def test_a_shape_inside_the_image_always_gives_a_mask(kind: str, nums: list[float], size: int) -> None:
    a, b, c, d = nums
    shape = {"rect": {"kind": "rect", "x": a, "y": b, "w": c, "h": d},
             "circle": {"kind": "circle", "cx": a, "cy": b, "r": c},
             "annulus": {"kind": "annulus", "cx": a, "cy": b, "r": c, "r_inner": d}}[kind]
    try:
        mask = shape_mask(parse_shape(json.dumps(shape)), size, size)
    except InvalidShape:
        return
    assert mask is not None and mask.shape == (size, size) and mask.any()


# --- ids -----------------------------------------------------------------------------------------

ID_TEXT = st.text(max_size=300) | st.text(alphabet="abc./\\\x00:-_ %~", max_size=20) | st.sampled_from(
    ["..", ".", "../x", "con", "CON.png", "nul.txt", "a..b", " a", "a ", "é", "a/b", "x" * 129])


def _is_safe_name(value: str, limit: int) -> None:
    assert 0 < len(value) <= limit and value.isascii() and value.isprintable()
    assert not any(c in value for c in "/\\\x00:") and ".." not in value
    assert PurePosixPath(value).name == value == PureWindowsPath(value).name
    assert not value.startswith((".", "-", " ")) and not value.endswith((".", " "))


@FUZZ
@given(value=ID_TEXT | VALUES)
def test_ids_are_safe_folder_names_or_invalid_id(value: Any) -> None:
    for check, limit in ((lambda v: check_id("role_id", v), MAX_ID_LENGTH), (check_filename, 200)):
        try:
            accepted = check(value)
        except InvalidId:
            continue
        assert accepted == value
        _is_safe_name(accepted, limit)
    try:
        recipe = check_recipe(value)
    except (InvalidId, InvalidInput):
        return
    assert recipe is None or (recipe == value and recipe.lower() not in ("last", "default"))


# --- numbers -------------------------------------------------------------------------------------

@FUZZ
@given(value=VALUES)
def test_percentile_fraction_is_a_fraction_or_invalid_input(value: Any) -> None:
    try:
        fraction = percentile_fraction(value)
    except InvalidInput:
        return
    assert isinstance(fraction, float) and 0 < fraction <= 1


@FUZZ
@given(value=VALUES | st.sampled_from(["nan", "inf", "-0", "1e400", "0x10", " 1 ", "1_0"]))
def test_mm_per_px_is_finite_positive_or_invalid_input(value: Any) -> None:
    try:
        mm = positive_number(value)
    except InvalidInput:
        return
    assert isinstance(mm, float) and math.isfinite(mm) and mm > 0


@FUZZ
@given(calibration=st.dictionaries(st.sampled_from(["threshold", "area_mm2_thr", "model_version"]), VALUES))
def test_calibration_file_values_are_numbers_or_corrupt_model(calibration: dict[str, Any]) -> None:
    try:
        stored_calibration(calibration, "r/a")
    except CorruptModel:
        return
    assert all(math.isfinite(float(calibration[k])) for k in ("threshold", "area_mm2_thr"))


# --- image bytes ---------------------------------------------------------------------------------

def _encoded(fmt: str, mode: str) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    img = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257) if mode == "I;16" else img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"compression": "tiff_lzw"} if fmt == "TIFF" else {}))
    return buf.getvalue()


SEEDS = [_encoded(f, m) for f, m in [("PNG", "RGB"), ("PNG", "I;16"), ("PNG", "P"), ("PNG", "LA"), ("JPEG", "RGB"),
                                     ("JPEG", "CMYK"), ("BMP", "RGB"), ("TIFF", "RGB"), ("TIFF", "I;16"),
                                     ("TIFF", "CMYK")]]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op, pos = draw(st.integers(0, 2)), draw(st.integers(0, len(data) - 1))
        if op == 0:
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            data = data[: max(pos, 1)]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@FUZZ
@given(data=_mutated() | st.binary(max_size=200))
def test_decode_raises_only_typed_errors(data: bytes) -> None:
    try:
        rgb = decode_image(data, 4096)
    except (InvalidImage, PayloadTooLarge):
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[0] * rgb.shape[1] <= 4096


@FUZZ
@given(shape=st.lists(st.integers(0, 20), min_size=0, max_size=4),
       dtype=st.sampled_from(["uint8", "uint16", "float32", "int8", "bool", "int64"]))
def test_pixel_buffers_raise_only_typed_errors(shape: list[int], dtype: str) -> None:
    try:
        rgb = from_array(np.zeros(shape, dtype=dtype), 400)
    except (InvalidImage, PayloadTooLarge):
        return
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3


def test_every_validator_error_is_an_engine_error() -> None:
    for cls in (InvalidShape, InvalidId, InvalidInput, InvalidImage, PayloadTooLarge, CorruptModel):
        assert issubclass(cls, EngineError)


@pytest.mark.parametrize("huge", [10**400, -(10**400)])
def test_int_beyond_float_range_is_invalid_input_not_overflow(huge: int) -> None:
    """Regression: math.isfinite / float() raised OverflowError on an int beyond the float range."""
    with pytest.raises(InvalidInput):
        percentile_fraction(huge)
    with pytest.raises(InvalidInput):
        positive_number(huge)
    with pytest.raises(CorruptModel):
        stored_calibration({"threshold": huge, "area_mm2_thr": 1.0}, "r/a")

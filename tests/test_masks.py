"""ROI shapes -> boolean masks: exact pixel sets on small grids, and every rejection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import InvalidInput, InvalidShape
from engine.masks import parse_shape, shape_mask
from engine.schemas import AnnulusShape, CircleShape, RectShape


def _mask(shape: object, h: int, w: int) -> np.ndarray:
    mask = shape_mask(parse_shape(shape), h, w)  # type: ignore[arg-type]
    assert mask is not None
    assert mask.shape == (h, w) and mask.dtype == bool
    return mask


def test_rect_exact_pixels() -> None:
    mask = _mask({"kind": "rect", "x": 1, "y": 2, "w": 3, "h": 4}, 10, 8)
    expected = np.zeros((10, 8), bool)
    expected[2:6, 1:4] = True                               # rows y..y+h, columns x..x+w
    assert mask.sum() == 12
    np.testing.assert_array_equal(mask, expected)


def test_rect_fractional_uses_pixel_centres() -> None:
    # columns whose centre j + 0.5 lies in [0.6, 3.1): 1.5, 2.5 -> 2 columns; rows [1.4, 2.6): 1.5, 2.5
    mask = _mask({"kind": "rect", "x": 0.6, "y": 1.4, "w": 2.5, "h": 1.2}, 6, 6)
    assert sorted(zip(*np.nonzero(mask), strict=True)) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_rect_whole_image_and_edge_tolerance() -> None:
    assert _mask(RectShape(x=0, y=0, w=8, h=6), 6, 8).all()
    # up to one pixel over the edge is accepted (GUI rounding) and clipped
    assert _mask(RectShape(x=-0.5, y=-0.5, w=9, h=7), 6, 8).sum() == 48


def test_circle_area_close_to_pi_r2() -> None:
    mask = _mask({"kind": "circle", "cx": 50, "cy": 50, "r": 20}, 100, 100)
    assert abs(int(mask.sum()) - math.pi * 20**2) < 0.01 * math.pi * 20**2
    # pixel centres (30.5, 50.5): d2 = 19.5^2 + 0.5^2 <= 400; (29.5, 50.5): d > 20
    assert mask[50, 50] and mask[50, 30] and not mask[50, 29]
    assert not mask[29, 29] and not mask[0, 0]


def test_circle_small_exact_pixels() -> None:
    # r = 1 around the corner shared by pixels (1,1),(1,2),(2,1),(2,2): their centres are at d = 0.707
    mask = _mask(CircleShape(cx=2, cy=2, r=1), 4, 4)
    assert sorted(zip(*np.nonzero(mask), strict=True)) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_annulus_excludes_inner_disc() -> None:
    outer = _mask({"kind": "circle", "cx": 20, "cy": 20, "r": 10}, 40, 40)
    inner = _mask({"kind": "circle", "cx": 20, "cy": 20, "r": 5}, 40, 40)
    ring = _mask({"kind": "annulus", "cx": 20, "cy": 20, "r": 10, "r_inner": 5}, 40, 40)
    np.testing.assert_array_equal(ring, outer & ~inner)
    assert ring.sum() == outer.sum() - inner.sum()
    assert not ring[20, 20] and ring[20, 12]
    assert abs(int(ring.sum()) - math.pi * (100 - 25)) < 0.05 * math.pi * 75


def test_annulus_zero_inner_is_circle_without_centre_point() -> None:
    ring = _mask(AnnulusShape(cx=5, cy=5, r=3, r_inner=0), 10, 10)
    np.testing.assert_array_equal(ring, _mask(CircleShape(cx=5, cy=5, r=3), 10, 10))


@pytest.mark.parametrize("shape", [None, "", "   ", b"", "null"])
def test_no_shape_means_whole_image(shape: object) -> None:
    assert parse_shape(shape) is None  # type: ignore[arg-type]
    assert shape_mask(None, 5, 5) is None


def test_parse_accepts_json_text_and_bytes() -> None:
    text = '{"kind": "circle", "cx": 3, "cy": 4, "r": 2}'
    assert parse_shape(text) == CircleShape(cx=3, cy=4, r=2)
    assert parse_shape(text.encode()) == CircleShape(cx=3, cy=4, r=2)
    assert parse_shape(RectShape(x=0, y=0, w=1, h=1)) == RectShape(x=0, y=0, w=1, h=1)


@pytest.mark.parametrize(
    ("shape", "h", "w"),
    [
        ({"kind": "rect", "x": 5, "y": 0, "w": 10, "h": 4}, 10, 10),      # x + w = 15 > 10 + 1
        ({"kind": "rect", "x": -2, "y": 0, "w": 3, "h": 3}, 10, 10),
        ({"kind": "rect", "x": 0, "y": 8, "w": 3, "h": 3.5}, 10, 10),
        ({"kind": "circle", "cx": 5, "cy": 5, "r": 7}, 10, 10),
        ({"kind": "circle", "cx": 100, "cy": 100, "r": 1}, 10, 10),
        ({"kind": "annulus", "cx": 5, "cy": 5, "r": 6.5, "r_inner": 1}, 10, 10),
    ],
)
def test_out_of_bounds_is_invalid_shape(shape: dict[str, object], h: int, w: int) -> None:
    with pytest.raises(InvalidShape, match="exceeds the image"):
        shape_mask(parse_shape(shape), h, w)


@pytest.mark.parametrize("r_inner", [5, 6, 100])
def test_annulus_inner_not_smaller_is_invalid(r_inner: float) -> None:
    with pytest.raises(InvalidShape, match="r_inner"):
        shape_mask(parse_shape({"kind": "annulus", "cx": 10, "cy": 10, "r": 5, "r_inner": r_inner}), 20, 20)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"kind": "rect", "x": 1', "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        ("42", "JSON object"),
        ({"kind": "polygon", "points": []}, "invalid shape"),
        ({"x": 1, "y": 1, "w": 2, "h": 2}, "invalid shape"),                   # no kind
        ({"kind": "rect", "x": 1, "y": 1, "w": 2}, "invalid shape"),            # missing h
        ({"kind": "circle", "cx": 1, "cy": 1}, "invalid shape"),                # missing r
        ({"kind": "rect", "x": "a", "y": 1, "w": 2, "h": 2}, "invalid shape"),
        ({"kind": "rect", "x": 1, "y": 1, "w": 0, "h": 2}, "invalid shape"),    # w must be > 0
        ({"kind": "circle", "cx": 1, "cy": 1, "r": -1}, "invalid shape"),
        ({"kind": "rect", "x": 1, "y": 1, "w": 2, "h": 2, "angle": 3}, "invalid shape"),  # extra field
        ('{"kind": "circle", "cx": 5, "cy": 5, "r": NaN}', "invalid shape"),
    ],
)
def test_bad_shapes_are_invalid_shape(shape: object, match: str) -> None:
    with pytest.raises(InvalidShape, match=match) as info:
        parse_shape(shape)  # type: ignore[arg-type]
    assert isinstance(info.value, InvalidInput) and info.value.status == 400


@pytest.mark.parametrize(
    "shape",
    [
        '{"kind": "circle", "cx": NaN, "cy": 5, "r": 2}',
        '{"kind": "rect", "x": Infinity, "y": 1, "w": 2, "h": 2}',
        '{"kind": "rect", "x": 1, "y": 1, "w": Infinity, "h": 2}',
        '{"kind": "annulus", "cx": 5, "cy": NaN, "r": 3, "r_inner": 1}',
    ],
)
def test_non_finite_values_are_invalid_shape(shape: str) -> None:
    with pytest.raises(InvalidShape):
        shape_mask(parse_shape(shape), 10, 10)


def test_shape_covering_no_pixel_is_invalid() -> None:
    # a 0.2-px rect between two pixel centres holds no centre
    with pytest.raises(InvalidShape, match="covers no pixel"):
        shape_mask(RectShape(x=1.6, y=1.6, w=0.2, h=0.2), 5, 5)

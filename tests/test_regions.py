"""Defect regions from synthetic anomaly maps with known blobs, and the heatmap scale."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.heatmap import THRESHOLD_GREY, encode_png, encoding as heatmap_encoding, to_uint8
from engine.regions import find_regions

MM = 0.1          # mm per pixel


@pytest.fixture
def amap() -> np.ndarray:
    """(30, 40) map: blob A 5x4 rect at x=2..6, y=3..6 (one peak 3.0), blob B 2x2 at x=30..31, y=20..21."""
    m = np.full((30, 40), 0.1, np.float32)
    m[3:7, 2:7] = 2.0
    m[4, 5] = 3.0
    m[20:22, 30:32] = 1.5
    return m


def test_two_blobs_exact_regions(amap: np.ndarray) -> None:
    regions = find_regions(amap, 1.0, None, MM)
    assert len(regions) == 2
    a, b = regions                                   # largest max score first
    assert (a.x, a.y, a.w, a.h) == (2, 3, 5, 4) and a.bbox == (2, 3, 5, 4)
    assert a.area_px == 20
    assert a.area_mm2 == pytest.approx(20 * MM**2, rel=1e-12)
    assert a.centroid == pytest.approx((4.0, 4.5))
    assert a.max_score == pytest.approx(3.0)
    assert a.mean_score == pytest.approx((19 * 2.0 + 3.0) / 20)
    assert b.bbox == (30, 20, 2, 2)
    assert b.area_px == 4
    assert b.area_mm2 == pytest.approx(4 * MM**2, rel=1e-12)
    assert b.centroid == pytest.approx((30.5, 20.5))
    assert b.max_score == pytest.approx(1.5) and b.mean_score == pytest.approx(1.5)


def test_threshold_is_inclusive(amap: np.ndarray) -> None:
    assert [r.area_px for r in find_regions(amap, 1.5, None, MM)] == [20, 4]
    assert [r.area_px for r in find_regions(amap, 1.5001, None, MM)] == [20]
    assert find_regions(amap, 3.0001, None, MM) == []


def test_area_filter_drops_small_blob(amap: np.ndarray) -> None:
    # A is 0.20 mm2, B 0.04 mm2
    assert [r.area_px for r in find_regions(amap, 1.0, None, MM, min_area_mm2=0.1)] == [20]
    assert [r.area_px for r in find_regions(amap, 1.0, None, MM, min_area_mm2=0.04)] == [20, 4]
    assert find_regions(amap, 1.0, None, MM, min_area_mm2=0.21) == []


def test_mask_excludes_blob(amap: np.ndarray) -> None:
    mask = np.ones_like(amap, dtype=bool)
    mask[:, :20] = False                          # hides blob A
    regions = find_regions(amap, 1.0, mask, MM)
    assert [r.bbox for r in regions] == [(30, 20, 2, 2)]
    # a mask cutting a blob keeps only the part inside it
    mask = np.ones_like(amap, dtype=bool)
    mask[:, :4] = False
    cut = find_regions(amap, 1.0, mask, MM)[0]
    assert cut.bbox == (4, 3, 3, 4) and cut.area_px == 12


@pytest.mark.parametrize("masked", [False, True])
def test_one_component_statistics_equal_opencvs(masked: bool) -> None:
    """One component takes a path of its own (no OpenCV statistics): an irregular blob with a
    hole, and one cut by a mask, get OpenCV's box, area and centroid, and the map's values."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:120, 0:150].astype(np.float32)
    m = np.exp(-((yy - 50) ** 2 / 800 + (xx - 70) ** 2 / 1500)).astype(np.float32)
    m += 0.05 * rng.random(m.shape, dtype=np.float32)
    m[45:52, 66:75] = 0.0                                      # a hole inside the blob
    mask = None
    if masked:
        mask = np.ones(m.shape, dtype=bool)
        mask[:, :60] = False
    hot = (m >= 0.5) & (mask if mask is not None else True)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(hot.view(np.uint8), connectivity=8)
    assert count == 2                                          # the case under test: one component
    [region] = find_regions(m, 0.5, mask, MM)
    x, y, w, h, area = (int(v) for v in stats[1])
    assert region.bbox == (x, y, w, h) and region.area_px == area
    assert region.centroid == (float(centroids[1, 0]), float(centroids[1, 1]))
    assert region.max_score == float(m[labels == 1].max())
    assert region.mean_score == pytest.approx(float(m[labels == 1].mean()), rel=1e-6)


def test_eight_connectivity_joins_diagonal_pixels() -> None:
    m = np.zeros((6, 6), np.float32)
    m[1, 1] = m[2, 2] = m[3, 3] = 1.0
    (region,) = find_regions(m, 0.5, None, 1.0)
    assert region.area_px == 3 and region.bbox == (1, 1, 3, 3)
    assert region.area_mm2 == 3.0


def _labelled_regions(m: np.ndarray, threshold: float, mask: np.ndarray | None) -> list[tuple]:
    """Every region as OpenCV labels the whole map (no bounding box, no contour-first count):
    (box, area, centroid, max, mean, outer contour as a set of points)."""
    hot = (m >= threshold) & (mask if mask is not None else True)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(hot.view(np.uint8), connectivity=8)
    out = []
    for label in range(1, count):
        pixels = labels == label
        contours, _ = cv2.findContours(pixels.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        x, y, w, h, area = (int(v) for v in stats[label])
        out.append(((x, y, w, h), area, (float(centroids[label, 0]), float(centroids[label, 1])),
                    float(m[pixels].max()), float(m[pixels].mean()),
                    {tuple(p) for p in max(contours, key=len).reshape(-1, 2).tolist()}))
    return sorted(out, key=lambda r: r[0])


def _islands_in_holes(rng: np.random.Generator) -> np.ndarray:
    """A (90, 110) map of random rings with islands in their holes, diagonal touches and specks."""
    m = rng.random((90, 110), dtype=np.float32) * 0.4
    yy, xx = np.mgrid[0:90, 0:110]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, r = int(rng.integers(15, 75)), int(rng.integers(15, 95)), int(rng.integers(6, 14))
        ring = np.abs(np.hypot(yy - cy, xx - cx) - r) <= 1.5
        m[ring] = 1.0 + rng.random(int(ring.sum()), dtype=np.float32)
        if rng.random() < 0.7:
            m[cy - 1 : cy + 2, cx - 1 : cx + 2] = 2.5                   # an island inside the hole
    specks = rng.random(m.shape) < 0.01
    m[specks] = 0.9
    return m


@pytest.mark.parametrize("seed", range(12))
def test_regions_equal_labelling_the_whole_map(seed: int) -> None:
    """Whether the hot pixels form one component (traced, no labelling) or several (labelled), the
    regions are those of labelling the whole map: islands inside a ring's hole are regions of their
    own, diagonal neighbours join, and the one-component path gets the same statistics."""
    rng = np.random.default_rng(seed)
    m = _islands_in_holes(rng)
    mask = None if seed % 3 else rng.random(m.shape) > 0.05
    for threshold in (0.85, 1.2, 2.0):
        regions = find_regions(m, threshold, mask, MM)
        got = sorted(((r.bbox, r.area_px, r.centroid, r.max_score, r.mean_score, set(r.contour)) for r in regions),
                     key=lambda r: r[0])
        want = _labelled_regions(m, threshold, mask)
        assert [(g[0], g[1], g[3]) for g in got] == [(w[0], w[1], w[3]) for w in want]
        # centroids: OpenCV's are of the whole map, ours of a box shifted back (last-digit rounding)
        assert [g[2] for g in got] == [pytest.approx(w[2], rel=1e-12) for w in want]
        assert [g[4] for g in got] == pytest.approx([w[4] for w in want], rel=1e-6)
        assert [g[5] for g in got] == [w[5] for w in want]


def test_an_island_inside_a_rings_hole_is_a_region_of_its_own() -> None:
    m = np.zeros((40, 40), np.float32)
    yy, xx = np.mgrid[0:40, 0:40]
    m[np.abs(np.hypot(yy - 20, xx - 20) - 12) <= 1.5] = 1.0
    m[19:22, 19:22] = 2.0
    regions = find_regions(m, 0.5, None, MM)
    assert len(regions) == 2
    assert regions[0].bbox == (19, 19, 3, 3) and regions[0].area_px == 9 and regions[0].max_score == 2.0
    m[19:22, 19:22] = 0.0
    [ring] = find_regions(m, 0.5, None, MM)
    assert ring.area_px == int((m >= 0.5).sum()) and ring.bbox == _labelled_regions(m, 0.5, None)[0][0]


def test_contour_points_lie_on_blob_boundary() -> None:
    m = np.zeros((40, 40), np.float32)
    yy, xx = np.mgrid[:40, :40]
    blob = (xx - 20) ** 2 + (yy - 18) ** 2 <= 8**2
    m[blob] = 1.0
    (region,) = find_regions(m, 0.5, None, 0.2)
    assert region.area_px == int(blob.sum())
    assert region.area_mm2 == pytest.approx(blob.sum() * 0.04)
    assert region.centroid == pytest.approx((20.0, 18.0))
    assert len(region.contour) >= 8
    padded = np.pad(blob, 1)
    for x, y in region.contour:
        assert blob[y, x], (x, y)                            # on the blob...
        neighbours = padded[y : y + 3, x : x + 3]            # 3x3 around (y, x) in padded coords
        assert not neighbours.all(), (x, y)                  # ...with a neighbour outside it
    xs = [p[0] for p in region.contour]
    ys = [p[1] for p in region.contour]
    assert (min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1) == region.bbox


def test_rectangle_contour_is_its_four_corners(amap: np.ndarray) -> None:
    b = find_regions(amap, 1.0, None, MM)[1]
    assert sorted(b.contour) == [(30, 20), (30, 21), (31, 20), (31, 21)]


def test_no_region_when_nothing_above_threshold() -> None:
    assert find_regions(np.zeros((5, 5), np.float32), 0.5, None, 0.1) == []


# --- heatmap --------------------------------------------------------------------------------


def test_heatmap_scale_threshold_at_grey_128() -> None:
    thr = 0.37
    amap = np.array([[0.0, thr / 2, thr], [2 * thr, 5 * thr, -1.0]], np.float32)
    grey = to_uint8(amap, thr)
    assert grey.dtype == np.uint8
    assert grey.tolist() == [[0, 64, THRESHOLD_GREY], [255, 255, 0]]
    assert THRESHOLD_GREY == 128


def test_heatmap_grey_levels_equal_the_numpy_rounding() -> None:
    rng = np.random.default_rng(3)
    amap = rng.uniform(-0.5, 3.0, (300, 200)).astype(np.float32)
    amap[0, :8] = np.array([0.5, 1.5, 2.5, 126.5, 127.5, 254.5, 255.5, 300.0], np.float32) / 128  # ties, saturation
    amap[1, :4] = [1e10, 3e38, np.inf, -np.inf]           # past OpenCV's int range: saturated, not wrapped to 0
    expected = np.clip(np.rint(amap.astype(np.float64) * 128.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(amap, 1.0), expected)


def test_heatmap_bad_scale_raises() -> None:
    with pytest.raises(ValueError):
        to_uint8(np.zeros((2, 2), np.float32), 0.0)


@pytest.mark.parametrize("shape", [(17, 23), (1, 5), (37, 1), (300, 901)])
def test_heatmap_png_decodes_back_to_the_same_array_in_opencv_and_pillow(shape: tuple[int, int]) -> None:
    grey = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    grey[: shape[0] // 2] = np.arange(shape[1], dtype=np.uint8)         # smooth rows: small "up" differences
    png = encode_png(grey)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    back = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, grey)
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), grey)


@pytest.mark.parametrize("bands", [1, 2, 3, 7])
@pytest.mark.parametrize("shape", [(900, 900), (5, 31), (1, 9)])
def test_a_heatmap_deflated_in_bands_in_any_order_is_one_png_of_the_same_grey_levels(
        bands: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    amap = cv2.GaussianBlur(rng.random(shape, dtype=np.float32) * 3.0, (0, 0), 3.0) if min(shape) > 1 \
        else rng.random(shape, dtype=np.float32) * 3.0
    encoding = heatmap_encoding(amap, 1.5, "png", bands=bands)
    assert len(encoding.steps) == min(bands, shape[0])
    outputs = {i: step() for i, step in reversed(list(enumerate(encoding.steps)))}    # the last band first
    png, raw = encoding.join([outputs[i] for i in range(len(encoding.steps))])
    assert raw is None
    expected = to_uint8(amap, 1.5)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), expected)
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        np.testing.assert_array_equal(np.asarray(image), expected)
    if bands == 1:
        assert png == encode_png(expected)


def test_heatmap_png_refuses_what_is_not_a_grey_image() -> None:
    with pytest.raises(ValueError):
        encode_png(np.zeros((0, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), np.uint8))

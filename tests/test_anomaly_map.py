"""The anomaly map as separable products: same values as resize + blur, its support, its percentile."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from engine import ivfscan
from engine.anomaly_map import (
    add_patch_change,
    anomaly_map,
    axis_weights,
    masked_percentile,
    order_statistic,
    patch_support,
    patches_above,
    percentile_if_above,
)


@pytest.fixture(params=["c", "numpy"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The map's products by the C banded kernel (where built) and by numpy's dense ones."""
    if request.param == "c" and not ivfscan.AVAILABLE:
        pytest.skip("C kernels not built")
    monkeypatch.setattr(ivfscan, "AVAILABLE", request.param == "c")
    return str(request.param)


def _resize_then_blur(scores: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    """The map as it was computed before: OpenCV bilinear resize, then Gaussian blur."""
    full = cv2.resize(scores, (width, height), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        ksize = 2 * int(4.0 * sigma + 0.5) + 1
        full = cv2.GaussianBlur(full, (ksize, ksize), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return full


@pytest.mark.parametrize(("h", "w", "height", "width", "sigma"), [
    (28, 28, 900, 900, 4.0), (28, 28, 224, 224, 4.0), (56, 56, 448, 640, 4.0), (16, 16, 1000, 37, 2.5),
    (8, 8, 8, 8, 4.0), (28, 28, 9, 8, 4.0), (3, 5, 100, 60, 0.0), (40, 28, 901, 641, 1.0),
])
def test_map_equals_resize_then_blur(h: int, w: int, height: int, width: int, sigma: float, kernels: str) -> None:
    scores = np.random.default_rng(h * w + height).uniform(0, 20, (h, w)).astype(np.float32)
    expected = _resize_then_blur(scores, height, width, sigma)
    got = anomaly_map(scores, height, width, sigma)
    assert got.shape == (height, width) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * float(expected.max()))


def test_weights_are_nonnegative_and_rows_sum_to_one() -> None:
    for size, cells in ((900, 28), (30, 56), (224, 28)):
        weights = axis_weights(size, cells, 4.0)
        assert weights.min() >= 0.0
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)   # a constant map stays constant
        assert not weights.flags.writeable                          # cached: nobody may change it


def test_support_holds_exactly_the_patches_that_change_the_pixels() -> None:
    rng = np.random.default_rng(0)
    h, w, height, width, sigma = 12, 10, 300, 257, 4.0
    base = rng.uniform(0, 5, (h, w)).astype(np.float32)
    reference = anomaly_map(base, height, width, sigma)
    for _ in range(6):
        i, j = int(rng.integers(h)), int(rng.integers(w))
        bumped = base.copy()
        bumped[i, j] += 3.0
        changed = anomaly_map(bumped, height, width, sigma) != reference
        support = patch_support(changed, (h, w), sigma)
        assert support[i, j]                                 # the pixels it changes map back to it
        # a pixel is fed by patch (a, b) iff both axis weights are positive: brute force
        rows = axis_weights(height, h, sigma) > 0
        cols = axis_weights(width, w, sigma) > 0
        ys, xs = np.nonzero(changed)
        brute = (rows[ys].T.astype(int) @ cols[xs].astype(int)) > 0
        np.testing.assert_array_equal(support, brute)


@pytest.mark.parametrize(("h", "w", "height", "width", "sigma"), [
    (28, 28, 900, 900, 4.0), (52, 52, 900, 900, 4.0), (12, 10, 300, 257, 4.0), (3, 5, 100, 60, 0.0), (8, 8, 8, 8, 4.0),
])
def test_the_patches_above_a_level_are_the_support_of_its_pixels(h: int, w: int, height: int, width: int, sigma: float,
                                                                  kernels: str) -> None:
    """Hot spots of a smooth map at several levels (none, some, every pixel hot), with and without a
    mask: the patches are those ``patch_support`` finds for the pixels at or above the level."""
    rng = np.random.default_rng(h + width)
    scores = rng.uniform(0, 1, (h, w)).astype(np.float32)
    scores[rng.integers(h), rng.integers(w)] = 8.0
    amap = anomaly_map(scores, height, width, sigma)
    mask = rng.random((height, width)) < 0.8
    for level in (float(amap.max()) + 1, float(np.quantile(amap, 0.999)), float(np.quantile(amap, 0.7)),
                  float(amap.max()), float(amap.min()), -np.inf):
        for chosen in (None, mask):
            hot = amap >= np.float32(level)
            if chosen is not None:
                hot &= chosen
            np.testing.assert_array_equal(patches_above(amap, level, chosen, (h, w), sigma),
                                          patch_support(hot, (h, w), sigma))


@pytest.mark.skipif(not ivfscan.BUILT, reason="C kernels not built")
def test_the_values_at_or_above_a_cut_are_numpys_selection_in_order() -> None:
    rng = np.random.default_rng(5)
    for n in (0, 1, 15, 16, 17, 100, 1000):
        values = rng.normal(size=n).astype(np.float32)
        if n > 4:
            values[:4] = [np.nan, np.inf, -np.inf, 0.25]
        chosen = rng.random(n) < 0.6
        for cut in (0.25, -1.0, 3.0, float("inf"), float("-inf")):
            for mask in (None, chosen):
                expected = values[(values >= np.float32(cut)) & (True if mask is None else mask)]
                np.testing.assert_array_equal(ivfscan.at_or_above(values, mask, cut), expected)


def test_percentile_if_above_is_the_percentile_or_none(kernels: str) -> None:
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(1, 2000))
        values = rng.random(n).astype(np.float32)
        if trial % 3 == 0:
            values = np.round(values * 10).astype(np.float32)             # many ties
        mask = rng.random(n) < 0.7
        if not mask.any():
            continue
        q = float(rng.choice([99.0, 50.0, 100.0, 0.0, rng.uniform(0, 100)]))
        level = float(rng.uniform(0, 10 if trial % 3 == 0 else 1))
        got = percentile_if_above(values, mask, q, level)
        ordered = np.sort(values[mask])
        low = int(np.floor(q / 100 * (mask.sum() - 1)))
        if ordered[low] >= level:
            assert got == masked_percentile(values, mask, q)
        else:
            assert got is None


@pytest.mark.parametrize("layout", ["map", "strided_high", "ties"])
def test_a_high_percentile_of_many_hot_values_is_the_exact_one(layout: str, kernels: str) -> None:
    """Many values above the level, few needed: the selection runs on a tail of them, whose cut
    comes from a strided sample; a sample that overrates the tail (the sampled values are the
    large ones) falls back to every hot value."""
    rng = np.random.default_rng(3)
    values = cv2.GaussianBlur(rng.random((400, 500)).astype(np.float32), (0, 0), 6) * 100
    if layout == "strided_high":
        values = rng.random(values.size).astype(np.float32)
        values[::8] += 10.0
    elif layout == "ties":
        values = np.round(values / 4).astype(np.float32)
    mask, level = None, -1.0                                       # every value hot: the stride stays
    if layout != "strided_high":
        mask = rng.random(values.shape) >= 0.1
        level = float(np.quantile(values[mask], 0.2))              # four fifths of the pixels are hot
    for q in (99.0, 99.9, 95.0, 100.0):
        assert percentile_if_above(values, mask, q, level) == masked_percentile(values, mask, q)


def test_an_order_statistic_is_the_one_a_full_selection_gives() -> None:
    rng = np.random.default_rng(8)
    for trial in range(200):
        n = int(rng.integers(1, 60_000))
        values = rng.random(n).astype(np.float32)
        if trial % 3 == 1:
            values = np.round(values * 20).astype(np.float32)             # ties
        elif trial % 3 == 2:
            values[::8] += 5.0                                            # the strided sample overrates the tail
        rank = int(rng.choice([n - 1, int(0.99 * (n - 1)), int(0.999 * (n - 1)), int(rng.integers(0, n))]))
        assert order_statistic(values, rank) == np.partition(values, rank)[rank]


def test_percentile_of_an_empty_mask_is_refused() -> None:
    with pytest.raises(ValueError):
        percentile_if_above(np.ones(4, np.float32), np.zeros(4, bool), 99.0, 0.0)


@pytest.mark.parametrize("cells", [[(3, 4)], [(0, 0), (27, 27)], [(10, 3), (11, 3), (12, 20)], []])
def test_a_patch_change_updates_the_map_as_a_recomputation_does(cells: list[tuple[int, int]], kernels: str) -> None:
    rng = np.random.default_rng(5)
    scores = rng.uniform(0.0, 2.0, (28, 28)).astype(np.float32)
    amap = anomaly_map(scores, 300, 451, 4.0)
    change = np.zeros_like(scores)
    for row, col in cells:
        change[row, col] = -rng.uniform(0.1, 1.0)
    add_patch_change(amap, change, 4.0)
    np.testing.assert_allclose(amap, anomaly_map(scores + change, 300, 451, 4.0), rtol=1e-5, atol=1e-6)


def _on_threads(steps: Sequence[Callable[[], object]]) -> None:
    """A runner as the engine's: the bands on two threads at once, the last one first."""
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(step) for step in reversed(steps)]:
            future.result()


@pytest.mark.parametrize(("height", "width"), [(900, 900), (301, 451), (1, 37), (2, 2)])
def test_the_map_and_its_updates_are_the_same_in_bands_on_two_threads(height: int, width: int, kernels: str) -> None:
    rng = np.random.default_rng(9)
    scores = rng.uniform(0.0, 2.0, (28, 28)).astype(np.float32)
    amap = anomaly_map(scores, height, width, 4.0, run=_on_threads)
    np.testing.assert_allclose(amap, anomaly_map(scores, height, width, 4.0), rtol=1e-6, atol=1e-7)
    change = np.zeros_like(scores)
    change[5:9, 3:20] = -rng.uniform(0.1, 1.0, (4, 17)).astype(np.float32)
    add_patch_change(amap, change, 4.0, run=_on_threads)
    np.testing.assert_allclose(amap, anomaly_map(scores + change, height, width, 4.0), rtol=1e-5, atol=1e-6)

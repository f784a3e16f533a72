"""Quality metrics with known answers (engine.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.metrics import auroc, pro_auc


def _normal_background(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Distinct defect-free values in (0, 0.5)."""
    return (np.random.default_rng(seed).random(shape) * 0.5).astype(np.float32)


def test_pro_is_one_when_every_region_is_above_every_normal_pixel() -> None:
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 2:5, 2:5] = True
    masks[1, 10:12, 3:9] = True
    maps = _normal_background(masks.shape)
    maps[masks] = 1.0
    assert pro_auc(maps, masks) == pytest.approx(1.0)


def test_pro_is_zero_when_every_region_is_below_every_normal_pixel() -> None:
    masks = np.zeros((1, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    maps = _normal_background(masks.shape) + 0.1
    maps[masks] = 0.0
    assert pro_auc(maps, masks) == pytest.approx(0.0)


def test_pro_weighs_regions_equally_whatever_their_size() -> None:
    # a 100-pixel region found, a 1-pixel region missed: half the regions, 99 % of the pixels
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 0:10, 0:10] = True
    masks[1, 8, 8] = True
    maps = _normal_background(masks.shape)
    maps[0][masks[0]] = 1.0
    maps[1, 8, 8] = -1.0
    assert pro_auc(maps, masks) == pytest.approx(0.5)
    labels = masks.ravel()
    assert auroc(maps.ravel(), labels) > 0.98


def test_pro_of_a_half_found_region_is_one_half() -> None:
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 3, 3:5] = True
    maps = _normal_background(masks.shape)
    maps[0, 3, 3], maps[0, 3, 4] = 1.0, -1.0
    assert pro_auc(maps, masks) == pytest.approx(0.5)


@pytest.mark.parametrize(("maps_shape", "masks_shape"), [((1, 8, 8), (1, 8, 9)), ((8, 8), (8, 8))])
def test_pro_refuses_mismatched_or_flat_input(maps_shape: tuple[int, ...], masks_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        pro_auc(np.zeros(maps_shape, np.float32), np.ones(masks_shape, bool))


def test_pro_needs_a_region() -> None:
    with pytest.raises(ValueError, match="region"):
        pro_auc(np.zeros((1, 8, 8), np.float32), np.zeros((1, 8, 8), bool))

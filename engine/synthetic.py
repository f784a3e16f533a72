"""Synthetic defects drawn on OK images: the validation set of the automatic recipe choice.

Pure functions of an RGB image and a numpy random generator. Each returns the defective image
and the boolean mask of the pixels it changed. Sizes are fractions of the image's shorter side,
so a defect looks alike on a 256 px and a 2000 px ROI; they are kept small (about 2-12 % of the
side), the kind of defect a station must catch and a fixed recipe may miss.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

__all__ = ["DEFECT_KINDS", "draw_defect"]

Drawer = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _centre(shape: tuple[int, ...], rng: np.random.Generator, margin: int) -> tuple[int, int]:
    """A random (x, y) at least ``margin`` pixels inside the image (its middle when too small)."""
    height, width = shape[:2]
    x = int(rng.integers(margin, max(margin + 1, width - margin)))
    y = int(rng.integers(margin, max(margin + 1, height - margin)))
    return min(x, width - 1), min(y, height - 1)


def _contrasting(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour (3,) clearly darker or brighter than the image under ``mask``."""
    mean = image[mask].mean(axis=0) if mask.any() else image.reshape(-1, 3).mean(axis=0)
    shift = rng.uniform(60, 120) * (1 if mean.mean() < 128 else -1)
    return np.clip(mean + shift + rng.normal(0, 10, 3), 0, 255)


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin polyline of two or three segments, 8-25 % of the side long."""
    side = min(image.shape[:2])
    mask = np.zeros(image.shape[:2], np.uint8)
    x, y = _centre(image.shape, rng, side // 8)
    points = [(x, y)]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(2, 4))):
        angle += rng.normal(0, 0.4)
        step = rng.uniform(0.04, 0.09) * side
        x, y = int(x + step * np.cos(angle)), int(y + step * np.sin(angle))
        points.append((x, y))
    width = max(1, int(round(side * rng.uniform(0.004, 0.012))))
    cv2.polylines(mask, [np.array(points, np.int32)], False, 1, thickness=width)
    region = mask.astype(bool)
    out = image.copy()
    out[region] = _contrasting(image, region, rng).astype(np.uint8)
    return out, region


def spot(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A filled ellipse 2-6 % of the side across, darker or brighter than what it covers."""
    side = min(image.shape[:2])
    mask = np.zeros(image.shape[:2], np.uint8)
    axes = tuple(max(1, int(side * rng.uniform(0.01, 0.03))) for _ in range(2))
    cv2.ellipse(mask, _centre(image.shape, rng, side // 8), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    region = mask.astype(bool)
    out = image.copy()
    colour = _contrasting(image, region, rng)
    out[region] = (0.3 * image[region] + 0.7 * colour).astype(np.uint8)
    return out, region


def cut_paste(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch 5-12 % of the side, cut elsewhere in the image, turned, and pasted."""
    side = min(image.shape[:2])
    size = max(2, int(side * rng.uniform(0.05, 0.12)))
    height, width = image.shape[:2]
    sy, sx = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    patch = np.rot90(image[sy : sy + size, sx : sx + size], int(rng.integers(1, 4)))
    dy, dx = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    out = image.copy()
    out[dy : dy + size, dx : dx + size] = patch
    region = np.zeros(image.shape[:2], bool)
    region[dy : dy + size, dx : dx + size] = np.any(out[dy : dy + size, dx : dx + size] != image[dy : dy + size,
                                                                                              dx : dx + size], -1)
    return out, region


def _disc(image: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    side = min(image.shape[:2])
    mask = np.zeros(image.shape[:2], np.uint8)
    radius = max(2, int(side * rng.uniform(low, high)))
    cv2.circle(mask, _centre(image.shape, rng, radius), radius, 1, -1)
    return mask.astype(bool)


def blur(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A disc 6-12 % of the side across, strongly blurred (a smudge, a loss of focus)."""
    region = _disc(image, rng, 0.03, 0.06)
    sigma = max(1.5, min(image.shape[:2]) * 0.01)
    blurred = cv2.GaussianBlur(image, (0, 0), sigma)
    out = image.copy()
    out[region] = blurred[region]
    changed = region & np.any(np.abs(out.astype(np.int16) - image) > 8, -1)
    return out, changed


def contrast(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A disc 6-12 % of the side across whose contrast is halved or doubled and brightness shifted."""
    region = _disc(image, rng, 0.03, 0.06)
    values = image[region].astype(np.float32)
    gain = rng.choice([0.4, 2.0])
    changed_values = (values - values.mean(axis=0)) * gain + values.mean(axis=0) + rng.uniform(-30, 30)
    out = image.copy()
    out[region] = np.clip(changed_values, 0, 255).astype(np.uint8)
    changed = region & np.any(np.abs(out.astype(np.int16) - image) > 8, -1)
    return out, changed


DEFECT_KINDS: dict[str, Drawer] = {
    "scratch": scratch, "spot": spot, "cut_paste": cut_paste, "blur": blur, "contrast": contrast,
}


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB -> (defective copy, (H, W) bool mask of the changed pixels).

    Raises:
        ValueError: unknown kind.
    """
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    return DEFECT_KINDS[kind](image, rng)

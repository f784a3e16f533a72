"""Defect regions: connected components of the thresholded anomaly map inside the mask."""

from __future__ import annotations

import cv2
import numpy as np

from engine.schemas import Region

__all__ = ["find_regions"]


def find_regions(
    amap: np.ndarray,
    threshold: float,
    mask: np.ndarray | None,
    mm_per_px: float,
    min_area_mm2: float = 0.0,
) -> list[Region]:
    """Regions of amap (H, W) >= threshold inside mask, 8-connected, largest max score first.

    A region is kept when ``area_px * mm_per_px**2 >= min_area_mm2``.
    """
    binary = amap >= threshold
    if mask is not None:
        binary &= mask
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        return []
    # components of the hot pixels' bounding box only, then shifted back: labelling costs
    # ~1.5 ns per pixel and OpenCV's statistics ~4 more, and a defect rarely spans the whole ROI
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(binary[top:bottom].any(axis=0))
    left, right = int(cols[0]), int(cols[-1]) + 1
    hot = np.ascontiguousarray(binary[top:bottom, left:right]).view(np.uint8)
    amap = amap[top:bottom, left:right]
    # one component (the usual defect) fills the hot box: its statistics come from the box itself,
    # and OpenCV's are computed only when there are several
    count, _ = cv2.connectedComponentsWithAlgorithm(hot, 8, cv2.CV_32S, cv2.CCL_GRANA)
    components: list[tuple[tuple[int, int, int, int], int, tuple[float, float], np.ndarray]] = []
    if count == 2:
        components.append(((0, 0, hot.shape[1], hot.shape[0]), int(np.count_nonzero(hot)), _centroid(hot),
                           hot.view(bool)))
    elif count > 2:
        count, labels, stats, centroids = cv2.connectedComponentsWithStatsWithAlgorithm(
            hot, 8, cv2.CV_32S, cv2.CCL_GRANA
        )
        for label in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[label])
            components.append(((x, y, w, h), area, (float(centroids[label, 0]), float(centroids[label, 1])),
                               labels[y : y + h, x : x + w] == label))
    px_area = mm_per_px * mm_per_px
    regions: list[Region] = []
    for (x, y, w, h), area, (cx, cy), component in components:    # component: (h, w) bool, inside the box
        area_mm2 = area * px_area
        if area_mm2 < min_area_mm2:
            continue
        values = amap[y : y + h, x : x + w][component]
        contours, _ = cv2.findContours(component.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outline = max(contours, key=len).reshape(-1, 2) + (left + x, top + y)   # n 2 as (x, y)
        x, y = left + x, top + y
        regions.append(
            Region(
                x=x, y=y, w=w, h=h, bbox=(x, y, w, h), area_px=area, area_mm2=float(area_mm2),
                centroid=(cx + left, cy + top), max_score=float(values.max()),
                mean_score=float(values.mean()), contour=tuple(map(tuple, outline.tolist())),
            )
        )
    regions.sort(key=lambda r: r.max_score, reverse=True)
    return regions


def _centroid(pixels: np.ndarray) -> tuple[float, float]:
    """(x, y) mean position of the nonzero pixels of ``pixels`` (h, w) uint8 0/1."""
    area = float(np.count_nonzero(pixels))
    per_column = np.count_nonzero(pixels, axis=0)                 # w
    per_row = np.count_nonzero(pixels, axis=1)                    # h
    return float(per_column @ np.arange(len(per_column))) / area, float(per_row @ np.arange(len(per_row))) / area

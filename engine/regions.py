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
    components = _components(hot)
    px_area = mm_per_px * mm_per_px
    regions: list[Region] = []
    for (x, y, w, h), area, (cx, cy), component, outline in components:    # component: (h, w) bool in the box
        area_mm2 = area * px_area
        if area_mm2 < min_area_mm2:
            continue
        values = amap[y : y + h, x : x + w][component]
        if outline is None:
            contours, _ = cv2.findContours(component.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            outline = max(contours, key=len).reshape(-1, 2) + (x, y)
        outline = outline + (left, top)                                         # n 2 as (x, y)
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


# a component: its box (x, y, w, h) and area in pixels, its centroid (x, y), its pixels (h, w) bool
# inside the box, and its outer contour (n, 2) as (x, y) in the box when already traced
_Component = tuple[tuple[int, int, int, int], int, tuple[float, float], np.ndarray, np.ndarray | None]


def _components(hot: np.ndarray) -> list[_Component]:
    """The 8-connected components of ``hot`` (h, w) uint8 0/1, whose hot pixels touch all four sides.

    The contours come first: each component has exactly one outer boundary, and a two-level trace
    (``RETR_CCOMP``) puts every outer boundary at its top level, a component inside another's hole
    included. One outer boundary, the usual defect, means one component filling the box: its
    statistics come from the box's row and column sums, and labelling (~0.25 ms for a 600 x 500
    box) and OpenCV's statistics are left to several components.
    """
    contours, hierarchy = cv2.findContours(hot, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer = [contour for contour, links in zip(contours, hierarchy[0], strict=True) if links[3] < 0]
    if len(outer) == 1:
        per_column = cv2.reduce(hot, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()     # w
        per_row = cv2.reduce(hot, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()        # h
        area = int(per_column.sum())
        centroid = (float(per_column @ np.arange(len(per_column))) / area,
                    float(per_row @ np.arange(len(per_row))) / area)
        return [((0, 0, hot.shape[1], hot.shape[0]), area, centroid, hot.view(bool), outer[0].reshape(-1, 2))]
    count, labels, stats, centroids = cv2.connectedComponentsWithStatsWithAlgorithm(hot, 8, cv2.CV_32S, cv2.CCL_GRANA)
    components: list[_Component] = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        components.append(((x, y, w, h), area, (float(centroids[label, 0]), float(centroids[label, 1])),
                           labels[y : y + h, x : x + w] == label, None))
    return components

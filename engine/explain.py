"""Region explanations: the nearest normal patch of each region's hottest patch.

A PatchCore score is a distance to the memory of normal patches, so the memory row nearest to a
region's hottest patch *is* the explanation: the most similar normal patch, and how far
even that one is. The memory keeps where each row came from (``sources.npy``: training image index, patch
row, patch column; ``engine.patchcore.patch_origins``), so the row names a training image and
the place in it. Boxes are x, y, w, h in pixels of the image as it was sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from engine.schemas import Region, RegionExplanation

__all__ = ["NearestSearch", "explain_regions", "hottest_patch", "patch_box"]


class NearestSearch(Protocol):
    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def patch_box(row: int, col: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixels of token ``(row, col)`` of an ``grid`` (h, w) laid over an image of ``size`` (H, W)."""
    (h, w), (height, width) = grid, size
    x0, x1 = col * width // w, (col + 1) * width // w
    y0, y1 = row * height // h, (row + 1) * height // h
    return int(x0), int(y0), int(max(1, x1 - x0)), int(max(1, y1 - y0))


def hottest_patch(patch_scores: np.ndarray, bbox: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the highest-scoring token whose cell overlaps ``bbox`` (x, y, w, h in pixels)."""
    h, w = patch_scores.shape
    height, width = size
    x, y, bw, bh = bbox
    r0, r1 = min(h - 1, y * h // height), min(h - 1, (y + bh - 1) * h // height)
    c0, c1 = min(w - 1, x * w // width), min(w - 1, (x + bw - 1) * w // width)
    block = patch_scores[r0:r1 + 1, c0:c1 + 1]
    r, c = np.unravel_index(int(np.argmax(block)), block.shape)
    return int(r0 + r), int(c0 + c)


def explain_regions(
    regions: Sequence[Region], features: np.ndarray, patch_scores: np.ndarray, size: tuple[int, int],
    search: NearestSearch, origins: np.ndarray | None, manifest: dict[str, Any],
) -> tuple[Region, ...]:
    """``regions`` with their ``explanation``: one nearest-row search for all their hottest patches.

    ``features`` (h, w, D) and ``patch_scores`` (h, w) are the inspected image's; ``origins`` the
    model's (M, 3) row sources (None: unknown, as for rows a later change appended without them).
    """
    if not regions:
        return tuple(regions)
    grid = (int(patch_scores.shape[0]), int(patch_scores.shape[1]))
    peaks = [hottest_patch(patch_scores, region.bbox, size) for region in regions]
    queries = np.stack([features[r, c] for r, c in peaks])
    distances, rows = search.nearest(queries)
    out = []
    for region, (r, c), distance, row in zip(regions, peaks, distances, rows, strict=True):
        explained = RegionExplanation(known=False, patch=(r, c), box=patch_box(r, c, grid, size),
                                      distance=round(float(distance), 6))
        source = _source(int(row), origins, manifest)
        if source is not None:
            explained = explained.model_copy(update=source)
        out.append(region.model_copy(update={"explanation": explained}))
    return tuple(out)


def _source(row: int, origins: np.ndarray | None, manifest: dict[str, Any]) -> dict[str, Any] | None:
    if origins is None or not 0 <= row < len(origins):
        return None
    image, patch_row, patch_col = (int(v) for v in origins[row])
    training = manifest.get("training_images") or {}
    names, sizes = training.get("sources"), training.get("sizes") or []
    grid = tuple(int(v) for v in manifest["token_shape"])
    found: dict[str, Any] = {"known": True, "image_index": image, "source_patch": (patch_row, patch_col)}
    if names is not None and image < len(names):
        found["source"] = names[image]
    if image < len(sizes):
        found["source_box"] = patch_box(patch_row, patch_col, grid, tuple(sizes[image]))  # type: ignore[arg-type]
    return found

"""From patch distances to a full-size anomaly map and an image score."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["anomaly_map", "masked_percentile"]


def anomaly_map(patch_scores: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    """(h, w) patch distances -> (height, width) float32 map: bilinear upsample, Gaussian blur."""
    scores = np.ascontiguousarray(patch_scores, dtype=np.float32)
    full = cv2.resize(scores, (width, height), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        # kernel of 2 * round(4 sigma) + 1 taps, as the PatchCore reference implementation uses
        ksize = 2 * int(4.0 * sigma + 0.5) + 1
        full = cv2.GaussianBlur(full, (ksize, ksize), sigmaX=sigma, sigmaY=sigma,
                                borderType=cv2.BORDER_REFLECT)
    return full


def masked_percentile(values: np.ndarray, mask: np.ndarray | None, percentile: float) -> float:
    """``percentile`` (0..100, linear interpolation) of values where mask is true."""
    selected = values[mask] if mask is not None else values.ravel()
    if selected.size == 0:
        raise ValueError("mask selects no pixel")
    return float(np.percentile(selected, percentile))

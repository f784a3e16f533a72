"""Detection-quality metrics, as pure functions over scores, maps and ground truth.

* ``auroc``: area under the ROC curve (image scores, or every pixel of every map).
* ``pro_auc``: the MVTec AD per-region-overlap metric, normalized area under the PRO curve up to
  a false-positive rate of 0.3. Pixel AUROC favours large defects (they hold most defective
  pixels); PRO weighs every connected defect region equally, so small defects count as much.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["auroc", "pro_auc"]


def auroc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int | bool]) -> float:
    """Exact area under the ROC curve: the Mann-Whitney U statistic, ties counted as one half.

    Args:
        scores: (N,) any real scores, higher = more positive.
        labels: (N,) 0/1 or bool, both classes present.

    Raises:
        ValueError: shapes differ, or a class is missing.
    """
    s = np.asarray(scores).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in size")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    first = np.empty(s.size, dtype=bool)                 # N: True where a run of equal scores starts
    first[0] = True
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], s.size)
    mid_rank = (starts + ends + 1) / 2.0                 # 1-based mean rank of each tie run
    run_of = np.cumsum(first) - 1                        # N: tie run of each sorted position
    pos_rank_sum = float(mid_rank[run_of[y[order]]].sum())
    u = pos_rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def pro_auc(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3, steps: int = 300) -> float:
    """Normalized area under the per-region-overlap curve for false-positive rates in [0, max_fpr].

    For a threshold t, PRO(t) is the mean over every connected ground-truth region (8-connected,
    per image) of the share of its pixels with map >= t, and FPR(t) the share of defect-free
    pixels with map >= t. The curve is sampled at ``steps + 1`` evenly spaced FPR values (t taken
    as the matching quantile of the defect-free pixels), integrated with the trapezoid rule and
    divided by ``max_fpr``, so a perfect detector scores 1.

    Args:
        maps: (T, H, W) anomaly maps, higher = more anomalous.
        masks: (T, H, W) bool ground truth.

    Raises:
        ValueError: shapes differ, no defect region, or no defect-free pixel.
    """
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must be the same (T, H, W)")
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    normal = np.sort(maps[~masks])
    if normal.size == 0:
        raise ValueError("PRO needs defect-free pixels")
    regions = []
    for amap, mask in zip(maps, masks, strict=True):
        if not mask.any():
            continue
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions.extend(np.sort(amap[labels == label]) for label in range(1, count))
    if not regions:
        raise ValueError("PRO needs at least one defect region")
    fprs = np.linspace(0.0, max_fpr, steps + 1)
    # the threshold whose false-positive rate is f: the (1 - f) quantile of the defect-free pixels
    thresholds = np.quantile(normal, 1.0 - fprs)
    overlap = np.zeros_like(fprs)
    for values in regions:
        overlap += 1.0 - np.searchsorted(values, thresholds, side="left") / values.size
    overlap /= len(regions)
    return float(np.trapezoid(overlap, fprs) / max_fpr)

"""Exact scores and regions from an approximate nearest-neighbour search.

Why it is exact. An approximate search only ever misses neighbours, so each patch's approximate
distance ``a`` is never below its exact distance ``e``. The anomaly map is a nonnegative linear
map of the patch distances (``engine.anomaly_map``), so the map ``M(a)`` is an upper bound of
the exact map ``M(e)`` at every pixel, and so is the map of any mix of exact and approximate
distances. Take a level ``L`` and the current scores ``s`` (e <= s <= a), and re-score exactly
every patch that feeds a pixel where ``M(s) >= L``, giving ``s'``. Then

* at every pixel where ``M(s) >= L``, all its patches are exact: ``M(s') = M(e)`` there;
* at every other pixel, ``M(e) <= M(s') <= M(s) < L``.

So the pixels at or above ``L`` are the same in ``M(s')`` and ``M(e)``, with the same values.
Whatever only looks at values >= L is then exact:

* the image score, a (masked) percentile, when both order statistics it interpolates are >= L
  (checked on ``M(s')``; if not, the exact score is below ``L``: lower ``L`` and repeat, which
  only re-scores more patches, so it ends, at worst with every patch exact);
* the regions at the threshold ``T`` and the decision, when ``L <= T``.

Pixels below ``L`` keep upper bounds that stay below ``L`` (heatmap values only).

The first level is ``min(T, approximate score * (1 - margin))``: with a good approximate search
the exact score is rarely more than a few percent lower, and the margin trades re-scored patches
against a second round. How much lower depends on the memory and its search, so a fit measures
it on its held-out images (:func:`margin_for`) and the manifest keeps the margin. The regions
need only ``L <= T``, so a defect whose score lies well above ``T`` is refined from ``T`` itself,
not from below it (bottle Lite0 defective ROIs: 2-10 % fewer patches re-scored at a 2 % margin).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.anomaly_map import (
    Steps,
    add_patch_change,
    anomaly_map,
    in_turn,
    order_statistic,
    patches_above,
    percentile_if_above,
)

__all__ = ["DEFAULT_MARGIN", "ExactDistances", "MapReader", "RefinedMap", "margin_for", "refine_map"]

# exact distances of the patches at these flat (row-major) grid indices
ExactDistances = Callable[[np.ndarray], np.ndarray]
# starts work that reads a map; returns what calls it off (waits until it no longer reads the map)
MapReader = Callable[[np.ndarray], Callable[[], None]]

# every `_ESTIMATE_STEP`-th pixel along each axis estimates the approximate map's score
_ESTIMATE_STEP = 4

DEFAULT_MARGIN = 0.02        # models fitted before the margin was measured, and the least a fit sets
_MAX_MARGIN = 0.2
# held-out images a measured margin lets finish in one round. They are searched without their
# fold's rows, which widens their gaps beyond unseen parts': on bottle Lite0 @ 224 px the held-out
# median (0.049) let 19 of the 20 good test ROIs finish in one round, their 90th percentile (0.076)
# all 20 but with a third more patches re-scored, which cost more than the rounds it saved
_MARGIN_SHARE = 0.5
_MARGIN_SLACK = 0.005


@dataclass(frozen=True)
class RefinedMap:
    """The map, the image score and the patch distances after refinement."""

    amap: np.ndarray            # (H, W) float32: exact wherever >= level, upper bounds below it
    score: float                # the masked percentile of the exact map
    patch_scores: np.ndarray    # (h, w) float32: exact where refined, approximate elsewhere
    level: float                # the final level L
    refined: int                # patches re-scored exactly
    rounds: int                 # levels tried (1 unless the first one was above the exact score)
    estimate: float             # the approximate map's score estimate the first level came from

    @property
    def gap(self) -> float | None:
        """How far below the estimate the exact score came, relative to the estimate (the margin
        that would have let the first round finish); None when the estimate is not positive."""
        return 1.0 - self.score / self.estimate if self.estimate > 0 else None


def refine_map(
    approx: np.ndarray, exact: ExactDistances, height: int, width: int, sigma: float, mask: np.ndarray | None,
    percentile: float, threshold: float | None = None, *, margin: float = DEFAULT_MARGIN, run: Steps = in_turn,
    before_check: MapReader | None = None,
) -> RefinedMap:
    """Map, score and regions-relevant pixels equal to exact search's, from approximate distances.

    Args:
        approx: (h, w) patch distances from an approximate search (each >= the exact one).
        exact: returns the exact distances (n,) of the patches at flat indices (n,).
        height, width, sigma: the map's size and blur (see ``engine.anomaly_map``).
        mask: (height, width) bool pixels the score and regions see; None = all.
        percentile: the image score's percentile (0..100).
        threshold: the decision threshold; None when uncalibrated (the score level only).
        margin: relative gap between the first level and min(threshold, approximate score).
        run: runs the map products' bands (``engine.anomaly_map.Steps``), e.g. on two threads.
        before_check: called with the map before each check of the score (the map is final when
            the check passes, as it nearly always does: work that reads it may start there); what
            it returns is called when the check fails, before the map changes again.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    scores = np.array(approx, dtype=np.float32)                                 # h w
    if not np.isfinite(scores).all():
        # an infinite upper bound would turn the map's zero weights into NaN, and no level would pass
        raise ValueError("approximate distances must be finite (every patch needs a neighbour found)")
    done = np.zeros(scores.shape, dtype=bool)                                   # h w
    amap = anomaly_map(scores, height, width, sigma, run=run)                   # H W
    estimate = _estimate(amap, mask, percentile)
    level = _cap(estimate, threshold, margin)
    rounds = 0
    while True:
        rounds += 1
        need = patches_above(amap, level, mask, scores.shape, sigma) & ~done     # h w
        if need.any():
            flat = np.flatnonzero(need)
            fresh = exact(flat)
            change = np.zeros_like(scores)
            change.flat[flat] = fresh - scores.flat[flat]
            scores.flat[flat] = fresh
            done |= need
            add_patch_change(amap, change, sigma, run=run)
        called_off = before_check(amap) if before_check is not None else None
        score = percentile_if_above(amap, mask, percentile, level)
        if score is not None:
            return RefinedMap(amap, score, scores, level, int(done.sum()), rounds, estimate)
        if called_off is not None:
            called_off()
        level = _lower_level(amap, mask, percentile, threshold, margin)


def _cap(value: float, threshold: float | None, margin: float) -> float:
    """A level below the estimate ``value`` by the margin, and not above the threshold."""
    lowered = value - margin * abs(value)
    return lowered if threshold is None else min(threshold, lowered)


def margin_for(gaps: Sequence[float | None]) -> float:
    """The first level's margin for a memory, from the ``gap`` of its held-out images' refinements:
    wide enough for ``_MARGIN_SHARE`` of them to finish in one round, within [DEFAULT_MARGIN, 0.2].

    A second round costs another exact search and another pass over the map; a wider margin
    re-scores a few more patches in the first. Bottle Lite0 @ 224 px (16 386 rows, 2-core EPYC,
    the 83 test ROIs twice in turns): at 0.02, 13 of the 20 good ROIs took two rounds and their
    kNN + map stages averaged 26.1 / 27.1 ms; at 0.05, one did, 20.3 / 18.6 ms. Defective ROIs:
    26.6 / 24.4 against 23.3 / 24.5 ms. At 416 px the held-out gaps stay under 0.02.
    """
    values = np.asarray([g for g in gaps if g is not None and math.isfinite(g)], dtype=np.float64)
    if values.size == 0:
        return DEFAULT_MARGIN
    wanted = float(np.quantile(values, _MARGIN_SHARE)) + _MARGIN_SLACK
    return round(min(max(wanted, DEFAULT_MARGIN), _MAX_MARGIN), 4)


def _estimate(amap: np.ndarray, mask: np.ndarray | None, percentile: float) -> float:
    """The map's score estimated on a pixel subsample (the lower order statistic)."""
    step = _ESTIMATE_STEP
    sample = amap[::step, ::step]
    chosen = mask[::step, ::step] if mask is not None else None
    if chosen is not None and not chosen.any():
        sample, chosen = amap, mask
    values = sample[chosen] if chosen is not None else sample.ravel()
    if values.size == 0:
        raise ValueError("mask selects no pixel")
    return order_statistic(values, int(percentile / 100.0 * (values.size - 1)))


def _lower_level(
    amap: np.ndarray, mask: np.ndarray | None, percentile: float, threshold: float | None, margin: float,
) -> float:
    """A level at or below the lower order statistic of the score on the current map.

    The current map bounds the exact one from above, so the exact score is below the level
    that just failed; this one is below the current map's order statistic, so the next check
    passes as soon as no patch feeding the pixels above it is approximate.
    """
    values = amap[mask] if mask is not None else amap.ravel()
    low = int(np.floor(percentile / 100.0 * (values.size - 1)))
    return _cap(order_statistic(values, low), threshold, margin)

"""Drift of a ROI's recent scores from the OK scores of its fit, as pure functions.

The statistic is the two-sample Kolmogorov-Smirnov distance D between the model's hold-out OK
scores (how unseen OK parts scored at fit time) and the window of recent scores of inspections
the operator did not overrule, with its asymptotic p-value. KS needs no binning, which matters
with the few dozen OK scores a fit keeps, and it sees a shift of the whole distribution before
the NG rate moves. The NG rate of the window is compared with the NG rate of the ROI's history
before the window.

States (``DriftRule`` holds the numbers):

* ``alarm``: p < ``alarm_p`` and D >= ``alarm_d`` (the recent scores are not the fit's), or the NG
  rate is ``ng_rate_factor`` times its history and at least ``min_ng`` NG decisions;
* ``watch``: p < ``watch_p`` (something moves; not yet enough to stop the line);
* ``ok``: otherwise, and whenever fewer than ``min_window`` recent scores are known.

With ``higher_only`` the score conditions count only when the window's median is above the
reference's: for a reference known to run high (``engine.drift_watch``: hold-out scores come
from a memory without the scored image's fold, so unseen OK parts usually score lower).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["DriftReport", "DriftRule", "assess", "ks_two_sample"]

DriftState = Literal["ok", "watch", "alarm"]


@dataclass(frozen=True)
class DriftRule:
    min_window: int = 30
    watch_p: float = 0.01
    alarm_p: float = 0.001
    alarm_d: float = 0.3
    ng_rate_factor: float = 3.0
    min_ng: int = 5


@dataclass(frozen=True)
class DriftReport:
    state: DriftState
    ks_d: float | None              # None below min_window
    ks_p: float | None
    n_window: int
    n_reference: int
    median_window: float | None
    median_reference: float
    ng_rate_window: float | None
    ng_rate_history: float | None
    reason: str


def _kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution: 2 * sum_k (-1)^(k-1) exp(-2 k^2 x^2)."""
    if x <= 0.0:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = math.exp(-2.0 * k * k * x * x)
        total += term if k % 2 else -term
        if term < 1e-12:
            break
    return float(min(1.0, max(0.0, 2.0 * total)))


def ks_two_sample(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(D, p): the largest gap between the two empirical CDFs and its asymptotic p-value.

    Raises:
        ValueError: an empty sample or a non-finite value.
    """
    return _ks_sorted(_sorted(a), _sorted(b))


def _sorted(values: Sequence[float]) -> np.ndarray:
    return np.sort(np.fromiter(values, dtype=np.float64, count=len(values)))


def _median(ascending: np.ndarray) -> float:
    """The median of a sorted, non-empty sample (as ``np.median``)."""
    n = ascending.size
    return float((ascending[(n - 1) // 2] + ascending[n // 2]) / 2.0)


def _ks_sorted(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``ks_two_sample`` of two samples already sorted."""
    if x.size == 0 or y.size == 0 or not (np.isfinite(x[0]) and np.isfinite(x[-1]) and np.isfinite(y[0])
                                          and np.isfinite(y[-1])):
        raise ValueError("both samples must be non-empty and finite")
    values = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, values, side="right") / x.size
    cdf_y = np.searchsorted(y, values, side="right") / y.size
    d = float(np.max(np.abs(cdf_x - cdf_y)))
    n = x.size * y.size / (x.size + y.size)
    # Stephens' small-sample correction of the asymptotic argument
    return d, _kolmogorov_sf((math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d)


def _ng_alarm(ng_window: int, n_window: int, ng_rate_history: float | None, rule: DriftRule) -> bool:
    if ng_rate_history is None or n_window == 0 or ng_window < rule.min_ng:
        return False
    return ng_window / n_window >= rule.ng_rate_factor * max(ng_rate_history, 1.0 / n_window)


def assess(reference: Sequence[float], window: Sequence[float], *, ng_window: int = 0,
           ng_rate_history: float | None = None, rule: DriftRule = DriftRule(),
           higher_only: bool = False) -> DriftReport:
    """The drift state of ``window`` (recent scores, newest last) against ``reference`` (fit OK scores).

    ``ng_window``: NG decisions among the window's inspections; ``ng_rate_history``: the NG rate of
    the inspections before the window (None when unknown).
    """
    if len(reference) == 0:
        raise ValueError("the reference needs at least one OK score")
    # each sample converted and sorted once: a check runs on every inspection (209 reference and 200
    # recent scores: 107 -> 32 us)
    ordered, recent = _sorted(reference), _sorted(window)
    median_reference = _median(ordered)
    n = len(window)
    ng_rate = ng_window / n if n else None
    median_window = _median(recent) if n else None
    if n < rule.min_window:
        return DriftReport("ok", None, None, n, len(reference), median_window, median_reference, ng_rate,
                           ng_rate_history, f"fewer than {rule.min_window} scores")
    d, p = _ks_sorted(ordered, recent)
    below = higher_only and median_window is not None and median_window <= median_reference
    if below:
        p = 1.0    # below a reference that runs high: no evidence of a shift
    if (p < rule.alarm_p and d >= rule.alarm_d) or _ng_alarm(ng_window, n, ng_rate_history, rule):
        state: DriftState = "alarm"
        reason = "scores moved away from the reference" if p < rule.alarm_p else "NG rate rose"
    elif p < rule.watch_p:
        state, reason = "watch", "scores start to differ from the reference"
    else:
        state, reason = "ok", "scores at or below the reference" if below else "scores match the reference"
    return DriftReport(state, round(d, 6), p, n, len(reference), median_window, median_reference,
                       ng_rate, ng_rate_history, reason)

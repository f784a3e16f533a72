"""Threshold calibration (seed §5), as pure functions over image scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.errors import InvalidInput
from engine.validate import percentile_fraction

__all__ = ["Calibration", "calibrate", "score_stats"]


@dataclass(frozen=True)
class Calibration:
    threshold: float
    method: Literal["ok_ng_midpoint", "ok_percentile"]
    score_percentile: float            # fraction, 0..1
    safety_factor: float | None
    ok_mean: float
    ng_mean: float | None
    ok_p99: float
    ng_p5: float | None
    warning: str | None


def _scores(name: str, values: Sequence[float] | None, required: bool) -> np.ndarray | None:
    if values is None or len(values) == 0:
        if required:
            raise InvalidInput(f"{name} must hold at least one score")
        return None
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} must be a list of numbers") from exc
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
        raise InvalidInput(f"{name} must be a flat list of finite numbers")
    return arr


def calibrate(
    ok_scores: Sequence[float],
    ng_scores: Sequence[float] | None,
    score_percentile: float,
    safety_factor: float,
) -> Calibration:
    """The decision threshold from OK (and optionally NG) image scores.

    With NG scores: the midpoint of p99(OK) and p5(NG), with a warning when they overlap.
    OK only: the ``score_percentile`` quantile of the OK scores times ``safety_factor``.

    Raises:
        InvalidInput: empty OK scores, non-finite values, a percentile out of range.
    """
    frac = percentile_fraction(score_percentile)
    ok = _scores("ok_scores", ok_scores, required=True)
    ng = _scores("ng_scores", ng_scores, required=False)
    assert ok is not None
    ok_p99 = float(np.percentile(ok, 99))
    if ng is not None:
        ng_p5 = float(np.percentile(ng, 5))
        warning = None
        if ok_p99 >= ng_p5:
            warning = (
                f"OK and NG scores overlap (p99 OK {ok_p99:.4g} >= p5 NG {ng_p5:.4g}): "
                "the threshold cannot separate them; review the samples"
            )
        return Calibration(
            threshold=(ok_p99 + ng_p5) / 2.0, method="ok_ng_midpoint", score_percentile=frac,
            safety_factor=None, ok_mean=float(ok.mean()), ng_mean=float(ng.mean()),
            ok_p99=ok_p99, ng_p5=ng_p5, warning=warning,
        )
    if not math.isfinite(safety_factor) or safety_factor <= 0:
        raise InvalidInput(f"safety factor must be a positive number, got {safety_factor!r}")
    return Calibration(
        threshold=float(np.quantile(ok, frac)) * safety_factor, method="ok_percentile",
        score_percentile=frac, safety_factor=safety_factor, ok_mean=float(ok.mean()), ng_mean=None,
        ok_p99=ok_p99, ng_p5=None, warning=None,
    )


def score_stats(scores: Sequence[float]) -> dict[str, float]:
    """n, mean, std, p50, p95, p99 and max of a non-empty score list."""
    arr = np.asarray(scores, dtype=np.float64)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"n": int(arr.size), "mean": float(arr.mean()), "std": float(arr.std()), "p50": float(p50),
            "p95": float(p95), "p99": float(p99), "max": float(arr.max())}

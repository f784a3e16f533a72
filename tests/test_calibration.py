"""Threshold calibration with exact known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.calibration import calibrate, score_stats
from engine.errors import InvalidInput
from engine.validate import percentile_fraction

OK = [float(v) for v in range(101)]              # 0..100: p99 = 99.0 exactly
NG = [200.0 + v for v in range(21)]              # 200..220: p5 = 201.0 exactly


def test_ok_ng_midpoint_exact() -> None:
    cal = calibrate(OK, NG, 0.995, 1.1)
    assert cal.method == "ok_ng_midpoint"
    assert cal.ok_p99 == 99.0
    assert cal.ng_p5 == 201.0
    assert cal.threshold == 150.0
    assert cal.ok_mean == 50.0 and cal.ng_mean == 210.0
    assert cal.safety_factor is None
    assert cal.warning is None
    assert cal.score_percentile == 0.995


def test_ok_ng_midpoint_small_lists() -> None:
    # p99 of [1, 2] = 1 + 0.99 = 1.99; p5 of [3, 5] = 3 + 0.05 * 2 = 3.1
    cal = calibrate([1.0, 2.0], [3.0, 5.0], 99, 1.1)
    assert cal.threshold == pytest.approx((1.99 + 3.1) / 2, abs=1e-12)


def test_overlap_sets_warning() -> None:
    cal = calibrate([1.0, 2.0, 10.0], [5.0, 6.0], 0.995, 1.1)
    assert cal.ok_p99 > cal.ng_p5
    assert cal.warning is not None and "overlap" in cal.warning
    assert cal.threshold == pytest.approx((cal.ok_p99 + cal.ng_p5) / 2)


def test_touching_scores_also_warn() -> None:
    assert calibrate([1.0], [1.0], 0.995, 1.1).warning is not None


def test_ok_only_quantile_times_safety_factor() -> None:
    ok = [float(v) for v in range(201)]          # 0..200: quantile 0.995 = 199.0 exactly
    cal = calibrate(ok, None, 0.995, 1.1)
    assert cal.method == "ok_percentile"
    assert cal.threshold == pytest.approx(199.0 * 1.1, rel=1e-12)
    assert cal.safety_factor == 1.1
    assert cal.ng_mean is None and cal.ng_p5 is None and cal.warning is None
    assert cal.ok_p99 == 198.0


def test_ok_only_empty_ng_list_is_ok_only() -> None:
    assert calibrate(OK, [], 0.5, 2.0).threshold == pytest.approx(50.0 * 2.0)


@pytest.mark.parametrize(("fraction", "percent"), [(0.995, 99.5), (0.5, 50), (0.9, 90.0), (1.0, 100)])
def test_percentile_fraction_and_percent_agree(fraction: float, percent: float) -> None:
    assert percentile_fraction(fraction) == pytest.approx(percentile_fraction(percent), abs=1e-12)
    ok = [float(v) for v in range(201)]
    assert calibrate(ok, None, fraction, 1.1).threshold == pytest.approx(
        calibrate(ok, None, percent, 1.1).threshold, abs=1e-9)


@pytest.mark.parametrize("value", [0, 0.0, -1, 101, 100.0001, math.nan, math.inf, "99", None])
def test_bad_percentile_is_invalid_input(value: object) -> None:
    with pytest.raises(InvalidInput, match="score_percentile"):
        percentile_fraction(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        calibrate(OK, None, value, 1.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("ok", [[], None])
def test_empty_ok_is_invalid_input(ok: list[float] | None) -> None:
    with pytest.raises(InvalidInput, match="ok_scores"):
        calibrate(ok, NG, 0.995, 1.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ok", "ng"),
    [([1.0, math.nan], None), ([1.0], [math.inf]), ([[1.0, 2.0]], None), (["a"], None), ([1.0], ["x"])],
)
def test_non_finite_or_non_numeric_scores_are_invalid_input(ok: list[object], ng: list[object] | None) -> None:
    with pytest.raises(InvalidInput):
        calibrate(ok, ng, 0.995, 1.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("factor", [0.0, -1.0, math.nan])
def test_bad_safety_factor_is_invalid_input(factor: float) -> None:
    with pytest.raises(InvalidInput, match="safety factor"):
        calibrate(OK, None, 0.995, factor)


def test_score_stats_known_answers() -> None:
    stats = score_stats([1.0, 2.0, 3.0, 4.0])
    assert stats["n"] == 4
    assert stats["mean"] == 2.5
    assert stats["std"] == pytest.approx(np.std([1, 2, 3, 4]))
    assert stats["p50"] == 2.5
    assert stats["p95"] == pytest.approx(3.85)
    assert stats["max"] == 4.0

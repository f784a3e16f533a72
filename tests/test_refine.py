"""Refinement: score, decision and regions equal to exact search's, from approximate distances."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import engine.search
from engine import ivfscan
from engine.anomaly_map import anomaly_map, masked_percentile, patch_support
from engine.knn import build_index, knn_distances
from engine.patchcore import Memory, leave_out_scores
from engine.refine import DEFAULT_MARGIN, margin_for, refine_map
from engine.regions import find_regions
from engine.search import MemorySearch, build_search_index

H, W, SIGMA, P = 180, 150, 4.0, 99.0


def _exact_and_approx(seed: int, h: int = 14, w: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Exact patch distances with a defect blob, and approximate ones >= them (some far above)."""
    rng = np.random.default_rng(seed)
    exact = rng.uniform(1.0, 2.0, (h, w)).astype(np.float32)
    exact[3:6, 4:7] += 3.0                                     # the defect
    approx = exact.copy()
    missed = rng.random((h, w)) < 0.3                          # neighbours the search missed
    approx[missed] += rng.uniform(0.0, 1.5, int(missed.sum())).astype(np.float32)
    return exact, approx


def _lookup(exact: np.ndarray, asked: list[int]):      # noqa: ANN202 - a test helper
    def exact_of(indices: np.ndarray) -> np.ndarray:
        asked.extend(int(i) for i in indices)
        return exact.ravel()[indices]
    return exact_of


def _regions(amap: np.ndarray, threshold: float, mask: np.ndarray | None) -> list[tuple]:
    return [(r.bbox, r.area_px, r.max_score, r.mean_score) for r in find_regions(amap, threshold, mask, 0.1)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [None, 2.2, 3.5])
def test_score_and_regions_equal_exact(seed: int, threshold: float | None) -> None:
    exact, approx = _exact_and_approx(seed)
    asked: list[int] = []
    out = refine_map(approx, _lookup(exact, asked), H, W, SIGMA, None, P, threshold)
    truth = anomaly_map(exact, H, W, SIGMA)
    assert out.score == pytest.approx(masked_percentile(truth, None, P), rel=1e-6)
    above = out.amap >= out.level
    np.testing.assert_allclose(out.amap[above], truth[above], rtol=1e-6)   # exact at and above the level
    assert np.all(out.amap[~above] < out.level)                           # below it: bounds under the level
    assert np.all(out.amap >= truth - 1e-5)                               # and never below the truth
    if threshold is not None:
        assert out.level <= threshold
        got, want = _regions(out.amap, threshold, None), _regions(truth, threshold, None)
        assert [r[:2] for r in got] == [r[:2] for r in want]                # same boxes and areas
        assert [r[2:] for r in got] == [pytest.approx(r[2:], rel=1e-6) for r in want]
    assert out.refined == len(set(asked)) == len(asked)                   # each patch re-scored at most once
    assert 0 < out.refined < exact.size                                   # some, not all


def test_a_defect_scoring_well_above_the_threshold_is_refined_from_the_threshold() -> None:
    """The regions need the map exact only at and above the threshold: when the approximate score
    less the margin is above it, the first level is the threshold itself (a lower one would
    re-score patches that change neither the score nor the regions); else the estimate less the
    margin, as without a threshold."""
    exact, approx = _exact_and_approx(2)
    score = refine_map(approx, _lookup(exact, []), H, W, SIGMA, None, P, None, margin=0.05).estimate
    high = refine_map(approx, _lookup(exact, []), H, W, SIGMA, None, P, 2.2, margin=0.05)
    assert score * 0.95 > 2.2 and high.level == 2.2 and high.rounds == 1
    truth = anomaly_map(exact, H, W, SIGMA)
    assert [r[:2] for r in _regions(high.amap, 2.2, None)] == [r[:2] for r in _regions(truth, 2.2, None)]
    low = refine_map(approx, _lookup(exact, []), H, W, SIGMA, None, P, score * 0.99, margin=0.05)
    assert low.level == pytest.approx(score * 0.95, rel=1e-6)
    lowered = refine_map(approx, _lookup(exact, []), H, W, SIGMA, None, P, None, margin=0.05)
    assert lowered.level == pytest.approx(score * 0.95, rel=1e-6)


def test_a_mask_limits_what_is_refined() -> None:
    exact, approx = _exact_and_approx(7)
    mask = np.zeros((H, W), bool)
    mask[100:170, 20:140] = True                                # away from the defect blob
    asked: list[int] = []
    out = refine_map(approx, _lookup(exact, asked), H, W, SIGMA, mask, P, 3.0)
    truth = anomaly_map(exact, H, W, SIGMA)
    assert out.score == pytest.approx(masked_percentile(truth, mask, P), rel=1e-6)
    feeds_mask = patch_support(mask, exact.shape, SIGMA).ravel()
    assert asked and all(feeds_mask[i] for i in asked)         # only patches seen through the mask
    assert not any(36 <= i < 72 and 4 <= i % 12 < 7 for i in asked)   # the blob lies outside it


def test_a_level_above_the_exact_score_is_lowered() -> None:
    # every patch approximated 3x too far: the first level lies above the exact score
    rng = np.random.default_rng(3)
    exact = rng.uniform(1.0, 1.2, (10, 10)).astype(np.float32)
    out = refine_map(exact * 3.0, _lookup(exact, []), 100, 100, SIGMA, None, P, None, margin=0.0)
    assert out.rounds >= 2
    assert out.score == pytest.approx(masked_percentile(anomaly_map(exact, 100, 100, SIGMA), None, P), rel=1e-6)


def test_work_reading_the_map_before_a_check_is_called_off_before_the_map_changes() -> None:
    """``before_check`` sees the map before every check of the score; after a failed check its
    call-off comes while the map is still the one it saw; the last map it saw is the result."""
    rng = np.random.default_rng(3)
    exact = rng.uniform(1.0, 1.2, (10, 10)).astype(np.float32)
    seen: list[np.ndarray] = []
    called_off: list[bool] = []

    def before_check(amap: np.ndarray) -> Callable[[], None]:
        seen.append(amap.copy())

        def call_off() -> None:
            called_off.append(bool(np.array_equal(amap, seen[-1])))   # not changed yet

        return call_off

    out = refine_map(exact * 3.0, _lookup(exact, []), 100, 100, SIGMA, None, P, None, margin=0.0,
                     before_check=before_check)
    assert out.rounds >= 2 and len(seen) == out.rounds
    assert called_off == [True] * (out.rounds - 1)                 # every failed check, none after the last
    assert np.array_equal(seen[-1], out.amap)


def test_exact_distances_need_no_refinement_beyond_the_hot_patches() -> None:
    exact, _ = _exact_and_approx(4)
    asked: list[int] = []
    out = refine_map(exact, _lookup(exact, asked), H, W, SIGMA, None, P, None)
    assert out.rounds == 1 and out.refined == len(asked) < exact.size // 2


def test_margin_is_checked() -> None:
    with pytest.raises(ValueError):
        refine_map(np.ones((4, 4), np.float32), lambda i: i, 8, 8, 1.0, None, P, None, margin=1.0)


@pytest.fixture(params=["one-bound", "finer-bound"])
def exact_bounds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The C exact scan (where built) with its second lower bound at any memory size, and without it."""
    if request.param == "finer-bound" and not ivfscan.AVAILABLE:
        pytest.skip("C scans not built")
    monkeypatch.setattr(engine.search, "_FINER_ROWS", 0 if request.param == "finer-bound" else 1 << 62)
    return str(request.param)


def _grid_queries(rng: np.random.Generator, centres: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w, D) patch features near the memory's clusters, with an outlying blob (the defect)."""
    q = centres[rng.integers(0, len(centres), h * w)] + rng.normal(size=(h * w, centres.shape[1]))
    q = q.reshape(h, w, -1)
    q[4:8, 5:9] += rng.normal(size=(4, 4, centres.shape[1])) * 2.5
    return q.astype(np.float32)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_brute_force_agrees_through_the_projected_search(distance: str, exact_bounds: str) -> None:
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(40, 24)).astype(np.float32) * 3
    bank = (centres[rng.integers(0, 40, 12_000)] + rng.normal(size=(12_000, 24))).astype(np.float32)
    probes = (centres[rng.integers(0, 40, 500)] + rng.normal(size=(500, 24))).astype(np.float32)
    index, choice = build_search_index(bank, distance, ivf_min_rows=1000, probe_queries=probes, axes=12)
    assert choice.kind == "projected_ivf"
    search = MemorySearch(index, bank, distance, 1, nprobe=1)
    flat = build_index(bank, distance)
    for _ in range(3):
        grid = _grid_queries(rng, centres, 16, 14)
        flat_q = grid.reshape(-1, 24)
        approx, reach = search.search(flat_q)
        truth = anomaly_map(knn_distances(flat, flat_q, distance).reshape(16, 14), H, W, SIGMA)
        threshold = float(np.percentile(truth, 97))
        def exact(i: np.ndarray, q: np.ndarray = flat_q, r: np.ndarray = reach) -> np.ndarray:
            return search.exact(q[i], r[i])

        out = refine_map(approx.reshape(16, 14), exact, H, W, SIGMA, None, P, threshold)
        assert out.score == pytest.approx(masked_percentile(truth, None, P), rel=1e-4)
        assert [r[1] for r in _regions(out.amap, threshold, None)] == [r[1] for r in _regions(truth, threshold, None)]
        assert np.mean(approx > knn_distances(flat, flat_q, distance) + 1e-4) > 0   # the search did miss some


@pytest.mark.parametrize("threshold_quantile", [None, 0.6])
def test_bottle_features_brute_force(bottle_dir: Path, threshold_quantile: float | None, exact_bounds: str) -> None:
    """Real Lite0 patch features: refined scores and region areas equal flat search's."""
    from engine.backbones import build_backbone
    from engine.features import FeatureExtractor
    from engine.images import decode_image, resize_square

    backbone, _ = build_backbone("efficientnet_lite0", None, bottle_dir, 224, None)
    extract = FeatureExtractor(backbone, "cpu", "fp32", 1)

    def features(paths: list[Path]) -> np.ndarray:
        return extract([resize_square(decode_image(p.read_bytes(), 10**8), 224) for p in paths])

    train = sorted((bottle_dir / "train" / "good").glob("*.png"))[:12]
    bank = features(train).reshape(-1, 152)[::2]                            # 4704 rows
    index, _ = build_search_index(bank, "l2", ivf_min_rows=1000, probe_queries=bank[::40] + 0.1)
    search = MemorySearch(index, bank, "l2", 1, nprobe=1)
    flat = build_index(bank, "l2")
    tests = sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:2]
    tests += sorted((bottle_dir / "test" / "good").glob("*.png"))[:2]
    truths = [anomaly_map(knn_distances(flat, f.reshape(-1, 152), "l2").reshape(28, 28), 300, 300, SIGMA)
              for f in features(tests)]
    scores = [masked_percentile(t, None, P) for t in truths]
    threshold = None if threshold_quantile is None else float(np.quantile(scores, threshold_quantile))
    for grid, truth in zip(features(tests), truths, strict=True):
        q = grid.reshape(-1, 152)
        approx, reach = search.search(q)
        out = refine_map(approx.reshape(28, 28), lambda i, q=q, reach=reach: search.exact(q[i], reach[i]),
                         300, 300, SIGMA, None, P, threshold)
        assert out.score == pytest.approx(masked_percentile(truth, None, P), rel=1e-4)
        if threshold is not None:
            got, want = _regions(out.amap, threshold, None), _regions(truth, threshold, None)
            assert [r[1] for r in got] == [r[1] for r in want]
            assert [r[2] for r in got] == pytest.approx([r[2] for r in want], rel=1e-4)


def test_margin_covers_the_median_held_out_gap_within_bounds() -> None:
    assert margin_for([0.01, 0.03, 0.05, 0.07, 0.09]) == pytest.approx(0.055)      # median + 0.005
    assert margin_for([0.0, 0.001, None, float("nan")]) == DEFAULT_MARGIN         # never below the default
    assert margin_for([0.5, 0.6]) == 0.2                                          # nor above 0.2
    assert margin_for([]) == DEFAULT_MARGIN


def test_gap_is_what_the_first_level_needed() -> None:
    exact, approx = _exact_and_approx(3)
    approx = approx * 1.3                                      # the approximate score far above the exact one
    out = refine_map(approx, _lookup(exact, []), H, W, SIGMA, None, P, None, margin=0.02)
    assert out.rounds == 2 and out.gap is not None and out.gap > 0.02
    again = refine_map(approx, _lookup(exact, []), H, W, SIGMA, None, P, None, margin=out.gap + 0.005)
    assert again.rounds == 1 and again.score == pytest.approx(out.score, rel=1e-6)
    assert again.estimate == pytest.approx(out.estimate)


def _finishes(fn, seconds: float = 60.0):      # noqa: ANN001, ANN202 - a test helper
    """fn() on a thread, with its result or exception: a refinement that never ends fails the test."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:       # handed to the test
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the refinement did not end"
    if "error" in box:
        raise box["error"]             # type: ignore[misc]
    return box["result"]


def test_infinite_approximate_distances_are_refused() -> None:
    approx = np.ones((6, 6), np.float32)
    approx[2, 3] = np.inf
    with pytest.raises(ValueError, match="finite"):
        _finishes(lambda: refine_map(approx, lambda i: np.ones(len(i), np.float32), 12, 12, 1.0, None, P, None))


def test_hold_out_scores_end_and_are_exact_when_a_fold_holds_the_only_near_rows() -> None:
    """Each training image's patches sit in a cluster of their own fold's, so without its fold
    the lists an image probes hold no row it may use: the hold-out search still finds the exact
    nearest rows of the other folds (it once gave them infinite distances and never ended)."""
    rng = np.random.default_rng(5)
    images, h, w, dim, folds = 6, 10, 10, 24, 3
    centres = rng.normal(size=(folds, dim)).astype(np.float32) * 20
    features = (centres[np.arange(images) % folds][:, None, None, :]
                + rng.normal(size=(images, h, w, dim))).astype(np.float32)            # N h w D
    bank = features.reshape(-1, dim)
    sources = np.repeat(np.arange(images), h * w)
    index, choice = build_search_index(bank, "l2", ivf_min_rows=100, probe_queries=bank[::7], axes=8)
    assert choice.kind == "projected_ivf"
    memory = Memory(bank, sources, index, choice, np.zeros((len(bank), 3), np.int32))
    sizes = [(40, 40)] * images
    scores, _ = _finishes(lambda: leave_out_scores(features, memory, sizes, range(images), "l2", 1, SIGMA, P, folds))
    for i in range(images):
        others = sources % folds != i % folds
        truth = knn_distances(build_index(bank[others], "l2"), features[i].reshape(-1, dim), "l2").reshape(h, w)
        assert scores[i] == pytest.approx(masked_percentile(anomaly_map(truth, 40, 40, SIGMA), None, P), rel=1e-4)

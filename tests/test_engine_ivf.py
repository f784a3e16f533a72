"""A memory above ``ivf_min_rows`` is served by the projected inverted file with exact refinement:
same scores, decisions and regions as the flat (exact) memory of the same fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.api import Engine
from engine.settings import Settings
from tests.support import load_bgr, png_bytes

SIDE = 112


def _png(path: Path) -> bytes:
    return png_bytes(load_bgr(path, SIDE))


@pytest.mark.slow
def test_projected_memory_scores_like_the_flat_one(bottle_dir: Path, tmp_path: Path) -> None:
    train = [_png(p) for p in sorted((bottle_dir / "train" / "good").glob("*.png"))[:12]]
    tests = [_png(p) for p in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:3]]
    tests += [_png(p) for p in sorted((bottle_dir / "test" / "good").glob("*.png"))[:3]]
    common = {"backbone": "efficientnet_lite0", "input_size": SIDE, "coreset_ratio": 0.5}
    flat = Engine(Settings(data_root=tmp_path / "flat", ivf_min_rows=10**9, **common))
    ivf = Engine(Settings(data_root=tmp_path / "ivf", ivf_min_rows=1000, **common))
    fitted = flat.fit_ok("r", "a", 0.1, train)
    refined = ivf.fit_ok("r", "a", 0.1, train)
    index = ivf.manifest("r", "a")["index"]
    assert index["kind"] == "projected_ivf" and index["nprobe"] >= 1 and index["axes"] >= 1
    assert 0.02 <= index["margin"] <= 0.2                     # measured on the hold-out refinements
    assert flat.manifest("r", "a")["index"]["kind"] == "flat"
    # the hold-out OK scores are scored with refinement too: the same as the flat memory's
    assert refined.ok_scores == pytest.approx(fitted.ok_scores, rel=1e-4)
    threshold = sorted(fitted.ok_scores)[len(fitted.ok_scores) // 2]       # low: regions on most images
    for engine in (flat, ivf):
        engine.calibrate_ng("r", "a", 0.1, [threshold / 1.1], area_mm2_thr=0.0)
    ivf.close()
    reopened = Engine(Settings(data_root=tmp_path / "ivf", ivf_min_rows=1000, **common))  # from disk
    assert reopened.models.load(reopened.models.key("r", "a", None)).index.margin == index["margin"]
    for image in tests:
        exact = flat.infer("r", "a", 0.1, image, heatmap="none")
        got = reopened.infer("r", "a", 0.1, image, heatmap="none")
        assert got.score == pytest.approx(exact.score, rel=1e-4)
        assert got.decision == exact.decision and got.threshold == exact.threshold
        assert [(r.bbox, r.area_px) for r in got.regions] == [(r.bbox, r.area_px) for r in exact.regions]
        assert [r.max_score for r in got.regions] == pytest.approx([r.max_score for r in exact.regions], rel=1e-4)


@pytest.mark.slow
def test_added_images_keep_the_fitted_refinement_margin(bottle_dir: Path, tmp_path: Path) -> None:
    train = [_png(p) for p in sorted((bottle_dir / "train" / "good").glob("*.png"))[:14]]
    engine = Engine(Settings(data_root=tmp_path, backbone="efficientnet_lite0", input_size=SIDE, coreset_ratio=0.5,
                             ivf_min_rows=1000))
    engine.fit_ok("r", "a", 0.1, train[:12])
    margin = engine.manifest("r", "a")["index"]["margin"]
    engine.lifecycle.add_ok("r", "a", train[12:], mm_per_px=0.1)
    grown = engine.manifest("r", "a")["index"]
    assert grown["kind"] == "projected_ivf" and grown["margin"] == margin
    assert engine.models.load(engine.models.key("r", "a", None)).index.margin == margin

"""A memory above ``ivf_min_rows`` is served by a tuned IVF index: same decisions as exact search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.api import Engine
from engine.settings import Settings
from tests.support import load_bgr, png_bytes

SIDE = 112


def _png(path: Path) -> bytes:
    return png_bytes(load_bgr(path, SIDE))


@pytest.mark.slow
def test_ivf_memory_scores_like_the_flat_one(bottle_dir: Path, tmp_path: Path) -> None:
    train = [_png(p) for p in sorted((bottle_dir / "train" / "good").glob("*.png"))[:12]]
    tests = [_png(p) for p in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:2]]
    tests += [_png(p) for p in sorted((bottle_dir / "test" / "good").glob("*.png"))[:2]]
    common = {"backbone": "efficientnet_lite0", "input_size": SIDE, "coreset_ratio": 0.5}
    flat = Engine(Settings(data_root=tmp_path / "flat", **common))
    ivf = Engine(Settings(data_root=tmp_path / "ivf", ivf_min_rows=1000, **common))
    flat.fit_ok("r", "a", 0.1, train)
    ivf.fit_ok("r", "a", 0.1, train)
    index = ivf.manifest("r", "a")["index"]
    assert index["kind"] == "ivf" and index["recall"] >= 0.99 and index["nprobe"] >= 1
    assert flat.manifest("r", "a")["index"]["kind"] == "flat"
    ivf.close()
    reopened = Engine(Settings(data_root=tmp_path / "ivf", ivf_min_rows=1000, **common))  # nprobe from disk
    for image in tests:
        exact = flat.infer("r", "a", 0.1, image, allow_uncalibrated=True, heatmap="none").score
        approx = reopened.infer("r", "a", 0.1, image, allow_uncalibrated=True, heatmap="none").score
        assert approx == pytest.approx(exact, rel=0.02)
        assert approx >= exact * (1 - 1e-3)   # an approximate neighbour is never closer
    assert np.isfinite(exact)

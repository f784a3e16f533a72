"""Explanations over every defective bottle test image (slow: a 40-image fit at the backbone's
default 224 px): each region of each image decided NG names a stored training sample and the
place of its nearest normal patch, and the crop of that patch is a valid PNG."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.api import Engine
from engine.settings import Settings
from tests.support import load_bgr, png_bytes

pytestmark = pytest.mark.slow

SIDE, MM, ROLE, ROI = 224, 0.1, "top", "cap"


@pytest.fixture(scope="module")
def fitted(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, list[str]]]:
    engine = Engine(Settings(data_root=tmp_path_factory.mktemp("explain_quality"), backbone="efficientnet_lite0"))
    train = sorted((bottle_dir / "train" / "good").glob("*.png"))[::5][:40]
    for path in train:
        engine.dataset_upload(ROLE, ROI, "ok", png_bytes(load_bgr(path, SIDE)), path.name)
    fit = engine.fit_ok(ROLE, ROI, MM, use_dataset=True)
    engine.calibrate_ng(ROLE, ROI, MM, list(fit.ok_scores))          # OK-only rule: no test image used
    yield engine, [p.name for p in train]
    engine.close()


def test_every_defect_region_is_explained_by_a_stored_training_patch(fitted: tuple[Engine, list[str]],
                                                                     bottle_dir: Path) -> None:
    engine, names = fitted
    defective = sorted(p for p in (bottle_dir / "test").glob("*/*.png") if p.parent.name != "good")
    decided_ng = 0
    for path in defective:
        res = engine.infer(ROLE, ROI, MM, png_bytes(load_bgr(path, SIDE)), explain=True, heatmap="none")
        if res.decision != "ng":
            continue
        decided_ng += 1
        for region in res.regions:
            e = region.explanation
            assert e is not None and e.known and e.source in names, (path, e)
            assert e.image_index is not None and e.source_patch is not None and e.source_box is not None
            x, y, w, h = e.source_box
            assert 0 <= x and 0 <= y and x + w <= SIDE and y + h <= SIDE
        e = res.regions[0].explanation
        assert e is not None and e.image_index is not None and e.source_patch is not None
        crop = engine.monitor.explain_patch(ROLE, ROI, e.image_index, *e.source_patch)
        image = cv2.imdecode(np.frombuffer(crop.png, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[:2] == (crop.crop_box[3], crop.crop_box[2])
    print(f"{decided_ng} of {len(defective)} defective images decided NG, every region explained")
    assert decided_ng >= 0.8 * len(defective)

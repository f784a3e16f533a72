"""Detection quality on real data (MVTec AD bottle) through engine.evaluate, and its exact AUROC."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

import engine.evaluate
from engine.backbones import DEFAULT_INPUT_SIZE
from engine.evaluate import evaluate, list_test, list_train
from engine.metrics import auroc
from engine.settings import Settings


def test_evaluate_keeps_stdout_for_its_report_even_for_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` output stays parseable: the engine's warnings (a drift alarm) go to stderr."""
    before = structlog.get_config()
    try:
        engine.evaluate._quiet_logs(verbose=False)
        structlog.get_logger("engine.drift").warning("drift_state_changed", state="alarm")
        structlog.get_logger("engine.scoring").info("infer")
        out, err = capsys.readouterr()
        assert out == ""
        assert "drift_state_changed" in err and "infer" not in err
    finally:
        structlog.configure(**before)


def test_auroc_counts_ties_as_half() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1]) == 0.5
    assert auroc([0.0, 0.0, 1.0], [0, 1, 1]) == 0.75
    assert auroc([3, 2, 1], [0, 0, 1]) == 0.0
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [1, 1])


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 300).astype(np.float32)   # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        pos.size * neg.size)
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert auroc(scores.reshape(20, 15), labels.reshape(20, 15)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bottle_quality_with_embedded_default(bottle_dir: Path, tmp_path: Path) -> None:
    """The engine's defaults (EfficientNet-Lite0, 416 px, coreset 1.5 %) on MVTec AD bottle.

    Fits on all 209 train/good images and scores all 83 test images. Measured 1.000 / 0.9865
    (docs/quality.md); the thresholds fail on a drop to the earlier 320 px default's pixel AUROC
    (0.9847) or below. Pixel AUROC is over maps and masks resized to 256 x 256.
    """
    assert len(list_train(bottle_dir)) == 209
    assert len(list_test(bottle_dir)) == 83
    panel = tmp_path / "panel.png"
    defaults = Settings.model_fields
    report = evaluate(bottle_dir, backbone="efficientnet_lite0", input_size=DEFAULT_INPUT_SIZE["efficientnet_lite0"],
                      coreset_ratio=defaults["coreset_ratio"].default, data_root=tmp_path / "data", panel=panel)

    assert (report.n_train, report.n_test, report.n_defective) == (209, 83, 63)
    assert report.backbone == "efficientnet_lite0" and report.input_size == 416
    assert report.coreset_size == round(0.015 * report.n_embeddings)
    assert report.image_auroc >= 0.995, report.image_auroc
    assert report.pixel_auroc is not None and report.pixel_auroc >= 0.985, report.pixel_auroc
    assert set(report.fit_s) >= {"decode", "extract", "coreset", "index", "ok_scores", "save", "total"}
    assert set(report.infer_ms) >= {"preprocess", "extract", "knn", "map", "total"}

    image = cv2.imread(str(panel), cv2.IMREAD_COLOR)
    assert image is not None, "panel PNG does not decode"
    assert image.shape[0] >= 256 and image.shape[1] >= 2 * 256 and image.std() > 10

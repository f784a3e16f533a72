"""The Engine facade end to end on CPU: a real EfficientNet-Lite0 at 112 px, real MVTec AD bottles.

One engine for the module. Models (default recipe unless said): ``top/cap`` (8 OK images,
calibrated with real OK/NG scores), ``top/refit`` (refitted while another thread infers on it),
``top/ds`` (fitted from uploaded samples), ``top/cap`` in recipe ``r1`` (one image, mm 0.2).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.api import Engine
from engine.errors import (
    CalibrationMissing,
    EngineError,
    InvalidId,
    InvalidImage,
    InvalidInput,
    InvalidShape,
    MmPerPxMismatch,
    ModelNotFound,
    PayloadTooLarge,
    ReservedRecipe,
    SampleNotFound,
)
from engine.heatmap import to_uint8
from engine.model_cache import ModelCache
from engine.schemas import CalibrationResult, FitResult, InferResult
from engine.settings import Settings
from tests.support import load_bgr, png_bytes, png_header_only

SIDE = 224        # ROI side the tests send (the files are 900 x 900)
INPUT = 112       # backbone input side: 14 x 14 tokens at stride 8
MM = 0.1          # mm per pixel
ROLE = "top"
Images = dict[str, list[np.ndarray]]    # "train", "good", "broken" -> BGR arrays of SIDE x SIDE


def _decode_png(data: bytes | None) -> np.ndarray:
    assert data is not None
    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out is not None
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(Settings(data_root=tmp_path_factory.mktemp("engine_api"), backbone="efficientnet_lite0",
                          input_size=INPUT))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def images(bottle_dir: Path) -> Images:
    return {
        "train": [load_bgr(p, SIDE) for p in sorted((bottle_dir / "train" / "good").glob("*.png"))[:8]],
        "good": [load_bgr(p, SIDE) for p in sorted((bottle_dir / "test" / "good").glob("*.png"))[:2]],
        "broken": [load_bgr(p, SIDE) for p in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:3]],
    }


@pytest.fixture(scope="module")
def fitted(engine: Engine, images: Images) -> FitResult:
    return engine.fit_ok(ROLE, "cap", MM, [png_bytes(im) for im in images["train"]], operator_id="op1")


@pytest.fixture(scope="module")
def ng_scores(engine: Engine, fitted: FitResult, images: Images) -> list[float]:
    """Raw scores of the first two broken bottles (the third is kept for the decision test)."""
    return [engine.infer(ROLE, "cap", MM, png_bytes(im), allow_uncalibrated=True, heatmap="none").score
            for im in images["broken"][:2]]


@pytest.fixture(scope="module")
def calibrated(engine: Engine, fitted: FitResult, ng_scores: list[float]) -> CalibrationResult:
    return engine.calibrate_ng(ROLE, "cap", MM, list(fitted.ok_scores), ng_scores)


# --- errors that need no model --------------------------------------------------------------------


def test_missing_model_is_404(engine: Engine) -> None:
    image = png_bytes(np.zeros((32, 32, 3), np.uint8))
    calls = [
        lambda: engine.infer(ROLE, "nothing", MM, image),
        lambda: engine.infer(ROLE, "nothing", MM, image, allow_uncalibrated=True),
        lambda: engine.calibrate_ng(ROLE, "nothing", MM, [1.0, 2.0]),
        lambda: engine.calibrate_dataset(ROLE, "nothing"),
        lambda: engine.infer_dataset(ROLE, "nothing"),
        lambda: engine.manifest(ROLE, "nothing"),
    ]
    for call in calls:
        with pytest.raises(ModelNotFound) as info:
            call()
        assert info.value.status == 404 and info.value.code == "model_not_found"
        # the engine names the operation, not a door's route: each door adds its own hint
        assert "memory not found" in str(info.value) and "fit the model first" in str(info.value)
        assert "/fit_ok" not in str(info.value)
    state = engine.state(ROLE, "nothing")
    assert (state.status, state.memory_fitted, state.calib_present, state.model_version) == (
        "empty", False, False, None)


@pytest.mark.parametrize(
    ("role", "roi", "recipe", "error"),
    [("../x", "a", None, InvalidId), ("top", "a/b", None, InvalidId), ("top", "a\x00", None, InvalidId),
     ("x" * 10_000, "a", None, InvalidId), ("", "a", None, InvalidId), ("CON", "a", None, InvalidId),
     ("top", "a", "last", ReservedRecipe), ("top", "a", "../r", InvalidId)],
)
def test_bad_ids_are_400(engine: Engine, role: str, roi: str, recipe: str | None, error: type[EngineError]) -> None:
    before = sorted(p.relative_to(engine.data_root) for p in engine.data_root.rglob("*"))
    image = png_bytes(np.zeros((32, 32, 3), np.uint8))
    for call in (lambda: engine.infer(role, roi, MM, image, recipe_id=recipe),
                 lambda: engine.fit_ok(role, roi, MM, [image], recipe_id=recipe),
                 lambda: engine.state(role, roi, recipe_id=recipe),
                 lambda: engine.dataset_upload(role, roi, "ok", image, recipe_id=recipe)):
        with pytest.raises(error) as info:
            call()
        assert info.value.status == 400
    assert sorted(p.relative_to(engine.data_root) for p in engine.data_root.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("mm", [math.nan, math.inf, -0.1, 0, 0.0, "abc", "", None, True, [0.1]])
def test_bad_mm_per_px_is_400(engine: Engine, mm: object) -> None:
    image = png_bytes(np.zeros((32, 32, 3), np.uint8))
    for call in (lambda: engine.infer(ROLE, "cap", mm, image),  # type: ignore[arg-type]
                 lambda: engine.fit_ok(ROLE, "never", mm, [image])):  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="mm_per_px") as info:
            call()
        assert info.value.status == 400
    assert not engine.state(ROLE, "never").memory_fitted


def test_fit_rejects_bad_images(engine: Engine) -> None:
    good = png_bytes(np.full((32, 32, 3), 127, np.uint8))
    with pytest.raises(InvalidInput, match="at least one"):
        engine.fit_ok(ROLE, "never", MM, [])
    with pytest.raises(InvalidImage, match="image 1"):
        engine.fit_ok(ROLE, "never", MM, [good, b"not an image"])
    with pytest.raises(InvalidImage, match="image 0"):
        engine.fit_ok(ROLE, "never", MM, [png_bytes(np.zeros((4, 4, 3), np.uint8))])
    with pytest.raises(InvalidInput, match="no stored OK samples"):
        engine.fit_ok(ROLE, "never", MM, use_dataset=True)
    assert not engine.state(ROLE, "never").memory_fitted


def test_health(engine: Engine) -> None:
    health = engine.health()
    assert (health.status, health.backbone, health.input_size, health.device) == (
        "ok", "efficientnet_lite0", INPUT, "cpu")
    assert len(health.weights_sha256) == 64


# --- fit ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_result(engine: Engine, fitted: FitResult) -> None:
    assert (fitted.role_id, fitted.roi_id, fitted.recipe_id) == (ROLE, "cap", None)
    assert fitted.n_images == 8
    assert fitted.token_shape == (INPUT // 8, INPUT // 8) == (14, 14)
    h, w = fitted.token_shape
    assert fitted.n_embeddings == 8 * h * w == 1568
    assert fitted.coreset_size == round(engine.settings.coreset_ratio * 1568) == 157
    assert fitted.model_version == 1
    assert (fitted.backbone, fitted.input_size, fitted.distance, fitted.memory_fit) == (
        "efficientnet_lite0", INPUT, "l2", False)
    assert fitted.mm_per_px == MM
    assert len(fitted.ok_scores) == 8 and all(s > 0 and math.isfinite(s) for s in fitted.ok_scores)
    stats = fitted.ok_score_stats
    assert stats is not None and stats.n == 8
    assert stats.mean == pytest.approx(float(np.mean(fitted.ok_scores)))
    assert stats.max == pytest.approx(max(fitted.ok_scores))
    # OK-only rule: the 0.995 quantile of the OK scores times the safety factor 1.1
    assert fitted.threshold_suggestion == pytest.approx(float(np.quantile(fitted.ok_scores, 0.995)) * 1.1)
    assert {"decode", "extract", "coreset", "index", "ok_scores", "save"} <= set(fitted.timings_ms)
    manifest = engine.manifest(ROLE, "cap")
    assert manifest["operator_id"] == "op1" and manifest["n_embeddings"] == 1568
    assert manifest["input"]["side"] == INPUT
    state = engine.state(ROLE, "cap")
    assert state.memory_fitted and state.token_shape == (14, 14) and state.coreset_size == 157


@pytest.mark.slow
def test_infer_before_calibration_is_428(engine: Engine, fitted: FitResult, images: Images) -> None:
    with pytest.raises(CalibrationMissing) as info:
        engine.infer(ROLE, "cap", MM, png_bytes(images["good"][0]))
    assert info.value.status == 428
    assert "calibration_missing" in str(info.value)


@pytest.mark.slow
def test_raw_score_without_calibration(engine: Engine, fitted: FitResult, images: Images) -> None:
    # a non-square ROI (H 200, W 150) catches any swap of H and W
    roi = images["good"][0][10:210, 30:180]
    result = engine.infer(ROLE, "cap", MM, png_bytes(roi), allow_uncalibrated=True)
    assert result.threshold is None and result.decision is None and result.area_mm2_thr is None
    assert result.regions == ()
    assert result.image_shape == (200, 150)
    assert result.token_shape == (14, 14) and result.model_version == 1
    assert result.heatmap_raw is None
    assert result.heatmap_scale == pytest.approx(max(fitted.ok_scores))   # uncalibrated scale: largest OK score
    grey = _decode_png(result.heatmap_png)
    assert grey.shape == (200, 150) and grey.dtype == np.uint8
    assert result.score > 0


@pytest.mark.slow
def test_raw_maps(engine: Engine, fitted: FitResult, images: Images) -> None:
    image = png_bytes(images["broken"][2][:, :180])                                 # H 224, W 180
    png = engine.infer(ROLE, "cap", MM, image, allow_uncalibrated=True, heatmap="png")
    f32 = engine.infer(ROLE, "cap", MM, image, allow_uncalibrated=True, heatmap="float32")
    u8 = engine.infer(ROLE, "cap", MM, image, allow_uncalibrated=True, heatmap="uint8")
    none = engine.infer(ROLE, "cap", MM, image, allow_uncalibrated=True, heatmap="none")
    assert f32.heatmap_raw is not None and f32.heatmap_png is None
    assert f32.heatmap_raw.dtype == "float32" and f32.heatmap_raw.shape == (224, 180)
    amap = np.frombuffer(f32.heatmap_raw.data, np.float32).reshape(224, 180)
    assert f32.score == pytest.approx(float(np.percentile(amap, 99)), rel=1e-5)   # score = p99 of the map
    assert u8.heatmap_raw is not None and u8.heatmap_raw.dtype == "uint8" and u8.heatmap_raw.shape == (224, 180)
    grey = np.frombuffer(u8.heatmap_raw.data, np.uint8).reshape(224, 180)
    np.testing.assert_array_equal(grey, _decode_png(png.heatmap_png))
    np.testing.assert_array_equal(grey, to_uint8(amap, u8.heatmap_scale))
    assert none.heatmap_png is None and none.heatmap_raw is None
    assert png.score == f32.score == u8.score == none.score                      # same input, same score
    with pytest.raises(InvalidInput, match="heatmap"):
        engine.infer(ROLE, "cap", MM, image, allow_uncalibrated=True, heatmap="jpeg")  # type: ignore[arg-type]


@pytest.mark.slow
def test_shape_masks_the_score(engine: Engine, fitted: FitResult, images: Images) -> None:
    image = png_bytes(images["broken"][2])
    whole = engine.infer(ROLE, "cap", MM, image, allow_uncalibrated=True, heatmap="float32")
    assert whole.heatmap_raw is not None
    amap = np.frombuffer(whole.heatmap_raw.data, np.float32).reshape(SIDE, SIDE)
    shape = {"kind": "rect", "x": 20, "y": 40, "w": 100, "h": 60}
    masked = engine.infer(ROLE, "cap", MM, image, shape, allow_uncalibrated=True, heatmap="none")
    assert masked.score == pytest.approx(float(np.percentile(amap[40:100, 20:120], 99)), rel=1e-5)
    as_text = engine.infer(ROLE, "cap", MM, image, '{"kind": "rect", "x": 20, "y": 40, "w": 100, "h": 60}',
                           allow_uncalibrated=True, heatmap="none")
    assert as_text.score == masked.score


@pytest.mark.parametrize(
    ("shape", "error"),
    [({"kind": "rect", "x": 0, "y": 0, "w": 400, "h": 10}, InvalidShape),
     ({"kind": "circle", "cx": 10, "cy": 10, "r": 50}, InvalidShape),
     ({"kind": "annulus", "cx": 100, "cy": 100, "r": 20, "r_inner": 30}, InvalidShape),
     ("{not json", InvalidShape), ({"kind": "star"}, InvalidShape), ([1, 2], InvalidShape)],
)
@pytest.mark.slow
def test_bad_shape_is_400(engine: Engine, fitted: FitResult, images: Images,
                          shape: object, error: type[EngineError]) -> None:
    with pytest.raises(error) as info:
        engine.infer(ROLE, "cap", MM, png_bytes(images["good"][0]), shape, allow_uncalibrated=True)  # type: ignore[arg-type]
    assert info.value.status == 400


@pytest.mark.slow
def test_bad_images_on_infer(engine: Engine, fitted: FitResult) -> None:
    for data in (b"", b"garbage", png_bytes(np.zeros((2, 2, 3), np.uint8))):
        with pytest.raises(InvalidImage):
            engine.infer(ROLE, "cap", MM, data, allow_uncalibrated=True)
    with pytest.raises(InvalidImage):
        engine.infer(ROLE, "cap", MM, "a path.png", allow_uncalibrated=True)  # type: ignore[arg-type]
    # a PNG whose header declares 30000 x 30000: refused before any decoding
    with pytest.raises(PayloadTooLarge) as info:
        engine.infer(ROLE, "cap", MM, png_header_only(30000, 30000), allow_uncalibrated=True)
    assert info.value.status == 413


@pytest.mark.slow
def test_raw_array_input(engine: Engine, fitted: FitResult, images: Images) -> None:
    bgr = images["good"][0]
    from_png = engine.infer(ROLE, "cap", MM, png_bytes(bgr), allow_uncalibrated=True, heatmap="none")
    from_array = engine.infer(ROLE, "cap", MM, np.ascontiguousarray(bgr[:, :, ::-1]), allow_uncalibrated=True,
                              heatmap="none")                                  # arrays are RGB
    assert from_array.score == pytest.approx(from_png.score, rel=1e-6)


@pytest.mark.slow
def test_mm_per_px_mismatch_is_409(engine: Engine, fitted: FitResult, images: Images) -> None:
    image = png_bytes(images["good"][0])
    with pytest.raises(MmPerPxMismatch) as info:
        engine.infer(ROLE, "cap", 0.2, image, allow_uncalibrated=True)
    assert info.value.status == 409
    assert "0.2" in str(info.value) and "0.1" in str(info.value)
    with pytest.raises(MmPerPxMismatch):
        engine.calibrate_ng(ROLE, "cap", 0.15, [1.0, 2.0])
    # within the relative tolerance (1e-3) it is the same scale
    assert engine.infer(ROLE, "cap", MM * (1 + 1e-4), image, allow_uncalibrated=True, heatmap="none").score > 0


# --- calibration and decisions -----------------------------------------------------------------------


@pytest.mark.slow
def test_calibration_midpoint(engine: Engine, fitted: FitResult, ng_scores: list[float],
                              calibrated: CalibrationResult) -> None:
    ok_p99 = float(np.percentile(fitted.ok_scores, 99))
    ng_p5 = float(np.percentile(ng_scores, 5))
    assert calibrated.method == "ok_ng_midpoint"
    assert calibrated.threshold == pytest.approx((ok_p99 + ng_p5) / 2, rel=1e-12)
    assert (calibrated.n_ok, calibrated.n_ng, calibrated.model_version) == (8, 2, 1)
    assert calibrated.area_mm2_thr == 1.0 and calibrated.mm_per_px == MM
    # real bottles separate: the broken ones score well above every held-out OK score (5-fold)
    assert calibrated.warning is None and ok_p99 < ng_p5
    state = engine.state(ROLE, "cap")
    assert (state.status, state.calib_present, state.threshold) == ("ready", True, calibrated.threshold)


@pytest.mark.slow
def test_broken_bottle_is_ng_with_regions(engine: Engine, calibrated: CalibrationResult,
                                          images: Images) -> None:
    result = engine.infer(ROLE, "cap", MM, png_bytes(images["broken"][2]))
    assert isinstance(result, InferResult)
    assert result.decision == "ng"
    assert result.threshold == calibrated.threshold and result.heatmap_scale == calibrated.threshold
    assert result.area_mm2_thr == 1.0
    assert result.regions
    for region in result.regions:
        assert region.area_mm2 == pytest.approx(region.area_px * MM**2, rel=1e-9)
        assert region.area_mm2 >= 1.0
        assert region.max_score >= calibrated.threshold
        x, y, w, h = region.bbox
        assert 0 <= x and 0 <= y and x + w <= SIDE and y + h <= SIDE
    assert [r.max_score for r in result.regions] == sorted((r.max_score for r in result.regions), reverse=True)
    # threshold at grey 128: the strongest region's peak is at least 128 in the heatmap
    grey = _decode_png(result.heatmap_png)
    top = result.regions[0]
    assert grey[top.y : top.y + top.h, top.x : top.x + top.w].max() >= 128


@pytest.mark.slow
def test_good_bottles_are_ok(engine: Engine, calibrated: CalibrationResult, images: Images) -> None:
    for image in images["good"]:
        result = engine.infer(ROLE, "cap", MM, png_bytes(image))
        assert result.decision == "ok", result.score
        assert result.regions == ()
        assert result.score < calibrated.threshold


@pytest.mark.slow
def test_list_models(engine: Engine, calibrated: CalibrationResult) -> None:
    summary = {(m.role_id, m.roi_id): m for m in engine.list_models()}[(ROLE, "cap")]
    assert (summary.model_version, summary.calibrated, summary.coreset_size, summary.backbone) == (
        1, True, 157, "efficientnet_lite0")
    assert summary.recipe_id is None


# --- refit while inferring --------------------------------------------------------------------------------


@pytest.mark.slow
def test_infer_during_refit_uses_old_or_new_model(engine: Engine, images: Images) -> None:
    first = engine.fit_ok(ROLE, "refit", MM, [png_bytes(im) for im in images["train"][:3]])
    assert first.model_version == 1
    probe = png_bytes(images["good"][1])
    seen: list[int] = []
    errors: list[BaseException] = []
    started, fit_done = threading.Event(), threading.Event()

    def infer_loop() -> None:
        try:
            while True:
                done = fit_done.is_set()
                result = engine.infer(ROLE, "refit", MM, probe, allow_uncalibrated=True, heatmap="none")
                seen.append(result.model_version)
                state = engine.state(ROLE, "refit")         # reads the store (and its recovery) mid-fit
                assert state.model_version in (1, 2)
                started.set()
                if done:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=infer_loop)
    thread.start()
    try:
        assert started.wait(60)
        second = engine.fit_ok(ROLE, "refit", MM, [png_bytes(im) for im in images["train"][3:6]])
    finally:
        fit_done.set()
        thread.join(60)
    assert errors == []
    assert second.model_version == 2
    assert set(seen) <= {1, 2} and seen[0] == 1 and seen[-1] == 2
    assert seen == sorted(seen)                                  # never back to the old model
    assert engine.state(ROLE, "refit").model_version == 2


def test_cache_keeps_a_put_made_during_a_load() -> None:
    """Regression: a load that read the old model from disk overwrote the newer model that a
    refit (put) or a calibration (invalidate) stored while the load was running."""
    cache: ModelCache[str, str] = ModelCache(4)

    def slow_load_racing_a_refit() -> str:
        cache.put("k", "new")            # what fit_ok does once its model is on disk
        return "old"                     # what this load had read before

    assert cache.get_or_load("k", slow_load_racing_a_refit) == "old"
    assert cache.get_or_load("k", lambda: "reloaded") == "new"

    def load_racing_a_calibration() -> str:
        cache.invalidate("j")
        return "uncalibrated"

    assert cache.get_or_load("j", load_racing_a_calibration) == "uncalibrated"
    assert cache.get_or_load("j", lambda: "calibrated") == "calibrated"
    assert cache.get_or_load("j", lambda: "other") == "calibrated"


# --- recipes and deletion --------------------------------------------------------------------------------


@pytest.mark.slow
def test_recipes_are_independent(engine: Engine, calibrated: CalibrationResult,
                                 images: Images) -> None:
    image = png_bytes(images["good"][0])
    fit = engine.fit_ok(ROLE, "cap", 0.2, [png_bytes(images["train"][0])], recipe_id="r1")
    assert (fit.recipe_id, fit.model_version, fit.mm_per_px, fit.n_images) == ("r1", 1, 0.2, 1)
    assert fit.ok_scores == () and fit.ok_score_stats is None and fit.threshold_suggestion is None
    assert (engine.data_root / "recipes" / "r1" / "models" / ROLE / "cap" / "manifest.json").is_file()
    # the default recipe's model is untouched
    default = engine.state(ROLE, "cap")
    assert (default.model_version, default.mm_per_px, default.calib_present) == (1, MM, True)
    r1 = engine.state(ROLE, "cap", recipe_id="r1")
    assert (r1.recipe_id, r1.model_version, r1.mm_per_px, r1.calib_present) == ("r1", 1, 0.2, False)
    assert [(m.recipe_id, m.roi_id) for m in engine.list_models(recipe_id="r1")] == [("r1", "cap")]
    assert ("cap", None) in [(m.roi_id, m.recipe_id) for m in engine.list_models(recipe_id="default")]
    with pytest.raises(CalibrationMissing):
        engine.infer(ROLE, "cap", 0.2, image, recipe_id="r1")
    assert engine.infer(ROLE, "cap", 0.2, image, recipe_id="r1", allow_uncalibrated=True).recipe_id == "r1"
    assert engine.infer(ROLE, "cap", MM, image).decision == "ok"               # default recipe, calibrated
    with pytest.raises(ModelNotFound):
        engine.infer(ROLE, "cap", 0.2, image, recipe_id="r2", allow_uncalibrated=True)
    # deleting in r1 leaves the default recipe's model
    assert engine.delete_model(ROLE, "cap", recipe_id="r1").deleted is True
    assert engine.delete_model(ROLE, "cap", recipe_id="r1").deleted is False
    assert engine.list_models(recipe_id="r1") == []
    assert engine.state(ROLE, "cap", recipe_id="r1").status == "empty"
    with pytest.raises(ModelNotFound):
        engine.infer(ROLE, "cap", 0.2, image, recipe_id="r1", allow_uncalibrated=True)
    assert engine.state(ROLE, "cap").status == "ready"


@pytest.mark.slow
def test_delete_model(engine: Engine, images: Images) -> None:
    engine.fit_ok(ROLE, "gone", MM, [png_bytes(images["train"][0])])
    assert engine.infer(ROLE, "gone", MM, png_bytes(images["good"][0]), allow_uncalibrated=True).model_version == 1
    result = engine.delete_model(ROLE, "gone")
    assert (result.role_id, result.roi_id, result.recipe_id, result.deleted) == (ROLE, "gone", None, True)
    with pytest.raises(ModelNotFound):                                      # not served from the cache
        engine.infer(ROLE, "gone", MM, png_bytes(images["good"][0]), allow_uncalibrated=True)
    assert "gone" not in [m.roi_id for m in engine.list_models()]
    assert engine.delete_model(ROLE, "gone").deleted is False


# --- dataset store ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dataset_flow(engine: Engine, images: Images) -> None:
    roi = "ds"
    ok_files = [png_bytes(im) for im in images["train"][5:8]]
    ng_file = png_bytes(images["broken"][0])
    for i, data in enumerate(ok_files):
        sample = engine.dataset_upload(ROLE, roi, "ok", data, f"ok {i}.png", meta={"mm_per_px": MM})
        assert (sample.label, sample.filename, sample.bytes) == ("ok", f"ok {i}.png", len(data))
    auto = engine.dataset_upload(ROLE, roi, "ng", ng_file)                   # generated name, no meta
    assert auto.filename.startswith("ng_") and auto.filename.endswith(".png")
    for bad, error in ((b"not an image", InvalidImage), (np.zeros((8, 8, 3), np.uint8), InvalidImage)):
        with pytest.raises(error):
            engine.dataset_upload(ROLE, roi, "ok", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidId):
        engine.dataset_upload(ROLE, roi, "ok", ok_files[0], "../escape.png")
    with pytest.raises(InvalidInput, match="label"):
        engine.dataset_upload(ROLE, roi, "maybe", ok_files[0])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="must end with"):
        engine.dataset_upload(ROLE, roi, "ok", ok_files[0], "notes.txt")

    listing = engine.dataset_list(ROLE, roi)
    assert listing.classes["ok"].count == 3 and listing.classes["ok"].files == ("ok 0.png", "ok 1.png", "ok 2.png")
    assert listing.classes["ok"].meta == {"ok 0.png": True, "ok 1.png": True, "ok 2.png": True}
    assert listing.classes["ng"].files == (auto.filename,) and listing.classes["ng"].meta == {auto.filename: False}
    assert engine.dataset_file(ROLE, roi, "ok", "ok 1.png") == ok_files[1]
    assert engine.dataset_meta(ROLE, roi, "ok", "ok 1.png") == {"mm_per_px": MM}
    assert engine.dataset_meta(ROLE, roi, "ng", auto.filename) == {}
    with pytest.raises(SampleNotFound) as info:
        engine.dataset_file(ROLE, roi, "ok", "missing.png")
    assert info.value.status == 404

    fit = engine.fit_ok(ROLE, roi, MM, use_dataset=True)
    assert (fit.n_images, fit.model_version, len(fit.ok_scores)) == (3, 1, 3)
    assert engine.manifest(ROLE, roi)["ok_scores"]["sources"] == ["ok 0.png", "ok 1.png", "ok 2.png"]

    raw = engine.infer_dataset(ROLE, roi)                                    # not calibrated: raw scores
    assert (raw.n_total, raw.n_errors) == (4, 0)
    assert all(item.decision is None and item.threshold is None for item in raw.items)

    cal = engine.calibrate_dataset(ROLE, roi)
    # trained OK samples count with their 5-fold held-out scores from the fit, the NG sample is scored now
    assert (cal.n_ok, cal.n_ng, cal.method) == (3, 1, "ok_ng_midpoint")
    ng_score = next(item.score for item in raw.items if item.label == "ng")
    assert ng_score is not None
    expected = (float(np.percentile(fit.ok_scores, 99)) + ng_score) / 2
    assert cal.threshold == pytest.approx(expected, rel=1e-6)

    scored = engine.infer_dataset(ROLE, roi, include_heatmap=True)
    assert (scored.n_total, scored.n_errors, scored.status) == (4, 0, "ok")
    by_name = {item.filename: item for item in scored.items}
    assert [by_name[f"ok {i}.png"].decision for i in range(3)] == ["ok", "ok", "ok"]
    ng_item = by_name[auto.filename]
    assert ng_item.label == "ng" and ng_item.decision == "ng" and ng_item.n_regions == len(ng_item.regions) > 0
    assert all(r.area_mm2 == pytest.approx(r.area_px * MM**2) for r in ng_item.regions)
    assert _decode_png(ng_item.heatmap_png).shape == (SIDE, SIDE)

    assert engine.dataset_delete(ROLE, roi, "ok", "ok 0.png").removed == 1
    with pytest.raises(SampleNotFound):
        engine.dataset_delete(ROLE, roi, "ok", "ok 0.png")
    assert engine.dataset_clear(ROLE, roi, "ok").removed == 2
    assert engine.dataset_list(ROLE, roi).classes["ok"].count == 0
    assert engine.dataset_list(ROLE, roi).classes["ng"].count == 1
    assert engine.dataset_clear(ROLE, roi).removed == 1
    assert engine.dataset_clear(ROLE, roi).removed == 0
    folder = engine.data_root / "datasets" / ROLE / roi
    assert [p for p in folder.rglob("*") if p.is_file()] == []               # meta files went too


def test_an_early_heatmap_called_off_finishes_its_bands_and_starts_again_on_the_changed_map() -> None:
    """The encoding a refinement starts before its check of the score: called off (the check
    failed), it finishes the bands it started before the map changes; started again, it encodes
    the map as it is then."""
    from engine.scoring import _EarlyHeatmap

    amap = np.random.default_rng(5).uniform(0.0, 3.0, (300, 240)).astype(np.float32)
    early = _EarlyHeatmap(1.5, "png")
    call_off = early.start(amap)
    assert early.started is not None
    call_off()
    assert early.started is None
    amap *= 0.5                                              # the next round changes the map
    early.start(amap)
    assert early.started is not None
    encoding, encoded = early.started
    png, raw = encoding.join([output for output, _ in encoded()])
    assert raw is None and png is not None
    np.testing.assert_array_equal(_decode_png(png), to_uint8(amap, 1.5))

"""Model recipes: feature layouts of the backbones, settings, synthetic defects, the automatic
choice, and a model replaying its own recipe whatever the engine's settings are later."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from engine.api import Engine
from engine.autorecipe import MIN_AUTO_IMAGES, _best, _Figures
from engine.backbones import FeatureLayout
from engine.backbones.efficientnet_lite import EfficientNetLite, load_efficientnet_lite
from engine.recipes import ModelRecipe, candidate_recipes, manifest_layout, settings_recipe
from engine.settings import Settings
from engine.synthetic import DEFECT_KINDS, draw_defect
from tests.support import Doors, door_settings, load_bgr, part_png, png_bytes

MM = 0.1


@pytest.fixture(scope="module")
def lite() -> EfficientNetLite:
    return load_efficientnet_lite("efficientnet_lite0", input_size=64)


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)


def test_layout_rejects_bad_levels_and_even_sides() -> None:
    with pytest.raises(ValueError, match="increasing"):
        FeatureLayout(levels=(16, 8), aggregation=1)
    with pytest.raises(ValueError, match="increasing"):
        FeatureLayout(levels=(), aggregation=1)
    with pytest.raises(ValueError, match="odd"):
        FeatureLayout(levels=(8, 16), aggregation=2)


def test_lite_default_layout_is_the_pre_layout_features(lite: EfficientNetLite) -> None:
    """Models fitted before layouts were recorded replay with forward() without a layout."""
    x = _images(2)
    with torch.inference_mode():
        default = lite(x)
        explicit = lite(x, FeatureLayout(levels=(8, 16), aggregation=3))
        f8, f16 = lite.block_features(lite.normalize(x), lite.feature_blocks)
    assert torch.equal(default, explicit)
    pooled8 = F.avg_pool2d(f8, 3, stride=1, padding=1).permute(0, 2, 3, 1)
    assert torch.allclose(default[..., : f8.shape[1]], pooled8)
    assert manifest_layout({"features": None}) is None and manifest_layout({}) is None


def test_lite_stride4_level_is_averaged_onto_the_stride8_grid(lite: EfficientNetLite) -> None:
    layout = FeatureLayout(levels=(4, 8, 16), aggregation=1)
    x = _images(1)
    with torch.inference_mode():
        feats = lite(x, layout)                                            # 1 8 8 C
        f4 = lite.block_features(lite.normalize(x), [lite._level_blocks[4]])[0]
    assert feats.shape == (1, 8, 8, lite.feature_dim(layout))
    assert lite.feature_dim(layout) == 24 + 40 + 112
    expected = F.avg_pool2d(f4, 2).permute(0, 2, 3, 1)                     # 1 8 8 24
    assert torch.allclose(feats[..., :24], expected, atol=1e-6)
    with pytest.raises(ValueError, match="not \\[32\\]"):
        lite.check_layout(FeatureLayout(levels=(8, 32), aggregation=1))


def test_settings_levels_and_aggregation(monkeypatch: pytest.MonkeyPatch, lite: EfficientNetLite) -> None:
    monkeypatch.setenv("PATCHCORE_LEVELS", "4,8,16")
    monkeypatch.setenv("PATCHCORE_AGGREGATION", "5")
    recipe = settings_recipe(Settings(), lite)
    assert recipe.layout == FeatureLayout(levels=(4, 8, 16), aggregation=5) and recipe.side == 64
    monkeypatch.setenv("PATCHCORE_AGGREGATION", "2")
    with pytest.raises(ValidationError, match="odd"):
        Settings()
    monkeypatch.delenv("PATCHCORE_AGGREGATION")
    monkeypatch.setenv("PATCHCORE_LEVELS", "8,32")
    with pytest.raises(ValueError, match="not \\[32\\]"):
        settings_recipe(Settings(), lite)


def test_candidates_change_one_lever_each(lite: EfficientNetLite) -> None:
    base = ModelRecipe(side=224, layout=FeatureLayout((8, 16), 1), score_percentile=99.0, coreset_ratio=0.1)
    out = candidate_recipes(base, lite)
    assert out[0] == base
    assert out[1].layout == FeatureLayout((8, 16), 3)
    assert out[2].layout == FeatureLayout((4, 8, 16), 1)
    assert (out[3].side, out[3].coreset_ratio, out[3].layout) == (320, 0.05, base.layout)
    assert len({c.name for c in out}) == len(out)


def test_best_keeps_the_settings_recipe_on_ties() -> None:
    base = ModelRecipe(side=224, layout=FeatureLayout((8, 16), 1), score_percentile=99.0, coreset_ratio=0.1)
    other = ModelRecipe(side=320, layout=FeatureLayout((8, 16), 1), score_percentile=99.0, coreset_ratio=0.05)
    tie = _Figures(1.0, 1.0, 0.97)
    assert _best(base, [(other, tie, 1.0), (base, tie, 1.0)]) == base
    better = _Figures(1.0, 1.0, 0.98)
    assert _best(base, [(base, tie, 1.0), (other, better, 1.0)]) == other
    assert _best(base, [(base, _Figures(0.9, 1.0, 1.0), 1.0), (other, _Figures(0.95, 0.5, 0.5), 1.0)]) == other


@pytest.mark.parametrize("kind", sorted(DEFECT_KINDS))
def test_synthetic_defects_change_only_their_mask(kind: str) -> None:
    yy, xx = np.mgrid[0:200, 0:240]
    texture = 60 * ((xx // 3 + yy // 5) % 2) + np.random.default_rng(9).integers(0, 40, (200, 240))
    image = np.stack([texture + 40, texture + 80, 200 - texture], -1).astype(np.uint8)      # 200 240 3
    for seed in range(5):
        out, mask = draw_defect(image, kind, np.random.default_rng(seed))
        again, mask_again = draw_defect(image, kind, np.random.default_rng(seed))
        assert np.array_equal(out, again) and np.array_equal(mask, mask_again)
        assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == image.shape[:2]
        change = np.abs(out.astype(np.int16) - image).max(-1)                # H W
        assert mask.any() and change[mask].max() > 8, (kind, seed)
        # outside its mask a defect changes nothing; blur and contrast leave pixels they move by <= 8 levels out
        assert change[~mask].max(initial=0) <= (8 if kind in ("blur", "contrast") else 0), (kind, seed)
        assert mask.mean() < 0.05, f"{kind} covers {mask.mean():.1%} of the image: not a small defect"
    with pytest.raises(ValueError, match="unknown defect kind"):
        draw_defect(image, "dent", np.random.default_rng(0))


def _bottles(bottle_dir: Path, folder: str, count: int, side: int) -> list[bytes]:
    return [png_bytes(load_bgr(p, side)) for p in sorted((bottle_dir / folder).glob("*.png"))[:count]]


def test_model_replays_its_own_recipe(tmp_path: Path, bottle_dir: Path) -> None:
    """A model fitted with levels 4/8/16, no aggregation, 80 px is scored, grown by add_ok and
    imported the same way by an engine whose settings say otherwise (levels 8/16, 3 x 3, 64 px)."""
    train = _bottles(bottle_dir, "train/good", 4, 160)
    probe = _bottles(bottle_dir, "test/broken_small", 1, 160)[0]
    fitted_with = Settings(data_root=tmp_path / "a", backbone="efficientnet_lite0", input_size=80,
                           feature_levels=(4, 8, 16), aggregation=1, score_percentile=99.9)
    first = Engine(fitted_with)
    try:
        fit = first.fit_ok("top", "cap", MM, train)
        before = first.infer("top", "cap", MM, probe, allow_uncalibrated=True, heatmap="none")
        manifest = first.manifest("top", "cap")
        archive = first.lifecycle.export_model("top", "cap").archive
    finally:
        first.close()
    assert fit.recipe is not None and fit.auto_recipe is None and manifest["auto_recipe"] is None
    assert (fit.recipe.side, fit.recipe.levels, fit.recipe.aggregation, fit.recipe.score_percentile) == (
        80, (4, 8, 16), 1, 99.9)
    assert manifest["features"] == {"levels": [4, 8, 16], "aggregation": 1}
    assert manifest["backbone"]["feature_dim"] == 176 and manifest["input"]["side"] == 80
    later = Settings(data_root=tmp_path / "a", backbone="efficientnet_lite0", input_size=64)
    second = Engine(later)
    try:
        after = second.infer("top", "cap", MM, probe, allow_uncalibrated=True, heatmap="none")
        grown = second.lifecycle.add_ok("top", "cap", _bottles(bottle_dir, "train/good", 6, 160)[4:])
        regrown = second.manifest("top", "cap")
    finally:
        second.close()
    assert after.token_shape == (10, 10) == before.token_shape
    assert after.score == pytest.approx(before.score, rel=1e-5)
    # add_ok extracted the new images with the model's recipe: 10 x 10 patches of 176 channels each
    assert grown.n_images_total == 6 and regrown["n_embeddings"] == 6 * 100
    assert (regrown["features"], regrown["input"]["side"]) == (manifest["features"], 80)
    third = Engine(later.model_copy(update={"data_root": tmp_path / "b"}))
    try:
        third.lifecycle.import_model("top", "cap", archive)
        imported = third.infer("top", "cap", MM, probe, allow_uncalibrated=True, heatmap="none")
    finally:
        third.close()
    assert imported.score == pytest.approx(before.score, rel=1e-5)


def test_auto_recipe_choice_is_recorded_and_reloaded(tmp_path: Path, bottle_dir: Path) -> None:
    """A fit with BACKEND_AUTO_RECIPE=on on 8 real bottles and 2 stored NG samples: the reply and
    the manifest name the recipe chosen with every trial's validation figures; a later engine
    with other settings (auto off, another side and aggregation) scores with the chosen recipe."""
    train = _bottles(bottle_dir, "train/good", 8, 128)
    ng = _bottles(bottle_dir, "test/broken_large", 2, 128)
    first = Engine(Settings(data_root=tmp_path, backbone="efficientnet_lite0", input_size=64, auto_recipe="on",
                            auto_recipe_budget_s=600))
    try:
        for i, image in enumerate(ng):
            first.dataset_upload("top", "cap", "ng", image, f"ng{i}.png")
        fit = first.fit_ok("top", "cap", MM, train)
        before = first.infer("top", "cap", MM, ng[0], allow_uncalibrated=True, heatmap="none")
        manifest = first.manifest("top", "cap")
    finally:
        first.close()
    auto = fit.auto_recipe
    assert auto is not None and fit.recipe == auto.chosen
    assert (auto.n_ok, auto.n_fit, auto.n_real_ng, auto.skipped) == (2, 6, 2, ())
    assert 0 < auto.n_synthetic <= 2 * auto.n_ok     # a defect that changed no pixel is dropped
    tried = {t.recipe.name for t in auto.trials}
    assert len(tried) == 4 * 3 and auto.chosen.name in tried      # 4 candidates x 3 score percentiles
    best = max(auto.trials, key=lambda t: (round(t.image_auroc, 3), round(t.detection_rate, 3)))
    chosen = next(t for t in auto.trials if t.recipe == auto.chosen)
    assert (round(chosen.image_auroc, 3), round(chosen.detection_rate, 3)) == (
        round(best.image_auroc, 3), round(best.detection_rate, 3))
    assert all(0.0 <= t.image_auroc <= 1.0 and t.seconds > 0 for t in auto.trials)
    assert fit.timings_ms["auto_recipe"] > 0 and fit.input_size == auto.chosen.side
    assert manifest["auto_recipe"] == auto.model_dump(mode="json")
    assert manifest["input"]["side"] == auto.chosen.side
    assert manifest["features"] == {"levels": list(auto.chosen.levels), "aggregation": auto.chosen.aggregation}
    assert manifest["score"]["percentile"] == auto.chosen.score_percentile
    assert manifest["coreset"]["ratio"] == auto.chosen.coreset_ratio
    second = Engine(Settings(data_root=tmp_path, backbone="efficientnet_lite0", input_size=96, aggregation=5))
    try:
        after = second.infer("top", "cap", MM, ng[0], allow_uncalibrated=True, heatmap="none")
    finally:
        second.close()
    assert after.token_shape == (auto.chosen.side // 8,) * 2
    assert after.score == pytest.approx(before.score, rel=1e-5)


def test_auto_recipe_needs_enough_images(tmp_path: Path, bottle_dir: Path) -> None:
    """Below MIN_AUTO_IMAGES the fit keeps the settings' recipe and says no choice was made."""
    engine = Engine(Settings(data_root=tmp_path, backbone="efficientnet_lite0", input_size=64, auto_recipe="on"))
    try:
        fit = engine.fit_ok("top", "cap", MM, _bottles(bottle_dir, "train/good", MIN_AUTO_IMAGES - 1, 128))
        manifest = engine.manifest("top", "cap")
    finally:
        engine.close()
    assert fit.auto_recipe is None and manifest["auto_recipe"] is None
    assert fit.recipe is not None and (fit.recipe.side, fit.recipe.levels, fit.recipe.aggregation) == (64, (8, 16), 3)


def test_both_doors_carry_the_recipe_choice(tmp_path: Path) -> None:
    """The fit reply of each door holds the recipe and the automatic choice; a budget too small
    for a second trial still tries the settings' recipe and names the candidates it skipped."""
    config = door_settings(tmp_path, auto_recipe="on", auto_recipe_budget_s=0.001)
    engine = Engine(config.engine)
    images = [part_png(s) for s in range(MIN_AUTO_IMAGES)]
    try:
        with Doors(engine, config, timeout=120) as doors:
            by_zmq = doors.zmq.fit_ok("door", "z", MM, images)
            r = doors.web.post("/fit_ok", data={"role_id": "door", "roi_id": "h", "mm_per_px": str(MM)},
                               files=[("images", (f"{i}.png", im, "image/png")) for i, im in enumerate(images)])
            assert r.status_code == 200, r.text
            by_http = r.json()
    finally:
        engine.close()
    auto = by_zmq.auto_recipe
    assert auto is not None and by_zmq.recipe == auto.chosen
    assert len(auto.trials) == 3 and len(auto.skipped) == 3         # 1 candidate x 3 percentiles; 3 skipped
    assert {t.recipe.side for t in auto.trials} == {64}
    assert by_http["recipe"] == by_http["auto_recipe"]["chosen"]
    assert [t["recipe"]["name"] for t in by_http["auto_recipe"]["trials"]] == [t.recipe.name for t in auto.trials]
    assert by_http["auto_recipe"]["skipped"] == list(auto.skipped)

"""Choosing one ROI's recipe from its own OK images, at fit time.

Some OK images are held out; the engine draws synthetic defects on them (``engine.synthetic``:
scratches, spots, cut-and-paste patches, local blur and contrast changes). Each candidate recipe
is fitted on a subset of the remaining OK images and scores the held-out OK images, the synthetic
defects and the NG samples stored for the ROI. The recipe that best separates them is kept:
highest image AUROC, then the highest share of defective images scored above every OK image
(what a threshold set from OK images alone can catch), then the highest pixel AUROC on the
synthetic masks. Ties keep the earlier candidate, the settings' recipe first. Each candidate is
tried with several image-score percentiles, which cost nothing more than one map.

Trials run in order until ``auto_recipe_budget_s`` would be exceeded; those not started in time
are reported as skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from engine.anomaly_map import masked_percentile
from engine.errors import SampleNotFound
from engine.features import FeatureExtractor
from engine.images import resize_square
from engine.metrics import auroc
from engine.patchcore import build_memory, score_map
from engine.recipes import ModelRecipe
from engine.sampling import spread
from engine.schemas import AutoRecipeReport, RecipeTrial
from engine.search import MemorySearch
from engine.settings import Settings
from engine.synthetic import DEFECT_KINDS, draw_defect

__all__ = ["MIN_AUTO_IMAGES", "RecipeTrials", "ValidationSet", "choose_recipe", "validation_set"]

MIN_AUTO_IMAGES = 8          # fewer OK images: no trial, the settings' recipe
_FIT_IMAGES = 48             # OK images each trial fits on (spread over the set)
_HELD_OUT = 16               # OK images held out; each also gets synthetic defects
_DEFECTS_PER_IMAGE = 2
_REAL_NG_MAX = 32
_PERCENTILES = (99.0, 99.9, 100.0)
_PIXEL_SIDE = 64             # maps and masks are compared at this side for the pixel AUROC
_NO_IVF = 1 << 62

Decode = Callable[[object, str], np.ndarray]
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ValidationSet:
    """Decoded images of one choice, each at most ``work_side`` on its longer side."""

    fit: list[np.ndarray]                 # OK images the trials fit on
    ok: list[np.ndarray]                  # held-out OK images
    ng: list[np.ndarray]                  # synthetic defects, then stored NG samples
    masks: list[np.ndarray | None]        # per NG image its (H, W) bool mask; None for stored NG
    n_real_ng: int


def _shrink(rgb: np.ndarray, work_side: int) -> np.ndarray:
    scale = work_side / max(rgb.shape[:2])
    if scale >= 1:
        return rgb
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _load(source: Sequence[Any], ids: Sequence[int], what: str, decode: Decode, work_side: int) -> list[np.ndarray]:
    """Decoded, shrunk images ``ids`` of ``source``; a stored sample deleted meanwhile is left out."""
    out = []
    for i in ids:
        try:
            image = source[int(i)]
        except SampleNotFound:
            continue
        out.append(_shrink(decode(image, f"{what} {int(i)}"), work_side))
    return out


def validation_set(images: Sequence[Any], real_ng: Sequence[Any], decode: Decode, work_side: int,
                   seed: int) -> ValidationSet:
    """Split the OK images (held out: every ~4th, at most 16; fit: up to 48 of the rest) and draw
    ``_DEFECTS_PER_IMAGE`` synthetic defects of different kinds on each held-out image."""
    n = len(images)
    held = [int(i) for i in spread(n, min(_HELD_OUT, max(2, n // 4)))]
    held_set = set(held)
    rest = [i for i in range(n) if i not in held_set]
    fit_ids = [rest[int(j)] for j in spread(len(rest), min(_FIT_IMAGES, len(rest)))]
    ok = _load(images, held, "image", decode, work_side)
    rng = np.random.default_rng(seed)
    kinds = list(DEFECT_KINDS)
    ng, masks = [], []
    for j, image in enumerate(ok):
        for d in range(_DEFECTS_PER_IMAGE):
            defect, mask = draw_defect(image, kinds[(j * _DEFECTS_PER_IMAGE + d) % len(kinds)], rng)
            if mask.any():
                ng.append(defect)
                masks.append(mask)
    picks = spread(len(real_ng), min(_REAL_NG_MAX, len(real_ng))) if len(real_ng) else []
    real = _load(real_ng, picks, "NG sample", decode, work_side)
    return ValidationSet(_load(images, fit_ids, "image", decode, work_side), ok, ng + real,
                         masks + [None] * len(real), len(real))


@dataclass(frozen=True)
class _Figures:
    image_auroc: float
    detection_rate: float
    pixel_auroc: float | None

    def key(self) -> tuple[float, float, float]:
        return (round(self.image_auroc, 3), round(self.detection_rate, 3), round(self.pixel_auroc or 0.0, 3))


def _figures(ok_scores: list[float], ng_scores: list[float], maps: list[np.ndarray],
             masks: list[np.ndarray]) -> _Figures:
    labels = [0] * len(ok_scores) + [1] * len(ng_scores)
    image = auroc(np.array(ok_scores + ng_scores), np.array(labels))
    detection = float(np.mean(np.array(ng_scores) > max(ok_scores)))
    pixel = auroc(np.stack(maps), np.stack(masks)) if masks and any(m.any() for m in masks) else None
    return _Figures(image, detection, pixel)


def _small(array: np.ndarray, interpolation: int) -> np.ndarray:
    return cv2.resize(array, (_PIXEL_SIDE, _PIXEL_SIDE), interpolation=interpolation)


def _trial(recipe: ModelRecipe, data: ValidationSet, extractor: FeatureExtractor,
           settings: Settings) -> dict[float, _Figures]:
    """Fit ``recipe`` on ``data.fit``, score the held-out images; figures per score percentile."""
    features = extractor([resize_square(im, recipe.side) for im in data.fit], recipe.layout)   # N h w D
    memory = build_memory(features, recipe.coreset_ratio, False, settings.distance, rule=settings.coreset_rule,
                          seed=settings.seed, device=extractor.device.type, ivf_min_rows=_NO_IVF)
    search = MemorySearch(memory.index, memory.bank, settings.distance, settings.knn_k)
    scores: dict[float, tuple[list[float], list[float]]] = {p: ([], []) for p in _PERCENTILES}
    maps, masks = [], []
    for is_ng, images in ((False, data.ok), (True, data.ng)):
        for j, image in enumerate(images):
            feats = extractor([resize_square(image, recipe.side)], recipe.layout)[0]               # h w D
            height, width = image.shape[:2]
            amap = score_map(search, feats, height, width, settings.gaussian_sigma, None, 100.0, None).amap
            for p in _PERCENTILES:
                scores[p][is_ng].append(masked_percentile(amap, None, p))
            mask = data.masks[j] if is_ng else np.zeros((height, width), bool)
            if mask is not None:
                maps.append(_small(amap, cv2.INTER_AREA))
                masks.append(_small(mask.astype(np.uint8), cv2.INTER_NEAREST) > 0)
    return {p: _figures(ok, ng, maps, masks) for p, (ok, ng) in scores.items()}


@dataclass
class RecipeTrials:
    """What the choice tried, what it kept, and what it skipped for lack of time."""

    chosen: ModelRecipe
    rows: list[tuple[ModelRecipe, _Figures, float]]
    skipped: list[str]
    data: dict[str, int]
    seconds: float
    budget_s: float

    def report(self) -> AutoRecipeReport:
        trials = tuple(
            RecipeTrial(recipe=recipe.info(), image_auroc=round(f.image_auroc, 5),
                        detection_rate=round(f.detection_rate, 5),
                        pixel_auroc=None if f.pixel_auroc is None else round(f.pixel_auroc, 5), seconds=seconds)
            for recipe, f, seconds in self.rows
        )
        return AutoRecipeReport(chosen=self.chosen.info(), trials=trials, skipped=tuple(self.skipped),
                                seconds=self.seconds, budget_s=self.budget_s, **self.data)

    def as_dict(self) -> dict[str, Any]:
        return self.report().model_dump(mode="json")


def choose_recipe(candidates: Sequence[ModelRecipe], images: Sequence[Any], real_ng: Sequence[Any],
                  extractor: FeatureExtractor, decode: Decode, settings: Settings,
                  report: ProgressFn) -> RecipeTrials:
    """Try ``candidates`` in order within the time budget; the first one is always tried."""
    started = time.perf_counter()
    work_side = 2 * max(c.side for c in candidates)
    data = validation_set(images, real_ng, decode, work_side, settings.seed)
    rows: list[tuple[ModelRecipe, _Figures, float]] = []
    skipped: list[str] = []
    per_pixel_s = 0.0
    for i, candidate in enumerate(candidates):
        report("auto_recipe", i, len(candidates))
        elapsed = time.perf_counter() - started
        if rows and elapsed + per_pixel_s * candidate.side ** 2 > settings.auto_recipe_budget_s:
            skipped.append(candidate.name)
            continue
        t0 = time.perf_counter()
        figures = _trial(candidate, data, extractor, settings)
        seconds = round(time.perf_counter() - t0, 3)
        per_pixel_s = max(per_pixel_s, seconds / candidate.side ** 2)
        rows += [(replace(candidate, score_percentile=p), f, seconds) for p, f in figures.items()]
    report("auto_recipe", len(candidates), len(candidates))
    best = _best(candidates[0], rows)
    counts = {"n_fit": len(data.fit), "n_ok": len(data.ok), "n_synthetic": len(data.ng) - data.n_real_ng,
              "n_real_ng": data.n_real_ng}
    return RecipeTrials(best, rows, skipped, counts, round(time.perf_counter() - started, 3),
                        settings.auto_recipe_budget_s)


def _best(base: ModelRecipe, rows: list[tuple[ModelRecipe, _Figures, float]]) -> ModelRecipe:
    """Highest figures; among equals the settings' recipe, then the earliest row."""
    ranked = sorted(range(len(rows)), key=lambda i: (rows[i][1].key(), rows[i][0] == base, -i), reverse=True)
    return rows[ranked[0]][0]

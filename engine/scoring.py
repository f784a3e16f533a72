"""Scoring ROI images against their models: one ``prepare`` for every path (single infer, batch
items, stored samples), then the anomaly map, score, regions and heatmap of one ROI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import structlog

from engine import heatmap as heatmaps
from engine.backbones import FeatureLayout
from engine.budget import MemoryBudget
from engine.errors import CalibrationMissing, EngineError, InvalidInput
from engine.explain import explain_regions
from engine.features import FeatureExtractor
from engine.images import ImageLimits, resize_square
from engine.masks import parse_shape, shape_mask
from engine.models import LoadedModel, ModelKey, ModelRegistry
from engine.patchcore import score_map
from engine.regions import find_regions
from engine.schemas import BatchError, HeatmapFormat, InferBatchItem, InferResult, Region
from engine.threads import run_inference, run_shared
from engine.validate import heatmap_format, mm_per_px as check_mm_per_px

__all__ = ["Decoder", "Inspection", "PreparedRoi", "Recorder", "Scorer", "calibration_missing"]

Decoder = Callable[[object], np.ndarray]     # image input -> (H, W, 3) uint8 RGB
_R = TypeVar("_R")

_BATCH_ITEM_FIELDS = frozenset({"roi_id", "image", "mm_per_px", "shape"})
# what scoring keeps at the image's full size, per pixel: the float32 map and its blurred copy,
# the masked selection, the region labels and the heatmap's temporaries (measured peak ~24)
SCORE_BYTES_PER_PIXEL = 32

log = structlog.get_logger("engine.scoring")


def calibration_missing(key: ModelKey) -> CalibrationMissing:
    # "calibration_missing" is also the phrase the existing GUI recognises
    return CalibrationMissing(f"calibration_missing: model {key.where} has no threshold; calibrate it first")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


@dataclass(frozen=True)
class PreparedRoi:
    """A ROI image checked against its model and resized to the model's input side."""

    key: ModelKey
    model: LoadedModel
    resized: np.ndarray          # (S, S, 3) uint8
    size: tuple[int, int]        # (H, W) as received
    mask: np.ndarray | None      # (H, W) bool, None = whole image
    mm_per_px: float


@dataclass(frozen=True)
class Inspection:
    """One inspection as scored, for the recorder (``amap``: the (H, W) anomaly map)."""

    roi: PreparedRoi
    result: InferResult
    amap: np.ndarray
    operator_id: str | None


Recorder = Callable[[Inspection], None]


class Scorer:
    """Turns prepared ROIs into ``InferResult``s with the shared feature extractor.

    ``recorder`` (set by the owner) sees every inspection of ``infer`` and ``infer_batch``, not
    the scoring of stored samples; it runs on the request's thread and must be cheap."""

    recorder: Recorder | None = None

    def __init__(self, extractor: FeatureExtractor, models: ModelRegistry, images: ImageLimits,
                 budget: MemoryBudget) -> None:
        self._extractor = extractor
        self._models = models
        self._images = images
        self._decode = images.decode
        self._budget = budget

    @contextmanager
    def working_memory(self, images: Sequence[object], *, scoring: bool = True) -> Iterator[None]:
        """Hold the process budget for decoding (and with ``scoring``, scoring) ``images``.

        Raises:
            ServerBusy (503): the budget stayed full; PayloadTooLarge (413): it could never fit.
        """
        per_pixel = SCORE_BYTES_PER_PIXEL if scoring else 0
        needed = sum(self._images.working_bytes(image, per_pixel) for image in images)
        with self._budget.hold(needed, "the images" if len(images) > 1 else "the image"):
            yield

    def decode_held(self, image: object, what: str = "image") -> np.ndarray:
        """One image decoded while its decode holds the budget (a fit's images, an upload's check)."""
        with self.working_memory([image], scoring=False):
            return self._images.decode(image, what)

    def infer(self, key: ModelKey, mm_per_px: object, image: object, shape: object, *, allow_uncalibrated: bool,
              heatmap: HeatmapFormat, t0: float, operator_id: str | None = None, explain: bool = False) -> InferResult:
        """``prepare`` and ``score`` one ROI image on the inference thread, its working memory held
        there from decode to result (``t0``: when the request came, so a wait counts in the total)."""

        def inspected() -> InferResult:
            timings: dict[str, float] = {}
            with self.working_memory([image]):
                roi = self.prepare(key, mm_per_px, image, shape, allow_uncalibrated=allow_uncalibrated,
                                   heatmap=heatmap, timings=timings)
                return self.score(roi, heatmap, timings, t0, explain=explain, record=True, operator_id=operator_id)

        return run_inference(inspected)

    def score_image(self, key: ModelKey, mm_per_px: object, image: object, shape: object, heatmap: HeatmapFormat, *,
                    model: LoadedModel | None = None) -> tuple[PreparedRoi, InferResult]:
        """A stored or marked image scored as ``infer`` scores it, uncalibrated models included and
        nothing recorded, with the ROI it was prepared to. On the inference thread, working memory
        held there: held by the caller, it could wait there behind an inference waiting for it."""

        def scored() -> tuple[PreparedRoi, InferResult]:
            timings: dict[str, float] = {}
            with self.working_memory([image]):
                roi = self.prepare(key, mm_per_px, image, shape, allow_uncalibrated=True, model=model,
                                   timings=timings)
                return roi, self.score(roi, heatmap, timings, time.perf_counter())

        return run_inference(scored)

    def prepare(self, key: ModelKey, mm_per_px: object, image: object, shape: object, *,
                allow_uncalibrated: bool, heatmap: object = None, model: LoadedModel | None = None,
                timings: dict[str, float] | None = None) -> PreparedRoi:
        """Check one ROI request and bring its image to the model's input.

        The order of the checks is the contract of every scoring path: first the request's own
        faults (400/413: number formats, heatmap format, image bytes, shape), then the state of
        the model (404 no model, 428 no calibration, 409 another mm_per_px), so a bad request is
        never answered with "calibrate first" or "fit first". ``key`` is validated by its maker.

        Raises:
            InvalidInput / InvalidImage / InvalidShape (400), PayloadTooLarge (413), ModelNotFound
            (404), CalibrationMissing (428), MmPerPxMismatch (409).
        """
        timings = {} if timings is None else timings
        start = time.perf_counter()
        mm = check_mm_per_px(mm_per_px)
        if heatmap is not None:
            heatmap_format(heatmap)
        rgb = self._decode(image)
        height, width = rgb.shape[:2]
        mask = shape_mask(parse_shape(shape), height, width)                        # type: ignore[arg-type]
        timings["preprocess"] = _ms(start)
        start = time.perf_counter()
        model = model or self._models.load(key)
        if model.calibration is None and not allow_uncalibrated:
            raise calibration_missing(key)
        self._models.check_mm(model.manifest, mm)
        timings["load"] = _ms(start)
        start = time.perf_counter()
        resized = resize_square(rgb, model.side)
        timings["preprocess"] += _ms(start)
        return PreparedRoi(key, model, resized, (height, width), mask, mm)

    def score(self, roi: PreparedRoi, heatmap: HeatmapFormat, timings: dict[str, float], t0: float,
              features: np.ndarray | None = None, *, explain: bool = False, record: bool = False,
              operator_id: str | None = None) -> InferResult:
        """Score, regions and heatmap of one prepared ROI; ``features`` (h, w, D) when already extracted.

        ``explain``: each region gets its nearest normal patch; ``record``: the recorder sees it."""
        manifest = roi.model.manifest
        height, width = roi.size
        if features is None:
            start = time.perf_counter()
            features = self._extractor([roi.resized], roi.model.layout)[0]          # h w D
            timings["extract"] = _ms(start)
        calibration = roi.model.calibration
        threshold = None if calibration is None else float(calibration["threshold"])
        early = _EarlyHeatmap(threshold, heatmap) if threshold and threshold > 0 else None
        scored = score_map(roi.model.index, features, height, width, float(manifest["score"]["gaussian_sigma"]),
                           roi.mask, float(manifest["score"]["percentile"]), threshold, k=int(manifest["knn_k"]),
                           timings=timings, before_check=None if early is None else early.start)
        amap, score = scored.amap, scored.score
        scale = threshold if threshold and threshold > 0 else _uncalibrated_scale(manifest, amap)
        # the heatmap is encoded beside the regions (both only read the map), started before the
        # refinement's last check of the score where the map is refined; the request's thread
        # takes the heatmap's steps the helper has not taken once the regions are done
        encoding, encoded = early.started if early is not None and early.started else _encode(amap, scale, heatmap)
        start = time.perf_counter()
        area_thr, regions = self._regions(roi, amap)
        if explain and regions:
            regions = explain_regions(regions, features, scored.patch_scores, roi.size, roi.model.index,
                                      roi.model.origins, manifest)
        timings["regions"] = _ms(start)
        steps = encoded()
        png, raw = encoding.join([output for output, _ in steps])
        timings["heatmap"] = round(sum(ms for _, ms in steps), 3)
        timings["total"] = _ms(t0)
        decision = None if threshold is None else ("ng" if regions else "ok")
        key = roi.key
        log.info("infer", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, score=round(score, 5),
                 decision=decision, n_regions=len(regions), refined_patches=scored.refined, timings_ms=timings)
        result = InferResult(
            role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, score=score, threshold=threshold,
            decision=decision, area_mm2_thr=area_thr, regions=regions, heatmap_png=png, heatmap_raw=raw,
            heatmap_scale=scale, token_shape=tuple(manifest["token_shape"]), image_shape=(height, width),
            model_version=int(manifest["model_version"]), mm_per_px=roi.mm_per_px, timings_ms=timings,
        )
        if record and self.recorder is not None:
            self.recorder(Inspection(roi, result, amap, operator_id))
        return result

    @staticmethod
    def _regions(roi: PreparedRoi, amap: np.ndarray) -> tuple[float | None, tuple[Region, ...]]:
        calibration = roi.model.calibration
        if calibration is None:
            return None, ()
        threshold, area_thr = float(calibration["threshold"]), float(calibration["area_mm2_thr"])
        return area_thr, tuple(find_regions(amap, threshold, roi.mask, roi.mm_per_px, area_thr))

    def score_batch(self, role_id: str, items: Sequence[Any], recipe_id: str | None, *,
                    allow_uncalibrated: bool, heatmap: HeatmapFormat,
                    timings: dict[str, float]) -> list[InferBatchItem]:
        """Several ROIs of one part, on the inference thread: one backbone call per input side and
        feature layout; each item fails on its own."""
        return run_inference(lambda: self._score_batch(role_id, items, recipe_id, allow_uncalibrated, heatmap,
                                                       timings))

    def _score_batch(self, role_id: str, items: Sequence[Any], recipe_id: str | None, allow_uncalibrated: bool,
                     heatmap: HeatmapFormat, timings: dict[str, float]) -> list[InferBatchItem]:
        t0 = time.perf_counter()
        images = [item.get("image") for item in items if isinstance(item, dict)]
        with self.working_memory(images):
            prepared: dict[int, PreparedRoi] = {}
            errors: dict[int, EngineError] = {}
            for i, item in enumerate(items):
                try:
                    prepared[i] = self._prepare_item(i, item, role_id, recipe_id, allow_uncalibrated)
                except EngineError as exc:
                    errors[i] = exc
            timings["preprocess"] = _ms(t0)
            start = time.perf_counter()
            features = self._extract_by_side(prepared)
            timings["extract"] = _ms(start)
            return self._batch_results(items, prepared, errors, features, heatmap)

    def _batch_results(self, items: Sequence[Any], prepared: dict[int, PreparedRoi], errors: dict[int, EngineError],
                       features: dict[int, np.ndarray], heatmap: HeatmapFormat) -> list[InferBatchItem]:
        out = []
        for i, item in enumerate(items):
            if i in errors:
                exc = errors[i]
                roi_id = str(item.get("roi_id")) if isinstance(item, dict) else ""
                error = BatchError(code=exc.code, status=exc.status, message=exc.message)
                out.append(InferBatchItem(roi_id=roi_id, result=None, error=error))
            else:
                result = self.score(prepared[i], heatmap, {}, time.perf_counter(), features=features[i], record=True)
                out.append(InferBatchItem(roi_id=prepared[i].key.roi_id, result=result, error=None))
        return out

    def _prepare_item(self, i: int, item: object, role_id: str, recipe_id: str | None,
                      allow_uncalibrated: bool) -> PreparedRoi:
        if not isinstance(item, dict):
            raise InvalidInput(f"item {i} must be an object with roi_id, image, mm_per_px")
        unknown = set(item) - _BATCH_ITEM_FIELDS
        if unknown:
            raise InvalidInput(f"item {i} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
        key = self._models.key(role_id, item.get("roi_id"), recipe_id)
        return self.prepare(key, item.get("mm_per_px"), item.get("image"), item.get("shape"),
                            allow_uncalibrated=allow_uncalibrated)

    def _extract_by_side(self, prepared: dict[int, PreparedRoi]) -> dict[int, np.ndarray]:
        by_side: dict[tuple[int, FeatureLayout | None], list[int]] = {}
        for i, roi in prepared.items():
            by_side.setdefault((roi.model.side, roi.model.layout), []).append(i)
        features: dict[int, np.ndarray] = {}
        for (_, layout), indices in by_side.items():
            batch = self._extractor([prepared[i].resized for i in indices], layout)  # n h w D
            features.update(zip(indices, batch, strict=True))
        return features


def _encode(amap: np.ndarray, scale: float, fmt: HeatmapFormat) -> tuple[heatmaps.Encoding, Callable[[], list[Any]]]:
    """The heatmap's encoding, its steps started on an idle helper (``run_shared``)."""
    encoding = heatmaps.encoding(amap, scale, fmt)
    return encoding, run_shared([partial(_timed, step) for step in encoding.steps])


class _EarlyHeatmap:
    """A calibrated map's heatmap encoding started before the refinement's check of the score
    (``before_check``): the helper takes bands while the request's thread checks the percentile
    (~0.5 ms of a 900 x 900 map). The check nearly always passes; when it fails, the bands are
    finished and dropped before the map changes."""

    def __init__(self, scale: float, fmt: HeatmapFormat) -> None:
        self._scale, self._fmt = scale, fmt
        self.started: tuple[heatmaps.Encoding, Callable[[], list[Any]]] | None = None

    def start(self, amap: np.ndarray) -> Callable[[], None]:
        self.started = _encode(amap, self._scale, self._fmt)
        return self._call_off

    def _call_off(self) -> None:
        if self.started is not None:
            self.started[1]()
            self.started = None


def _timed(fn: Callable[..., _R], *args: Any) -> tuple[_R, float]:
    """``fn(*args)`` and the milliseconds it took."""
    start = time.perf_counter()
    return fn(*args), _ms(start)


def _uncalibrated_scale(manifest: dict[str, Any], amap: np.ndarray) -> float:
    """Heatmap scale without a threshold: the largest hold-out OK score of the fit."""
    values = manifest.get("ok_scores", {}).get("values") or []
    if values and max(values) > 0:
        return float(max(values))
    top = float(amap.max())
    return top if top > 0 else 1.0

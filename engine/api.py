"""The engine facade both doors call: it checks ids and delegates to ``ModelRegistry``, ``Fitter``,
``Scorer``, ``Calibrator``, ``Samples``; ``lifecycle`` and ``monitor`` serve their own ops.

Thread-safe: inferences run on the inference thread (``engine.threads``) in arrival order, fits on threads of
their own, serialized per ROI, never blocking inferences (which use the previous model until the new one is saved).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from engine import __version__, ivfscan
from engine.budget import MemoryBudget
from engine.calibrator import Calibrator
from engine.errors import InvalidInput, PayloadTooLarge
from engine.features import build_extractor
from engine.fitting import Fitter
from engine.images import ImageLimits
from engine.knn import configure_faiss
from engine.lifecycle import Lifecycle
from engine.models import ModelRegistry
from engine.monitor import Monitor
from engine.samples import Samples
from engine.schemas import (
    CalibrationResult,
    DatasetClearResult,
    DatasetListing,
    DatasetSample,
    DeleteResult,
    FitResult,
    HealthResult,
    HeatmapFormat,
    InferBatchResult,
    InferDatasetResult,
    InferResult,
    ModelSummary,
    Shape,
    StateResult,
)
from engine.scoring import Scorer
from engine.settings import Settings
from engine.storage import make_dirs
from engine.threads import configure_threads, on_fresh_thread
from engine.validate import check_id, check_recipe, heatmap_format, mm_per_px as check_mm_per_px

__all__ = ["Engine", "ImageInput", "ProgressFn"]

ImageInput = bytes | bytearray | memoryview | np.ndarray
ProgressFn = Callable[[str, int, int], None]   # (stage, done, total)
Label = Literal["ok", "ng"]

log = structlog.get_logger("engine")


def _no_progress(stage: str, done: int, total: int) -> None: ...


class Engine:
    """PatchCore inspection over per-(recipe, role, ROI) models stored under the data root."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._started = time.monotonic()
        self.data_root = Path(settings.data_root)
        make_dirs(self.data_root)
        configure_faiss()
        configure_threads(settings.torch_threads)
        self.device = settings.resolved_device
        self.extractor, self.backbone_reason = build_extractor(settings, self.data_root, self.device)
        self.backbone_info = self.extractor.backbone.info
        self.models = ModelRegistry(self.data_root, self.backbone_info, precision=self.extractor.precision,
                                    device=self.device, cache_size=settings.model_cache_size,
                                    mm_per_px_rtol=settings.mm_per_px_rtol, versions_kept=settings.model_versions_kept)
        self.models.recover_all()   # a crash may have cut a model swap short
        images = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_decoded_image_bytes)
        self.budget = MemoryBudget(settings.memory_budget_bytes, settings.memory_wait_s)
        self._scorer = Scorer(self.extractor, self.models, images, self.budget)
        self._samples = Samples(self.models, self._scorer, settings)
        self._calibrator = Calibrator(settings, self.models, self._samples)
        self._fitter = Fitter(settings, self.extractor, self.backbone_info, self.models, self._scorer.decode_held,
                              self._calibrator.carry)
        parts = (self.models, self._fitter, self._calibrator, self._samples, self._scorer)
        self.lifecycle = Lifecycle(settings, *parts, self.backbone_info)
        self.monitor = Monitor(settings, self.models, self._samples, self._scorer)   # the scorer's recorder
        log.info("engine_ready", backbone=self.backbone_info.name, reason=self.backbone_reason,
                 device=self.device, precision=self.extractor.precision, data_root=str(self.data_root),
                 search_scans="c" if ivfscan.AVAILABLE else "numpy")

    def close(self) -> None:
        self.monitor.close()
        self.models.close()

    # --- health and models ---------------------------------------------------------------

    def health(self) -> HealthResult:
        loaded = self.models.loaded_keys()
        return HealthResult(
            status="ok", device=self.device, model=self.backbone_info.name, version=__version__,
            uptime_s=round(time.monotonic() - self._started, 3),
            roles_loaded=tuple(sorted({k.role_id for k in loaded})),
            rois=tuple(sorted(k.where for k in loaded)), backbone=self.backbone_info.name,
            weights_sha256=self.backbone_info.weights_sha256, input_size=self.backbone_info.input_size)

    def state(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> StateResult:
        return self.models.state(self.models.key(role_id, roi_id, recipe_id))

    def manifest(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> dict[str, Any]:
        return self.models.require_manifest(self.models.key(role_id, roi_id, recipe_id))

    def list_models(self, *, recipe_id: str | None = None) -> list[ModelSummary]:
        return self.models.summaries(check_recipe(recipe_id))

    def delete_model(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> DeleteResult:
        key = self.models.key(role_id, roi_id, recipe_id)
        with self.models.write_guard(key):   # 409 fit_in_progress rather than waiting for a fit
            deleted = self.models.store(key.recipe).delete(key.role_id, key.roi_id)
            self.models.invalidate(key)
        log.info("model_deleted", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, deleted=deleted)
        return DeleteResult(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, deleted=deleted)

    # --- fit and calibration -------------------------------------------------------------

    def fit_ok(
        self, role_id: str, roi_id: str, mm_per_px: float, images: Sequence[ImageInput] | None = None, *,
        operator_id: str | None = None, memory_fit: bool = False, use_dataset: bool = False,
        allow_refit_recalibration: bool | None = None, recipe_id: str | None = None,
        progress: ProgressFn | None = None,
    ) -> FitResult:
        """Learn "normal" for one ROI from OK images (or the stored OK samples) and persist it; a
        refit of a calibrated model carries its calibration over (``FitResult.calibration``) unless
        ``allow_refit_recalibration`` (default: the setting) is false.

        Raises: InvalidInput / InvalidId / InvalidImage (400), FitInProgress (409), PayloadTooLarge
            (413: too many images, or one too large), StorageError (507: the previous model is intact).
        """
        key = self.models.key(role_id, roi_id, recipe_id)
        mm = check_mm_per_px(mm_per_px)
        sources = None
        if use_dataset:
            images = stored = self._samples.ok_images(key)
            sources = stored.names
        if images is None or len(images) == 0:
            raise InvalidInput("fit_ok needs at least one OK image")
        if len(images) > self.settings.max_fit_images:
            raise PayloadTooLarge(f"{len(images)} images exceed the limit of {self.settings.max_fit_images} per fit")
        recalibrate = self.settings.allow_refit_recalibration if allow_refit_recalibration is None else \
            allow_refit_recalibration
        return on_fresh_thread(lambda: self._fitter.fit(key, mm, images, operator_id=operator_id, memory_fit=memory_fit,
                               sources=sources, recalibrate=recalibrate, report=progress or _no_progress))

    def calibrate_ng(
        self, role_id: str, roi_id: str, mm_per_px: float, ok_scores: Sequence[float],
        ng_scores: Sequence[float] | None = None, score_percentile: float | None = None,
        area_mm2_thr: float | None = None, *, recipe_id: str | None = None,
    ) -> CalibrationResult:
        """Set the decision threshold (seed §5) and the minimum defect area.

        Raises: InvalidInput, ModelNotFound, FitInProgress, MmPerPxMismatch."""
        key = self.models.key(role_id, roi_id, recipe_id)
        return self._calibrator.from_scores(key, mm_per_px, ok_scores, ng_scores, score_percentile, area_mm2_thr)

    def calibrate_dataset(
        self, role_id: str, roi_id: str, default_mm_per_px: float | None = None,
        score_percentile: float | None = None, area_mm2_thr: float | None = None, *,
        recipe_id: str | None = None, progress: ProgressFn | None = None,
    ) -> CalibrationResult:
        """Calibrate from the stored OK/NG samples (see ``Calibrator.from_samples``)."""
        key = self.models.key(role_id, roi_id, recipe_id)
        return on_fresh_thread(lambda: self._calibrator.from_samples(key, default_mm_per_px, score_percentile,
                                                                     area_mm2_thr, progress or _no_progress))

    # --- inference -----------------------------------------------------------------------

    def infer(
        self, role_id: str, roi_id: str, mm_per_px: float, image: ImageInput,
        shape: Shape | dict[str, Any] | str | None = None, *, operator_id: str | None = None,
        allow_uncalibrated: bool = False, heatmap: HeatmapFormat = "png", recipe_id: str | None = None,
        explain: bool = False,
    ) -> InferResult:
        """Score one ROI image against its model (seed §4); ``explain``: each region gets its nearest
        normal patch (``Region.explanation``). Raises (request faults first, see ``Scorer.prepare``):
            InvalidImage / InvalidShape / InvalidInput (400), PayloadTooLarge (413),
            ModelNotFound (404), CalibrationMissing (428), MmPerPxMismatch (409)."""
        key = self.models.key(role_id, roi_id, recipe_id)
        return self._scorer.infer(key, mm_per_px, image, shape, allow_uncalibrated=allow_uncalibrated,
                                  heatmap=heatmap, t0=time.perf_counter(), operator_id=operator_id, explain=explain)

    def infer_batch(
        self, role_id: str, items: Sequence[dict[str, Any]], *, allow_uncalibrated: bool = False,
        heatmap: HeatmapFormat = "png", recipe_id: str | None = None,
    ) -> InferBatchResult:
        """Score several ROIs of one part with one backbone call per input size.

        ``items``: dicts with ``roi_id``, ``image``, ``mm_per_px``, ``shape?``. Each item fails on its
        own (``error``: the code and status ``infer`` would raise); a bad ``role_id`` fails the call."""
        t0 = time.perf_counter()
        check_id("role_id", role_id)
        if not isinstance(items, Sequence) or isinstance(items, str | bytes) or not items:
            raise InvalidInput("items must be a non-empty list of {roi_id, image, mm_per_px, shape?}")
        if len(items) > self.settings.max_batch_items:
            raise PayloadTooLarge(f"{len(items)} items exceed the limit of {self.settings.max_batch_items} per batch")
        heatmap_format(heatmap)
        timings: dict[str, float] = {}
        out = self._scorer.score_batch(role_id, items, recipe_id, allow_uncalibrated=allow_uncalibrated,
                                       heatmap=heatmap, timings=timings)
        timings["total"] = round((time.perf_counter() - t0) * 1000.0, 3)
        return InferBatchResult(role_id=role_id, recipe_id=check_recipe(recipe_id), n_total=len(out),
                                n_errors=sum(1 for item in out if item.error), items=tuple(out), timings_ms=timings)

    def infer_dataset(
        self, role_id: str, roi_id: str, default_mm_per_px: float | None = None, include_heatmap: bool = False, *,
        recipe_id: str | None = None, progress: ProgressFn | None = None,
    ) -> InferDatasetResult:
        """Score every stored sample (raw scores when the model is not calibrated yet)."""
        key = self.models.key(role_id, roi_id, recipe_id)
        report = progress or _no_progress
        return on_fresh_thread(lambda: self._samples.infer_all(key, default_mm_per_px, include_heatmap, report))

    # --- dataset store -------------------------------------------------------------------

    def dataset_upload(
        self, role_id: str, roi_id: str, label: Label, image: bytes, filename: str | None = None,
        meta: dict[str, Any] | None = None, *, recipe_id: str | None = None,
    ) -> DatasetSample:
        return self._samples.upload(self.models.key(role_id, roi_id, recipe_id), label, image, filename, meta)

    def dataset_list(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> DatasetListing:
        return self._samples.listing(self.models.key(role_id, roi_id, recipe_id))

    def dataset_file(self, role_id: str, roi_id: str, label: Label, filename: str, *,
                     recipe_id: str | None = None) -> bytes:
        return self._samples.read(self.models.key(role_id, roi_id, recipe_id), label, filename)

    def dataset_meta(self, role_id: str, roi_id: str, label: Label, filename: str, *,
                     recipe_id: str | None = None) -> dict[str, Any]:
        return self._samples.meta(self.models.key(role_id, roi_id, recipe_id), label, filename)

    def dataset_delete(self, role_id: str, roi_id: str, label: Label, filename: str, *,
                       recipe_id: str | None = None) -> DatasetClearResult:
        return self._samples.delete(self.models.key(role_id, roi_id, recipe_id), label, filename)

    def dataset_clear(self, role_id: str, roi_id: str, label: Label | None = None, *,
                      recipe_id: str | None = None) -> DatasetClearResult:
        return self._samples.clear(self.models.key(role_id, roi_id, recipe_id), label)

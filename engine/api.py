"""The engine facade: the one object both doors call.

Thread-safe: infers on any ROIs run concurrently; fits are serialized per ROI and never block
infers (an infer during a refit of the same ROI uses the previous model until the new one is
committed on disk).
"""

from __future__ import annotations

import json
import math
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from engine import __version__
from engine.anomaly_map import anomaly_map, masked_percentile
from engine.backbones import build_backbone
from engine.calibration import calibrate, percentile_fraction, score_stats
from engine.datasets import LABELS, DatasetStore
from engine.errors import (
    CalibrationMissing, CorruptModel, EngineError, IncompatibleModel, InvalidImage, InvalidInput, MmPerPxMismatch,
    ModelNotFound, PayloadTooLarge,
)
from engine.features import FeatureExtractor
from engine.heatmap import encode_png, to_uint8
from engine.ids import check_id, check_recipe
from engine.images import decode_image, from_array, resize_square
from engine.knn import Distance, TorchBank, configure_faiss, deserialize_index, serialize_index, set_nprobe
from engine.masks import parse_shape, shape_mask
from engine.model_cache import ModelCache
from engine.patchcore import build_memory, leave_out_scores, patch_scores
from engine.regions import find_regions
from engine.sampling import spread
from engine.schemas import (
    CalibrationResult, DatasetClass, DatasetClearResult, DatasetItemResult, DatasetListing, DatasetSample,
    BatchError, DeleteResult, FitResult, HealthResult, HeatmapFormat, InferBatchItem, InferBatchResult,
    InferDatasetResult, InferResult, ModelSummary,
    OkScoreStats, RawArray, Shape, StateResult,
)
from engine.settings import Settings
from engine.storage import ModelStore, make_dirs

__all__ = ["Engine", "ImageInput", "ProgressFn"]

ImageInput = bytes | bytearray | memoryview | np.ndarray
ProgressFn = Callable[[str, int, int], None]   # (stage, done, total)
Label = Literal["ok", "ng"]

log = structlog.get_logger("engine")
_OK_SCORE_FOLDS = 5
_OK_SCORE_MAX_IMAGES = 64


@dataclass(frozen=True)
class _Loaded:
    """A model ready to score: its manifest, faiss index and calibration."""

    manifest: dict[str, Any]
    index: Any
    calibration: dict[str, Any] | None

    @property
    def side(self) -> int:
        return int(self.manifest["input"]["side"])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


def _check_mm_per_px(value: Any, name: str = "mm_per_px") -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:   # OverflowError: an int beyond float range
        raise InvalidInput(f"{name} must be a number, got {value!r}") from exc
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise InvalidInput(f"{name} must be a finite number > 0, got {value!r}")
    return number


class Engine:
    """PatchCore inspection over per-(recipe, role, ROI) models stored under the data root."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._started = time.monotonic()
        self.data_root = Path(settings.data_root)
        make_dirs(self.data_root)
        configure_faiss(settings.torch_threads)
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)
        backbone, self.backbone_reason = build_backbone(
            settings.backbone, settings.weights, self.data_root, settings.input_size, settings.dinov2_block
        )
        self.device = settings.resolved_device
        self.extractor = FeatureExtractor(backbone, self.device, settings.precision, settings.effective_batch_size)
        self.backbone_info = backbone.info
        self._cache: ModelCache[tuple[str | None, str, str], _Loaded] = ModelCache(settings.model_cache_size)
        self._fit_locks: dict[tuple[str | None, str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        ModelStore(self.data_root).recover_all()
        recipes = self.data_root / "recipes"
        for base in sorted(recipes.iterdir()) if recipes.is_dir() else ():
            if base.is_dir():
                ModelStore(base).recover_all()   # a crash may have cut a swap in any recipe
        log.info("engine_ready", backbone=self.backbone_info.name, reason=self.backbone_reason,
                 device=self.device, precision=self.extractor.precision, data_root=str(self.data_root))

    def close(self) -> None:
        for key in self._cache.keys():
            self._cache.invalidate(key)

    # --- helpers -------------------------------------------------------------------------

    def _base(self, recipe: str | None) -> Path:
        return self.data_root if recipe is None else self.data_root / "recipes" / recipe

    def _key(self, role_id: str, roi_id: str, recipe_id: str | None) -> tuple[str | None, str, str]:
        return check_recipe(recipe_id), check_id("role_id", role_id), check_id("roi_id", roi_id)

    def _store(self, recipe: str | None) -> ModelStore:
        return ModelStore(self._base(recipe))

    def _datasets(self, recipe: str | None) -> DatasetStore:
        return DatasetStore(self._base(recipe))

    def _fit_lock(self, key: tuple[str | None, str, str]) -> threading.Lock:
        with self._locks_guard:
            return self._fit_locks.setdefault(key, threading.Lock())

    def _decode(self, image: ImageInput, what: str = "image") -> np.ndarray:
        if isinstance(image, np.ndarray):
            return from_array(image, self.settings.max_image_pixels)
        if not isinstance(image, bytes | bytearray | memoryview):
            raise InvalidImage(f"{what} must be encoded image bytes or a pixel array")
        if len(image) > self.settings.max_image_bytes:
            raise PayloadTooLarge(f"{what} has {len(image)} bytes; the limit is {self.settings.max_image_bytes}")
        try:
            return decode_image(image, self.settings.max_image_pixels)
        except EngineError as exc:
            if what == "image":
                raise
            raise type(exc)(f"{what}: {exc.message}") from exc

    def _load(self, key: tuple[str | None, str, str]) -> _Loaded:
        recipe, role_id, roi_id = key

        def load() -> _Loaded:
            files = self._store(recipe).load(role_id, roi_id)
            where = f"{role_id}/{roi_id}"
            self._check_compatible(files.manifest, where)
            try:
                index = deserialize_index(files.index_bytes)
            except RuntimeError as exc:   # faiss's error for bytes that are no index
                raise CorruptModel(f"model {where}: coreset.faiss is not a faiss index; refit the model") from exc
            try:
                set_nprobe(index, int(files.manifest.get("index", {}).get("nprobe", 0)))
            except RuntimeError as exc:   # the manifest says IVF, the file holds another index
                raise CorruptModel(f"model {where}: coreset.faiss does not match its manifest; refit the model") from exc
            emb = files.embeddings
            if emb.ndim != 2 or index.ntotal != len(emb) or index.d != emb.shape[1]:
                raise CorruptModel(f"model {where}: index and embeddings disagree; refit the model")
            _check_calibration(files.calibration, where)
            fitted_precision = files.manifest.get("backbone", {}).get("precision")
            if fitted_precision not in (None, self.extractor.precision):
                log.warning("precision_differs", role_id=role_id, roi_id=roi_id, fitted=fitted_precision,
                            running=self.extractor.precision,
                            note="scores may shift slightly against the calibrated threshold; refit to align")
            if self.device == "cuda":
                index = TorchBank(files.embeddings, files.manifest["distance"], self.device)
            return _Loaded(files.manifest, index, files.calibration)

        return self._cache.get_or_load(key, load)

    def _check_compatible(self, manifest: dict[str, Any], where: str) -> None:
        fitted = manifest.get("backbone", {})
        info = self.backbone_info
        if fitted.get("name") != info.name or fitted.get("weights_sha256") != info.weights_sha256:
            raise IncompatibleModel(
                f"model {where} was fitted with backbone {fitted.get('name')} "
                f"(weights {str(fitted.get('weights_sha256'))[:12]}), but this engine runs {info.name} "
                f"(weights {info.weights_sha256[:12]}): refit it, or start the engine with that backbone"
            )

    def _check_mm(self, manifest: dict[str, Any], mm_per_px: float) -> None:
        fitted = float(manifest["mm_per_px"])
        if not math.isclose(mm_per_px, fitted, rel_tol=self.settings.mm_per_px_rtol, abs_tol=0.0):
            raise MmPerPxMismatch(
                f"mm_per_px {mm_per_px} differs from the {fitted} the model was fitted with"
            )

    # --- health and state ----------------------------------------------------------------

    def health(self) -> HealthResult:
        loaded = self._cache.keys()
        return HealthResult(
            status="ok", device=self.device, model=self.backbone_info.name, version=__version__,
            uptime_s=round(time.monotonic() - self._started, 3),
            roles_loaded=tuple(sorted({role for _, role, _ in loaded})),
            rois=tuple(sorted(f"{role}/{roi}" for _, role, roi in loaded)),
            backbone=self.backbone_info.name, weights_sha256=self.backbone_info.weights_sha256,
            input_size=self.backbone_info.input_size,
        )

    def state(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> StateResult:
        recipe, role_id, roi_id = self._key(role_id, roi_id, recipe_id)
        manifest = self._store(recipe).read_manifest(role_id, roi_id)
        calibrated = manifest is not None and manifest.get("threshold") is not None
        return StateResult(
            status="ready" if calibrated else ("fitted" if manifest else "empty"),
            role_id=role_id, roi_id=roi_id, recipe_id=recipe,
            memory_fitted=manifest is not None, calib_present=calibrated,
            model_version=manifest.get("model_version") if manifest else None,
            threshold=manifest.get("threshold") if manifest else None,
            mm_per_px=manifest.get("mm_per_px") if manifest else None,
            token_shape=tuple(manifest["token_shape"]) if manifest else None,
            coreset_size=manifest.get("coreset_size") if manifest else None,
            backbone=manifest.get("backbone", {}).get("name") if manifest else None,
        )

    def manifest(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> dict[str, Any]:
        recipe, role_id, roi_id = self._key(role_id, roi_id, recipe_id)
        manifest = self._store(recipe).read_manifest(role_id, roi_id)
        if manifest is None:
            raise ModelNotFound(f"memory not found for role_id={role_id} roi_id={roi_id}: run /fit_ok first")
        return manifest

    def list_models(self, *, recipe_id: str | None = None) -> list[ModelSummary]:
        recipe = check_recipe(recipe_id)
        store = self._store(recipe)
        out = []
        for role_id, roi_id in store.list():
            try:
                manifest = store.read_manifest(role_id, roi_id)
            except CorruptModel as exc:   # one damaged model must not hide the others
                log.warning("model_skipped", role_id=role_id, roi_id=roi_id, error=exc.message)
                continue
            if manifest is None:
                continue
            out.append(ModelSummary(
                role_id=role_id, roi_id=roi_id, recipe_id=recipe, model_version=manifest["model_version"],
                calibrated=manifest.get("threshold") is not None, coreset_size=manifest["coreset_size"],
                backbone=manifest["backbone"]["name"], created_at=manifest["created_at"],
            ))
        return out

    def delete_model(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> DeleteResult:
        key = self._key(role_id, roi_id, recipe_id)
        with self._fit_lock(key):
            deleted = self._store(key[0]).delete(key[1], key[2])
            self._cache.invalidate(key)
        log.info("model_deleted", role_id=key[1], roi_id=key[2], recipe_id=key[0], deleted=deleted)
        return DeleteResult(role_id=key[1], roi_id=key[2], recipe_id=key[0], deleted=deleted)

    # --- fit -----------------------------------------------------------------------------

    def fit_ok(
        self, role_id: str, roi_id: str, mm_per_px: float, images: Sequence[ImageInput] | None = None, *,
        operator_id: str | None = None, memory_fit: bool = False, use_dataset: bool = False,
        recipe_id: str | None = None, progress: ProgressFn | None = None,
    ) -> FitResult:
        """Learn "normal" for one ROI from OK images (or the stored OK samples) and persist it.

        Raises:
            InvalidInput / InvalidId / InvalidImage: bad ids, mm_per_px, or an undecodable image.
            PayloadTooLarge: more images than the limit, or an image over the pixel limit.
            StorageError: the model could not be written (the previous one is intact).
        """
        key = self._key(role_id, roi_id, recipe_id)
        recipe, role_id, roi_id = key
        mm_per_px = _check_mm_per_px(mm_per_px)
        report = progress or (lambda stage, done, total: None)
        timings: dict[str, float] = {}
        sources: list[str] | None = None
        if use_dataset:
            store = self._datasets(recipe)
            sources = store.files(role_id, roi_id, "ok")
            if not sources:
                raise InvalidInput(f"no stored OK samples for {role_id}/{roi_id}: upload some first")
            images = _LazySamples(store, role_id, roi_id, sources)
        if images is None or len(images) == 0:
            raise InvalidInput("fit_ok needs at least one OK image")
        if len(images) > self.settings.max_fit_images:
            raise PayloadTooLarge(f"{len(images)} images exceed the limit of {self.settings.max_fit_images} per fit")

        with self._fit_lock(key):
            side = self.backbone_info.input_size
            features, sizes = self._extract_all(images, side, report, timings)   # N h w D
            start = time.perf_counter()
            report("coreset", 0, 1)
            s = self.settings
            distance: Distance = s.distance
            memory = build_memory(
                features, s.coreset_ratio, memory_fit, distance, projection_dim=s.coreset_projection_dim,
                seed=s.seed, device=self.device, ivf_min_rows=s.ivf_min_rows,
            )
            report("coreset", 1, 1)
            timings["coreset_index"] = _ms(start)

            start = time.perf_counter()
            scored = spread(len(sizes), _OK_SCORE_MAX_IMAGES)
            report("ok_scores", 0, len(scored))
            loo = leave_out_scores(features, memory, sizes, scored, distance, s.knn_k, s.gaussian_sigma,
                                   s.score_percentile, _OK_SCORE_FOLDS)
            report("ok_scores", len(loo), len(scored))
            timings["ok_scores"] = _ms(start)
            ok_scores = [loo[i] for i in sorted(loo)]

            start = time.perf_counter()
            report("save", 0, 1)
            store = self._store(recipe)
            try:
                previous = store.read_manifest(role_id, roi_id) if store.exists(role_id, roi_id) else None
            except CorruptModel:
                previous = None   # a damaged model is what a refit repairs: never let it block the fit
            version = int(previous["model_version"]) + 1 if previous else 1
            manifest = self._fit_manifest(
                key, version=version, operator_id=operator_id, mm_per_px=mm_per_px, features_shape=features.shape,
                coreset_size=len(memory.bank), memory_fit=memory_fit, side=side, loo=loo, sources=sources,
            )
            manifest["index"] = memory.choice.as_dict()
            manifest = store.save(role_id, roi_id, manifest, memory.bank, serialize_index(memory.index))
            live = TorchBank(memory.bank, distance, self.device) if self.device == "cuda" else memory.index
            self._cache.put(key, _Loaded(manifest, live, None))
            report("save", 1, 1)
            timings["save"] = _ms(start)

        stats = OkScoreStats(**score_stats(ok_scores)) if ok_scores else None
        suggestion = None
        if ok_scores:
            suggestion = calibrate(ok_scores, None, s.calibration_percentile, s.calibration_safety_factor).threshold
        log.info("fit_done", role_id=role_id, roi_id=roi_id, recipe_id=recipe, model_version=version,
                 n_images=len(sizes), coreset_size=len(memory.bank), timings_ms=timings)
        return FitResult(
            role_id=role_id, roi_id=roi_id, recipe_id=recipe, mm_per_px=mm_per_px, n_images=len(sizes),
            n_embeddings=manifest["n_embeddings"], coreset_size=manifest["coreset_size"],
            token_shape=tuple(manifest["token_shape"]), model_version=version, backbone=self.backbone_info.name,
            input_size=side, distance=distance, memory_fit=bool(memory_fit), timings_ms=timings,
            ok_scores=tuple(ok_scores), ok_score_stats=stats, threshold_suggestion=suggestion,
        )

    def _extract_all(
        self, images: Sequence[ImageInput], side: int, report: ProgressFn, timings: dict[str, float],
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Decode, resize and extract batch by batch, so at most one batch of decoded images is held.

        Returns features (N, h, w, D) and each image's original (H, W).
        """
        decode_ms = extract_ms = 0.0
        batch = self.extractor.batch_size
        chunks, sizes = [], []
        for first in range(0, len(images), batch):
            start = time.perf_counter()
            resized = []
            for i in range(first, min(first + batch, len(images))):
                rgb = self._decode(images[i], f"image {i}")
                sizes.append(rgb.shape[:2])
                resized.append(resize_square(rgb, side))
            decode_ms += _ms(start)
            start = time.perf_counter()
            chunks.append(self.extractor(resized))
            extract_ms += _ms(start)
            report("extract", len(sizes), len(images))
        timings["decode"], timings["extract"] = round(decode_ms, 3), round(extract_ms, 3)
        return np.concatenate(chunks), sizes

    def _fit_manifest(
        self, key: tuple[str | None, str, str], *, version: int, operator_id: str | None, mm_per_px: float,
        features_shape: tuple[int, ...], coreset_size: int, memory_fit: bool, side: int, loo: dict[int, float],
        sources: list[str] | None,
    ) -> dict[str, Any]:
        """Everything needed to replay a model (seed §3 fields first); storage adds checksums."""
        recipe, role_id, roi_id = key
        n, h, w, _ = features_shape
        info, s = self.backbone_info, self.settings
        scored = sorted(loo)
        return {
            "role_id": role_id, "roi_id": roi_id, "recipe_id": recipe, "model_version": version,
            "mm_per_px": mm_per_px, "n_embeddings": int(n * h * w), "coreset_size": int(coreset_size),
            "threshold": None, "created_at": _now(), "operator_id": operator_id, "n_images": int(n),
            "memory_fit": bool(memory_fit), "token_shape": [int(h), int(w)],
            "backbone": {"name": info.name, "weights_sha256": info.weights_sha256, "stride": info.stride,
                         "feature_dim": info.feature_dim, "precision": self.extractor.precision},
            "input": {"rule": "resize_square", "side": side, "interpolation": "area_down_linear_up",
                      "normalization": {"mean": list(info.mean), "std": list(info.std), "scale": "0..255"}},
            "distance": s.distance, "knn_k": s.knn_k,
            "score": {"percentile": s.score_percentile, "gaussian_sigma": s.gaussian_sigma, "upsample": "bilinear"},
            "coreset": {"ratio": s.coreset_ratio, "method": "greedy_k_center",
                        "principal_axes": s.coreset_projection_dim if s.coreset_projection_dim < info.feature_dim
                        else None, "seed": s.seed},
            "ok_scores": {"values": [loo[i] for i in scored], "images": [int(i) for i in scored],
                          "sources": [sources[i] for i in scored] if sources else None, "folds": _OK_SCORE_FOLDS},
            "library_versions": _library_versions(),
        }

    # --- calibration ---------------------------------------------------------------------

    def calibrate_ng(
        self, role_id: str, roi_id: str, mm_per_px: float, ok_scores: Sequence[float],
        ng_scores: Sequence[float] | None = None, score_percentile: float | None = None,
        area_mm2_thr: float | None = None, *, recipe_id: str | None = None,
    ) -> CalibrationResult:
        """Set the decision threshold (seed §5) and the minimum defect area.

        Raises:
            ModelNotFound, MmPerPxMismatch, InvalidInput.
        """
        key = self._key(role_id, roi_id, recipe_id)
        recipe, role_id, roi_id = key
        mm_per_px = _check_mm_per_px(mm_per_px)
        percentile = self.settings.calibration_percentile if score_percentile is None else score_percentile
        percentile_fraction(percentile)
        area = self.settings.default_area_mm2_thr if area_mm2_thr is None else area_mm2_thr
        if isinstance(area, bool) or not isinstance(area, int | float) or not _finite(area) or area < 0:
            raise InvalidInput(f"area_mm2_thr must be a finite number >= 0, got {area_mm2_thr!r}")
        with self._fit_lock(key):
            store = self._store(recipe)
            manifest = store.read_manifest(role_id, roi_id)
            if manifest is None:
                raise ModelNotFound(f"memory not found for role_id={role_id} roi_id={roi_id}: run /fit_ok first")
            self._check_mm(manifest, mm_per_px)
            result = calibrate(ok_scores, ng_scores, percentile, self.settings.calibration_safety_factor)
            calibration = {
                "threshold": result.threshold, "method": result.method, "score_percentile": result.score_percentile,
                "safety_factor": result.safety_factor, "area_mm2_thr": float(area), "ok_mean": result.ok_mean,
                "ng_mean": result.ng_mean, "ok_p99": result.ok_p99, "ng_p5": result.ng_p5,
                "n_ok": len(ok_scores), "n_ng": len(ng_scores or []), "warning": result.warning,
                "model_version": manifest["model_version"], "mm_per_px": mm_per_px, "created_at": _now(),
            }
            manifest = {**manifest, "threshold": result.threshold, "area_mm2_thr": float(area),
                        "calibrated_at": calibration["created_at"]}
            store.write_calibration(role_id, roi_id, calibration, manifest)
            self._cache.invalidate(key)
        log.info("calibrated", role_id=role_id, roi_id=roi_id, recipe_id=recipe, threshold=result.threshold,
                 method=result.method, warning=result.warning)
        return CalibrationResult(
            role_id=role_id, roi_id=roi_id, recipe_id=recipe, threshold=result.threshold, method=result.method,
            score_percentile=result.score_percentile, area_mm2_thr=float(area), safety_factor=result.safety_factor,
            ok_mean=result.ok_mean, ng_mean=result.ng_mean, ok_p99=result.ok_p99, ng_p5=result.ng_p5,
            n_ok=len(ok_scores), n_ng=len(ng_scores or []), warning=result.warning,
            model_version=manifest["model_version"], mm_per_px=mm_per_px,
        )

    # --- inference -----------------------------------------------------------------------

    def infer(
        self, role_id: str, roi_id: str, mm_per_px: float, image: ImageInput,
        shape: Shape | dict[str, Any] | str | None = None, *, operator_id: str | None = None,
        allow_uncalibrated: bool = False, heatmap: HeatmapFormat = "png", recipe_id: str | None = None,
    ) -> InferResult:
        """Score one ROI image against its model (seed §4).

        Raises:
            ModelNotFound (404), CalibrationMissing (428), MmPerPxMismatch (409),
            InvalidImage / InvalidShape / InvalidInput (400), PayloadTooLarge (413).
        """
        t0 = time.perf_counter()
        key = self._key(role_id, roi_id, recipe_id)
        mm_per_px = _check_mm_per_px(mm_per_px)
        if heatmap not in ("png", "uint8", "float32", "none"):
            raise InvalidInput(f"heatmap must be png, uint8, float32 or none, got {heatmap!r}")
        model = self._load(key)
        if model.calibration is None and not allow_uncalibrated:
            raise CalibrationMissing(
                f"calibration_missing: model {key[1]}/{key[2]} has no threshold; run /calibrate_ng first"
            )
        self._check_mm(model.manifest, mm_per_px)
        timings = {"load": _ms(t0)}
        start = time.perf_counter()
        rgb = self._decode(image)
        height, width = rgb.shape[:2]
        mask = shape_mask(parse_shape(shape), height, width)
        resized = resize_square(rgb, model.side)
        timings["preprocess"] = _ms(start)
        return self._score(key, model, resized, (height, width), mask, mm_per_px, heatmap, timings, t0)

    def infer_batch(
        self, role_id: str, items: Sequence[dict[str, Any]], *, allow_uncalibrated: bool = False,
        heatmap: HeatmapFormat = "png", recipe_id: str | None = None,
    ) -> InferBatchResult:
        """Score several ROIs of one part with one backbone call per input size.

        ``items``: dicts with ``roi_id``, ``image``, ``mm_per_px`` and optional ``shape``. Each
        item succeeds or fails on its own (its ``error`` then carries the code and status that
        ``infer`` would have raised); a bad ``role_id`` fails the whole call.
        """
        t0 = time.perf_counter()
        check_id("role_id", role_id)
        if not isinstance(items, Sequence) or isinstance(items, str | bytes) or not items:
            raise InvalidInput("items must be a non-empty list of {roi_id, image, mm_per_px, shape?}")
        if heatmap not in ("png", "uint8", "float32", "none"):
            raise InvalidInput(f"heatmap must be png, uint8, float32 or none, got {heatmap!r}")
        prepared: dict[int, tuple[Any, ...]] = {}
        errors: dict[int, EngineError] = {}
        for i, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise InvalidInput(f"item {i} must be an object with roi_id, image, mm_per_px")
                unknown = set(item) - {"roi_id", "image", "mm_per_px", "shape"}
                if unknown:
                    raise InvalidInput(f"item {i} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
                key = self._key(role_id, item.get("roi_id"), recipe_id)
                mm = _check_mm_per_px(item.get("mm_per_px"))
                model = self._load(key)
                if model.calibration is None and not allow_uncalibrated:
                    raise CalibrationMissing(
                        f"calibration_missing: model {key[1]}/{key[2]} has no threshold; run /calibrate_ng first")
                self._check_mm(model.manifest, mm)
                rgb = self._decode(item.get("image"))
                size = rgb.shape[:2]
                mask = shape_mask(parse_shape(item.get("shape")), size[0], size[1])
                prepared[i] = (key, model, resize_square(rgb, model.side), size, mask, mm)
            except EngineError as exc:
                errors[i] = exc
        timings = {"preprocess": _ms(t0)}
        start = time.perf_counter()
        features: dict[int, np.ndarray] = {}
        by_side: dict[int, list[int]] = {}
        for i, (_, model, *_rest) in prepared.items():
            by_side.setdefault(model.side, []).append(i)
        for indices in by_side.values():
            batch = self.extractor([prepared[i][2] for i in indices])             # n h w D
            features.update(zip(indices, batch, strict=True))
        timings["extract"] = _ms(start)
        out = []
        for i, item in enumerate(items):
            roi = str(item.get("roi_id")) if isinstance(item, dict) else ""
            if i in errors:
                exc = errors[i]
                out.append(InferBatchItem(roi_id=roi, result=None,
                                          error=BatchError(code=exc.code, status=exc.status, message=exc.message)))
                continue
            key, model, _, size, mask, mm = prepared[i]
            result = self._score(key, model, None, size, mask, mm, heatmap, {}, time.perf_counter(),
                                 features=features[i])
            out.append(InferBatchItem(roi_id=key[2], result=result, error=None))
        timings["total"] = _ms(t0)
        return InferBatchResult(role_id=role_id, recipe_id=check_recipe(recipe_id), n_total=len(out),
                                n_errors=len(errors), items=tuple(out), timings_ms=timings)

    def _score(
        self, key: tuple[str | None, str, str], model: _Loaded, resized: np.ndarray | None, size: tuple[int, int],
        mask: np.ndarray | None, mm_per_px: float, heatmap: HeatmapFormat, timings: dict[str, float], t0: float,
        features: np.ndarray | None = None,
    ) -> InferResult:
        manifest = model.manifest
        height, width = size
        if features is None:
            start = time.perf_counter()
            features = self.extractor([resized])[0]                             # h w D
            timings["extract"] = _ms(start)
        start = time.perf_counter()
        patches = patch_scores(model.index, features, manifest["distance"], int(manifest["knn_k"]))
        timings["knn"] = _ms(start)
        start = time.perf_counter()
        amap = anomaly_map(patches, height, width, float(manifest["score"]["gaussian_sigma"]))
        score = masked_percentile(amap, mask, float(manifest["score"]["percentile"]))
        timings["map"] = _ms(start)
        start = time.perf_counter()
        calibration = model.calibration
        threshold = area_thr = decision = None
        regions = ()
        if calibration is not None:
            threshold, area_thr = float(calibration["threshold"]), float(calibration["area_mm2_thr"])
            regions = tuple(find_regions(amap, threshold, mask, mm_per_px, area_thr))
            decision = "ng" if regions else "ok"
        timings["regions"] = _ms(start)
        start = time.perf_counter()
        scale = threshold if threshold and threshold > 0 else _uncalibrated_scale(manifest, amap)
        png = raw = None
        if heatmap == "png":
            png = encode_png(to_uint8(amap, scale))
        elif heatmap == "uint8":
            grey = to_uint8(amap, scale)
            raw = RawArray(dtype="uint8", shape=grey.shape, data=grey.tobytes())
        elif heatmap == "float32":
            raw = RawArray(dtype="float32", shape=amap.shape, data=np.ascontiguousarray(amap, np.float32).tobytes())
        timings["heatmap"] = _ms(start)
        timings["total"] = _ms(t0)
        recipe, role_id, roi_id = key
        log.info("infer", role_id=role_id, roi_id=roi_id, recipe_id=recipe, score=round(score, 5),
                 decision=decision, n_regions=len(regions), timings_ms=timings)
        return InferResult(
            role_id=role_id, roi_id=roi_id, recipe_id=recipe, score=score, threshold=threshold, decision=decision,
            area_mm2_thr=area_thr, regions=regions, heatmap_png=png, heatmap_raw=raw, heatmap_scale=scale,
            token_shape=tuple(manifest["token_shape"]), image_shape=(height, width),
            model_version=int(manifest["model_version"]), mm_per_px=mm_per_px, timings_ms=timings,
        )

    # --- dataset store -------------------------------------------------------------------

    def dataset_upload(
        self, role_id: str, roi_id: str, label: Label, image: bytes, filename: str | None = None,
        meta: dict[str, Any] | None = None, *, recipe_id: str | None = None,
    ) -> DatasetSample:
        recipe, role_id, roi_id = self._key(role_id, roi_id, recipe_id)
        if label not in LABELS:
            raise InvalidInput(f"label must be 'ok' or 'ng', got {label!r}")
        if not isinstance(image, bytes | bytearray | memoryview):
            raise InvalidImage("a dataset sample must be an encoded image file (PNG, JPEG, BMP, TIFF)")
        if meta is not None and not isinstance(meta, dict):
            raise InvalidInput("meta must be a JSON object")
        if meta is not None:
            try:
                json.dumps(meta)   # stored as JSON: bytes, non-text keys or deep nesting would fail later
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidInput(f"meta must be plain JSON (text keys, no binary, not deeply nested): "
                                   f"{type(exc).__name__}") from None
        self._decode(image)  # store only what the engine can read back
        extension = ".png" if bytes(image[:8]) == b"\x89PNG\r\n\x1a\n" else ".img"
        if extension == ".img":
            extension = {b"\xff\xd8": ".jpg", b"BM": ".bmp"}.get(bytes(image[:2]), ".tif")
        name, size = self._datasets(recipe).add(role_id, roi_id, label, bytes(image), filename, meta, extension)
        return DatasetSample(role_id=role_id, roi_id=roi_id, recipe_id=recipe, label=label, filename=name, bytes=size)

    def dataset_list(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> DatasetListing:
        recipe, role_id, roi_id = self._key(role_id, roi_id, recipe_id)
        store = self._datasets(recipe)
        classes = {}
        for label in LABELS:
            files = store.files(role_id, roi_id, label)
            classes[label] = DatasetClass(
                count=len(files), files=tuple(files),
                meta={name: store.has_meta(role_id, roi_id, label, name) for name in files},
            )
        return DatasetListing(role_id=role_id, roi_id=roi_id, recipe_id=recipe, classes=classes)

    def dataset_file(self, role_id: str, roi_id: str, label: Label, filename: str, *,
                     recipe_id: str | None = None) -> bytes:
        recipe, role_id, roi_id = self._key(role_id, roi_id, recipe_id)
        return self._datasets(recipe).read(role_id, roi_id, label, filename)

    def dataset_meta(self, role_id: str, roi_id: str, label: Label, filename: str, *,
                     recipe_id: str | None = None) -> dict[str, Any]:
        recipe, role_id, roi_id = self._key(role_id, roi_id, recipe_id)
        return self._datasets(recipe).meta(role_id, roi_id, label, filename)

    def dataset_delete(self, role_id: str, roi_id: str, label: Label, filename: str, *,
                       recipe_id: str | None = None) -> DatasetClearResult:
        recipe, role_id, roi_id = self._key(role_id, roi_id, recipe_id)
        removed = self._datasets(recipe).delete(role_id, roi_id, label, filename)
        return DatasetClearResult(role_id=role_id, roi_id=roi_id, recipe_id=recipe, removed=removed)

    def dataset_clear(self, role_id: str, roi_id: str, label: Label | None = None, *,
                      recipe_id: str | None = None) -> DatasetClearResult:
        recipe, role_id, roi_id = self._key(role_id, roi_id, recipe_id)
        removed = self._datasets(recipe).clear(role_id, roi_id, label)
        return DatasetClearResult(role_id=role_id, roi_id=roi_id, recipe_id=recipe, removed=removed)

    def _sample_items(self, recipe: str | None, role_id: str, roi_id: str) -> list[tuple[Label, str]]:
        store = self._datasets(recipe)
        return [(label, name) for label in LABELS for name in store.files(role_id, roi_id, label)]

    def _score_sample(self, key: tuple[str | None, str, str], model: _Loaded, label: str, name: str,
                      include_heatmap: bool, default_mm_per_px: float | None = None) -> InferResult:
        """A stored sample scored like ``infer``: its metadata's mm_per_px (else the default, else the
        model's), checked against the model (409), and its shape as the mask."""
        recipe, role_id, roi_id = key
        store = self._datasets(recipe)
        meta = store.meta(role_id, roi_id, label, name)
        mm = _check_mm_per_px(meta.get("mm_per_px") or default_mm_per_px or model.manifest["mm_per_px"])
        self._check_mm(model.manifest, mm)
        rgb = self._decode(store.read(role_id, roi_id, label, name))
        height, width = rgb.shape[:2]
        mask = shape_mask(parse_shape(meta.get("shape_json") or meta.get("shape")), height, width)
        timings: dict[str, float] = {}
        return self._score(key, model, resize_square(rgb, model.side), (height, width), mask,
                           mm, "png" if include_heatmap else "none", timings, time.perf_counter())

    def calibrate_dataset(
        self, role_id: str, roi_id: str, default_mm_per_px: float | None = None,
        score_percentile: float | None = None, area_mm2_thr: float | None = None, *,
        recipe_id: str | None = None, progress: ProgressFn | None = None,
    ) -> CalibrationResult:
        """Calibrate from the stored samples: NG samples are scored now; OK samples that trained
        the model use their leave-one-out scores from the fit (scoring them against a memory
        that contains them would give near-zero scores), other OK samples are scored now.

        Raises:
            ModelNotFound, InvalidInput (no OK score available).
        """
        key = self._key(role_id, roi_id, recipe_id)
        recipe, role_id, roi_id = key
        model = self._load(key)
        manifest = model.manifest
        mm = manifest["mm_per_px"] if default_mm_per_px is None else _check_mm_per_px(default_mm_per_px, "default_mm_per_px")
        trained = manifest.get("ok_scores", {})
        trained_sources = set(trained.get("sources") or [])
        loo = dict(zip(trained.get("sources") or [], trained.get("values") or [], strict=False))
        items = self._sample_items(recipe, role_id, roi_id)
        ok_scores, ng_scores = [], []
        report = progress or (lambda stage, done, total: None)
        for done, (label, name) in enumerate(items, start=1):
            if label == "ok" and name in loo:
                ok_scores.append(float(loo[name]))
            elif not (label == "ok" and name in trained_sources):
                try:
                    result = self._score_sample(key, model, label, name, False, default_mm_per_px)
                except EngineError as exc:
                    log.warning("calibration_sample_skipped", role_id=role_id, roi_id=roi_id, filename=name,
                                error=exc.code)
                    continue
                (ok_scores if label == "ok" else ng_scores).append(result.score)
            report("score_samples", done, len(items))
        if not ok_scores and not trained_sources:
            ok_scores = [float(v) for v in trained.get("values") or []]
        if not ok_scores:
            raise InvalidInput(f"no OK score available for {role_id}/{roi_id}: upload OK samples or refit")
        return self.calibrate_ng(role_id, roi_id, float(manifest["mm_per_px"]) if mm is None else mm,
                                 ok_scores, ng_scores or None, score_percentile, area_mm2_thr, recipe_id=recipe)

    def infer_dataset(
        self, role_id: str, roi_id: str, default_mm_per_px: float | None = None, include_heatmap: bool = False, *,
        recipe_id: str | None = None, progress: ProgressFn | None = None,
    ) -> InferDatasetResult:
        """Score every stored sample (raw scores when the model is not calibrated yet)."""
        key = self._key(role_id, roi_id, recipe_id)
        recipe, role_id, roi_id = key
        if default_mm_per_px is not None:
            _check_mm_per_px(default_mm_per_px, "default_mm_per_px")
        model = self._load(key)
        items = self._sample_items(recipe, role_id, roi_id)
        report = progress or (lambda stage, done, total: None)
        out = []
        for done, (label, name) in enumerate(items, start=1):
            try:
                r = self._score_sample(key, model, label, name, include_heatmap, default_mm_per_px)
                out.append(DatasetItemResult(
                    label=label, filename=name, mm_per_px=r.mm_per_px, score=r.score, threshold=r.threshold,
                    decision=r.decision, regions=r.regions, n_regions=len(r.regions), heatmap_png=r.heatmap_png,
                    error=None))
            except EngineError as exc:
                out.append(DatasetItemResult(
                    label=label, filename=name, mm_per_px=None, score=None, threshold=None, decision=None,
                    regions=(), n_regions=0, heatmap_png=None, error=f"{exc.code}: {exc.message}"))
            report("infer_samples", done, len(items))
        n_errors = sum(1 for item in out if item.error)
        return InferDatasetResult(status="ok", role_id=role_id, roi_id=roi_id, recipe_id=recipe,
                                  n_total=len(out), n_errors=n_errors, items=tuple(out))


def _finite(value: int | float) -> bool:
    """math.isfinite, but False (not OverflowError) for an int beyond the float range."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_calibration(calibration: dict[str, Any] | None, where: str) -> None:
    """calibration.json is not checksummed (it is the source of truth): check what scoring reads.

    Raises:
        CorruptModel: threshold or area_mm2_thr missing or not a finite number.
    """
    if calibration is None:
        return
    for name in ("threshold", "area_mm2_thr"):
        value = calibration.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
            raise CorruptModel(f"model {where}: calibration.json has no valid {name} ({value!r}); calibrate again")


class _LazySamples(Sequence[bytes]):
    """Stored OK samples read one at a time as the fit reaches them (bounded memory)."""

    def __init__(self, store: DatasetStore, role_id: str, roi_id: str, names: list[str]) -> None:
        self._store, self._role, self._roi, self._names = store, role_id, roi_id, names

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return self._store.read(self._role, self._roi, "ok", self._names[index])


def _uncalibrated_scale(manifest: dict[str, Any], amap: np.ndarray) -> float:
    """Heatmap scale without a threshold: the largest leave-one-out OK score of the fit."""
    values = manifest.get("ok_scores", {}).get("values") or []
    if values and max(values) > 0:
        return float(max(values))
    top = float(amap.max())
    return top if top > 0 else 1.0


def _library_versions() -> dict[str, str]:
    import cv2
    import faiss
    import torch

    return {"engine": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__, "opencv": cv2.__version__}

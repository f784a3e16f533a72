"""Fitting one ROI model: stream the OK images through the backbone, build the PatchCore memory,
score the training images by 5-fold hold-out, and store it all with its manifest.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from engine import __version__
from engine.autorecipe import MIN_AUTO_IMAGES, RecipeTrials, choose_recipe
from engine.backbones import BackboneInfo
from engine.calibration import calibrate, score_stats
from engine.datasets import StoredSamples
from engine.errors import InvalidInput, SampleNotFound
from engine.features import FeatureExtractor
from engine.images import resize_square
from engine.knn import serialize_index
from engine.models import LoadedModel, ModelKey, ModelRegistry, Previous
from engine.patchcore import Memory, build_memory, leave_out_scores
from engine.recipes import ModelRecipe, candidate_recipes, manifest_recipe, settings_recipe
from engine.sampling import spread
from engine.schemas import FitResult, OkScoreStats
from engine.settings import Settings

if TYPE_CHECKING:
    from engine.calibrator import Carry

__all__ = ["HOLD_OUT_FOLDS", "CarryFn", "Fitter", "ProgressFn"]

ProgressFn = Callable[[str, int, int], None]   # (stage, done, total)
# (key, the model replaced, the new model, recalibration allowed, progress) -> what the refit stores
CarryFn = Callable[[ModelKey, "Previous | None", LoadedModel, bool, ProgressFn], "Carry"]
# training images are scored against the memory built without their fold (an estimate of how
# unseen OK parts score); at most this many images are scored, spread over the set
HOLD_OUT_FOLDS = 5
_HOLD_OUT_MAX_IMAGES = 64

log = structlog.get_logger("engine.fitting")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Fitter:
    """Builds and stores models; fits of one model are serialized by the registry's lock."""

    def __init__(self, settings: Settings, extractor: FeatureExtractor, backbone: BackboneInfo,
                 models: ModelRegistry, decode: Callable[[object, str], np.ndarray], carry: CarryFn) -> None:
        self._settings = settings
        self._extractor = extractor
        self._backbone = backbone
        self._models = models
        self._decode = decode
        self._carry = carry

    def fit(self, key: ModelKey, mm_per_px: float, images: Sequence[Any], *, operator_id: str | None,
            memory_fit: bool, sources: list[str] | None, recalibrate: bool, report: ProgressFn) -> FitResult:
        """Fit and store the model of ``key`` from OK ``images`` (``sources`` names stored samples).

        A refit of a calibrated model re-derives its threshold on the new memory when
        ``recalibrate`` (``Calibrator.carry``); the new memory and that calibration are stored as one unit.

        Raises:
            FitInProgress: another fit of this model is running.
        """
        s, timings = self._settings, {}
        with self._models.fit_guard(key):
            previous = self._models.previous(key)
            recipe, trials = self._recipe(key, images, report, timings)
            features, sizes, kept = self.extract_all(images, report, timings, recipe)  # N h w D
            sources = [sources[i] for i in kept] if sources else None
            report("coreset", 0, 1)
            memory = build_memory(
                features, recipe.coreset_ratio, memory_fit, s.distance, rule=s.coreset_rule,
                seed=s.seed, device=self._extractor.device.type, ivf_min_rows=s.ivf_min_rows, timings=timings,
            )
            report("coreset", 1, 1)
            start = time.perf_counter()
            held_out, memory = self._hold_out_scores(features, memory, sizes, report, recipe.score_percentile)
            timings["ok_scores"] = _ms(start)
            start = time.perf_counter()
            manifest = self._manifest(key, mm_per_px, operator_id, memory_fit, features.shape, memory, held_out,
                                      sources, recipe)
            manifest["auto_recipe"] = trials.as_dict() if trials else None
            manifest["training_images"] = {"sources": sources, "sizes": [[int(h), int(w)] for h, w in sizes]}
            carry = self._carry(key, previous, self._models.serving(manifest, memory.bank, memory.index),
                                recalibrate, report)
            timings["recalibrate"] = _ms(start)
            start = time.perf_counter()
            report("save", 0, 1)
            manifest = self._models.save(key, carry.manifest, memory.bank, memory.index,
                                         serialize_index(memory.index), carry.record, origins=memory.origins)
            report("save", 1, 1)
            timings["save"] = _ms(start)
        ok_scores = [held_out[i] for i in sorted(held_out)]
        log.info("fit_done", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe,
                 model_version=manifest["model_version"], n_images=len(sizes), coreset_size=len(memory.bank),
                 carried=carry.info.carried if carry.info else None, timings_ms=timings)
        return self._result(key, manifest, len(sizes), timings, ok_scores, carry, recipe, trials)

    def _recipe(self, key: ModelKey, images: Sequence[Any], report: ProgressFn,
                timings: dict[str, float]) -> tuple[ModelRecipe, RecipeTrials | None]:
        """The settings' recipe, or with auto_recipe on the best of the candidates tried on these images."""
        base = settings_recipe(self._settings, self._extractor.backbone)
        if self._settings.auto_recipe != "on" or len(images) < MIN_AUTO_IMAGES:
            return base, None
        start = time.perf_counter()
        trials = choose_recipe(
            candidate_recipes(base, self._extractor.backbone), images, self._stored_ng(key), self._extractor,
            self._decode, self._settings, report,
        )
        timings["auto_recipe"] = _ms(start)
        log.info("auto_recipe", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe,
                 chosen=trials.chosen.name, seconds=trials.seconds, skipped=list(trials.skipped))
        return trials.chosen, trials

    def model_recipe(self, manifest: dict[str, Any]) -> ModelRecipe:
        """The recipe the stored model of ``manifest`` was fitted with, whatever the settings say now."""
        return manifest_recipe(manifest, self._extractor.backbone)

    def _stored_ng(self, key: ModelKey) -> StoredSamples:
        store = self._models.datasets(key.recipe)
        return StoredSamples(store, key.role_id, key.roi_id, "ng", store.files(key.role_id, key.roi_id, "ng"))

    def extract_all(self, images: Sequence[Any], report: ProgressFn, timings: dict[str, float],
                    recipe: ModelRecipe) -> tuple[np.ndarray, list[tuple[int, int]], list[int]]:
        """Decode, resize to ``recipe.side`` and extract with ``recipe.layout``, batch by batch
        (``FeatureExtractor.stream``: a few batches of decoded images are held at a time).

        Returns features (N, h, w, D), each image's original (H, W) and the indices of the images
        used: a stored sample deleted while the fit runs is left out (and out of the manifest's
        sources), not a reason to abort.

        Raises:
            InvalidInput: every stored sample was deleted before it could be read.
        """
        side = recipe.side

        def load(i: int) -> np.ndarray | None:
            try:
                image = images[i]
            except SampleNotFound:
                log.info("fit_sample_deleted", index=i)
                return None
            rgb = self._decode(image, f"image {i}")
            sizes[i] = rgb.shape[:2]
            return resize_square(rgb, side)

        start = time.perf_counter()
        sizes: dict[int, tuple[int, int]] = {}
        chunks, kept, load_s, extract_s = [], [], 0.0, 0.0
        for batch in self._extractor.stream(len(images), load, workers=self._settings.fit_workers,
                                           layout=recipe.layout):
            if batch.features is not None:
                chunks.append(batch.features)
                kept.extend(batch.indices)
            load_s, extract_s = load_s + batch.load_s, extract_s + batch.extract_s
            report("extract", batch.end, len(images))
        # the workers overlap the stages: the wall time is split in proportion to their thread time
        wall_ms = _ms(start)
        decode_ms = wall_ms * load_s / (load_s + extract_s) if load_s + extract_s > 0 else 0.0
        extract_ms = wall_ms - decode_ms
        timings["decode"], timings["extract"] = round(decode_ms, 3), round(extract_ms, 3)
        if not chunks:
            raise InvalidInput("every stored OK sample was deleted while the fit ran: nothing to fit")
        return np.concatenate(chunks), [sizes[i] for i in kept], kept

    def _hold_out_scores(self, features: np.ndarray, memory: Memory, sizes: list[tuple[int, int]],
                         report: ProgressFn, percentile: float) -> tuple[dict[int, float], Memory]:
        """Held-out OK scores, and the memory with the refinement margin they measured."""
        s = self._settings
        scored = spread(len(sizes), _HOLD_OUT_MAX_IMAGES)
        report("ok_scores", 0, len(scored))
        held_out, margin = leave_out_scores(features, memory, sizes, scored, s.distance, s.knn_k, s.gaussian_sigma,
                                            percentile, HOLD_OUT_FOLDS)
        report("ok_scores", len(held_out), len(scored))
        if memory.choice.kind == "flat":
            return held_out, memory
        return held_out, replace(memory, choice=replace(memory.choice, margin=margin))

    def _manifest(self, key: ModelKey, mm_per_px: float, operator_id: str | None, memory_fit: bool,
                  features_shape: tuple[int, ...], memory: Memory, held_out: dict[int, float],
                  sources: list[str] | None, recipe: ModelRecipe) -> dict[str, Any]:
        """Everything needed to replay a model (seed §3 fields first); storage adds checksums."""
        n, h, w, dim = features_shape
        info, s = self._backbone, self._settings
        scored = sorted(held_out)
        return {
            "role_id": key.role_id, "roi_id": key.roi_id, "recipe_id": key.recipe,
            "model_version": self._models.store(key.recipe).next_model_version(key.role_id, key.roi_id),
            "mm_per_px": mm_per_px, "n_embeddings": int(n * h * w), "coreset_size": len(memory.bank),
            "threshold": None, "created_at": now_utc(), "operator_id": operator_id, "n_images": int(n),
            "memory_fit": bool(memory_fit), "token_shape": [int(h), int(w)],
            "backbone": {"name": info.name, "weights_sha256": info.weights_sha256, "stride": info.stride,
                         "feature_dim": int(dim), "precision": self._extractor.precision},
            "input": {"rule": "resize_square", "side": recipe.side, "interpolation": "area_down_linear_up",
                      "normalization": {"mean": list(info.mean), "std": list(info.std), "scale": "0..255"}},
            "features": recipe.layout.as_dict(),
            "distance": s.distance, "knn_k": s.knn_k,
            "score": {"percentile": recipe.score_percentile, "gaussian_sigma": s.gaussian_sigma,
                      "upsample": "bilinear"},
            "coreset": {"ratio": recipe.coreset_ratio, "method": "greedy_k_center",
                        "principal_axes": memory.coreset_axes, "seed": s.seed},
            "index": memory.choice.as_dict(),
            "ok_scores": {"values": [held_out[i] for i in scored], "images": [int(i) for i in scored],
                          "sources": [sources[i] for i in scored] if sources else None, "folds": HOLD_OUT_FOLDS},
            "library_versions": _library_versions(),
        }

    def _result(self, key: ModelKey, manifest: dict[str, Any], n_images: int, timings: dict[str, float],
                ok_scores: list[float], carry: Carry, recipe: ModelRecipe,
                trials: RecipeTrials | None) -> FitResult:
        s = self._settings
        stats = OkScoreStats(**score_stats(ok_scores)) if ok_scores else None
        suggestion = None
        if ok_scores:
            suggestion = calibrate(ok_scores, None, s.calibration_percentile, s.calibration_safety_factor).threshold
        return FitResult(
            role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, mm_per_px=manifest["mm_per_px"],
            n_images=n_images, n_embeddings=manifest["n_embeddings"], coreset_size=manifest["coreset_size"],
            token_shape=tuple(manifest["token_shape"]), model_version=manifest["model_version"],
            backbone=self._backbone.name, input_size=int(manifest["input"]["side"]), distance=s.distance,
            memory_fit=bool(manifest["memory_fit"]), timings_ms=timings, ok_scores=tuple(ok_scores),
            ok_score_stats=stats, threshold_suggestion=suggestion, calibration=carry.info, recipe=recipe.info(),
            auto_recipe=trials.report() if trials else None,
        )


def _library_versions() -> dict[str, str]:
    import cv2
    import faiss
    import torch

    return {"engine": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__, "opencv": cv2.__version__}

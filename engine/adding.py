"""``add_ok``: grow a stored model's memory with new OK images, without a refit.

The new images go through the fit's own extraction (``Fitter.extract_all``), with the model's own
recipe (input side and feature layout from its manifest), not the settings' one. Each is scored
against the memory before the call (an exact search, like an inference: an estimate of how unseen
OK parts score, as the fit's hold-out scores are), then its patches join the memory by the
coverage rule of ``engine.growth``. The serving index is rebuilt over the grown memory (a flat
index is a copy of the rows; an inverted file is retrained, the one step whose cost grows with
the memory), the OK-score statistics gain the new scores, and the calibration is carried over by
the refit rule (``Calibrator.carry``). The result is stored as a new version, one swap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import structlog

from engine.anomaly_map import anomaly_map, masked_percentile
from engine.calibrator import Calibrator, Carry, with_calibration
from engine.fitting import Fitter, now_utc
from engine.growth import estimate_radius, nearest, select_rows
from engine.knn import serialize_index
from engine.models import ModelKey, ModelRegistry, Previous, model_not_found
from engine.patchcore import patch_origins
from engine.schemas import AddOkResult, RefitCalibration
from engine.search import IndexChoice, build_search_index
from engine.settings import Settings
from engine.storage import version_of

__all__ = ["OkAdder", "kept_calibration"]

ProgressFn = Callable[[str, int, int], None]
_PROBE_QUERIES = 2000        # left-out patches the probe count of an inverted file is tuned on
_VERSION_FIELDS = ("manifest_sha256", "files", "version", "version_created_by", "version_created_at")

log = structlog.get_logger("engine.adding")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


class OkAdder:
    """Adds OK images to stored models; serialized with the fits of the same model."""

    def __init__(self, settings: Settings, models: ModelRegistry, fitter: Fitter, calibrator: Calibrator) -> None:
        self._settings = settings
        self._models = models
        self._fitter = fitter
        self._calibrator = calibrator

    def add(self, key: ModelKey, images: Sequence[Any], mm_per_px: float | None, *, operator_id: str | None,
            sources: list[str] | None, feedback: bool, report: ProgressFn) -> AddOkResult:
        """Add ``images`` (``sources``: their stored sample names; ``mm_per_px`` checked when given)
        to the model of ``key``.

        ``feedback`` (``mark_ok``: images the operator overruled) keeps the served calibration as it
        is and leaves the images' scores out of the OK-score statistics: a false alarm's own score
        must not move the threshold, and a grown memory only lowers scores.

        Raises:
            ModelNotFound, CorruptModel, IncompatibleModel, FitInProgress, MmPerPxMismatch, InvalidImage,
            StorageError.
        """
        timings: dict[str, float] = {}
        with self._models.fit_guard(key):
            files = self._models.store(key.recipe).load(key.role_id, key.roi_id)   # 404, 500 corrupt_model
            self._models.check_compatible(files.manifest, key.where)
            if mm_per_px is not None:
                self._models.check_mm(files.manifest, mm_per_px)
            previous = self._models.previous(key)
            if previous is None:          # deleted or damaged since the load above
                raise model_not_found(key)
            manifest, bank = files.manifest, files.embeddings
            recipe = self._fitter.model_recipe(manifest)
            features, sizes, kept = self._fitter.extract_all(images, report, timings, recipe)  # N h w D
            start = time.perf_counter()
            scores, nearest_kept = self._score_new(manifest, bank, features, sizes)
            timings["ok_scores"] = _ms(start)
            radius, joined, grown, index, choice = self._grow(manifest, bank, features, nearest_kept, timings)
            origins = _grown_origins(files.origins, joined, features.shape, int(manifest["n_images"]))
            start = time.perf_counter()
            names = [sources[i] for i in kept] if sources else [None] * len(kept)
            new_manifest = self._manifest(key, manifest, features.shape, grown, choice.as_dict(), radius,
                                          {} if feedback else scores, names, operator_id, len(joined))
            new_manifest["training_images"] = _grown_training_images(manifest, names, sizes)
            if feedback:
                carry = kept_calibration(previous, new_manifest)
            else:
                carry = self._calibrator.carry(key, previous, self._models.serving(new_manifest, grown, index),
                                               self._settings.allow_refit_recalibration, report)
            timings["recalibrate"] = _ms(start)
            start = time.perf_counter()
            report("save", 0, 1)
            written = self._models.save(key, carry.manifest, grown, index, serialize_index(index), carry.record,
                                        created_by="add_ok", origins=origins)
            report("save", 1, 1)
            timings["save"] = _ms(start)
        log.info("ok_added", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, n_images=len(kept),
                 rows_added=len(joined), coreset_size=len(grown), version=version_of(written), timings_ms=timings)
        return AddOkResult(
            role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, version=version_of(written),
            model_version=written["model_version"], n_images=len(kept), n_images_total=written["n_images"],
            rows_added=len(joined), coreset_size=len(grown), covering_radius=radius,
            ok_scores=tuple(scores[i] for i in sorted(scores)), threshold=written.get("threshold"),
            calibration=carry.info, timings_ms=timings)

    def _grow(self, manifest: dict[str, Any], bank: np.ndarray, features: np.ndarray, nearest_kept: np.ndarray,
              timings: dict[str, float]) -> tuple[float, np.ndarray, np.ndarray, Any, IndexChoice]:
        """(radius, rows joined, grown memory, its index and index choice) for the new ``features``."""
        start = time.perf_counter()
        radius = self._radius(manifest, bank)
        rows = features.reshape(-1, features.shape[-1])
        joined = select_rows(rows, nearest_kept, radius, manifest["distance"], self._budget(manifest, bank, rows))
        grown = np.ascontiguousarray(np.concatenate([bank, rows[joined]]), dtype=np.float32)
        timings["coverage"] = _ms(start)
        start = time.perf_counter()
        left_out = np.setdiff1d(np.arange(len(rows)), joined)[:_PROBE_QUERIES]
        index, choice = build_search_index(grown, manifest["distance"], ivf_min_rows=self._settings.ivf_min_rows,
                                           probe_queries=rows[left_out], seed=self._settings.seed)
        margin = (manifest.get("index") or {}).get("margin")
        if choice.kind != "flat" and margin is not None:     # the grown memory keeps the fit's measured margin
            choice = replace(choice, margin=float(margin))
        timings["index"] = _ms(start)
        return radius, joined, grown, index, choice

    def _score_new(self, manifest: dict[str, Any], bank: np.ndarray, features: np.ndarray,
                   sizes: list[tuple[int, int]]) -> tuple[dict[int, float], np.ndarray]:
        """Each new image's score against ``bank`` (as inference scores it: whole image, exact), and
        every new patch's distance to its nearest memory row."""
        n, h, w, d = features.shape
        score = manifest["score"]
        nearest_kept, patch_scores = nearest(bank, features.reshape(-1, d), manifest["distance"],
                                             int(manifest["knn_k"]))
        per_image = patch_scores.reshape(n, h, w)
        scores = {}
        for i, (height, width) in enumerate(sizes):
            amap = anomaly_map(per_image[i], height, width, float(score["gaussian_sigma"]))
            scores[i] = masked_percentile(amap, None, float(score["percentile"]))
        return scores, nearest_kept

    @staticmethod
    def _budget(manifest: dict[str, Any], bank: np.ndarray, rows: np.ndarray) -> int:
        """Rows still to take so the memory holds the fit's coreset share of every patch seen."""
        if manifest.get("memory_fit"):
            return len(rows)
        total = int(manifest["n_embeddings"]) + len(rows)
        return max(0, int(round(float(manifest["coreset"]["ratio"]) * total)) - len(bank))

    def _radius(self, manifest: dict[str, Any], bank: np.ndarray) -> float:
        """The coverage radius recorded by an earlier add_ok, else estimated now (0 for a memory
        that kept every patch: every new patch joins it, as it would have in the fit)."""
        recorded = manifest.get("coverage") or {}
        if "radius" in recorded:
            return float(recorded["radius"])
        if manifest.get("memory_fit"):
            return 0.0
        return estimate_radius(bank, manifest["distance"], self._settings.seed)

    def _manifest(self, key: ModelKey, manifest: dict[str, Any], shape: tuple[int, ...], grown: np.ndarray,
                  choice: dict[str, Any], radius: float, scores: dict[int, float], names: list[str | None],
                  operator_id: str | None, rows_added: int) -> dict[str, Any]:
        n, h, w, _ = shape
        before = int(manifest["n_images"])
        trained = manifest["ok_scores"]
        old_sources = trained.get("sources") or [None] * len(trained["values"])
        order = sorted(scores)
        sources = [*old_sources, *(names[i] for i in order)]
        out = {name: value for name, value in manifest.items() if name not in _VERSION_FIELDS}
        out.update(
            model_version=self._models.store(key.recipe).next_model_version(key.role_id, key.roi_id),
            n_images=before + int(n), n_embeddings=int(manifest["n_embeddings"]) + int(n * h * w),
            coreset_size=len(grown), index=choice,
            coverage={"radius": radius, "rule": "farther_than_radius_or_within_ratio_budget",
                      "radius_source": (manifest.get("coverage") or {}).get("radius_source", "estimated_min_row_gap")},
            ok_scores={**trained, "values": [*trained["values"], *(scores[i] for i in order)],
                       "images": [*trained["images"], *(before + i for i in order)],
                       "sources": sources if any(name is not None for name in sources) else None},
            additions=[*manifest.get("additions", []), {"at": now_utc(), "n_images": int(n),
                                                         "rows_added": rows_added, "operator_id": operator_id}],
        )
        return out


def _grown_origins(origins: np.ndarray | None, joined: np.ndarray, shape: tuple[int, ...],
                   before: int) -> np.ndarray | None:
    """The memory's row sources with the joined rows' appended (their images numbered after the
    ``before`` training images); None when the memory had none (rows of an older model)."""
    if origins is None:
        return None
    _, h, w, _ = shape
    added = patch_origins(joined, h, w)
    added[:, 0] += before
    return np.concatenate([origins, added]).astype(np.int32)


def _grown_training_images(manifest: dict[str, Any], names: list[str | None],
                           sizes: list[tuple[int, int]]) -> dict[str, Any] | None:
    """``training_images`` of the manifest with the added images after the fit's."""
    training = manifest.get("training_images")
    if training is None:
        return None
    before = len(training.get("sizes") or [])
    sources = [*(training.get("sources") or [None] * before), *names]
    return {"sources": sources if any(name is not None for name in sources) else None,
            "sizes": [*(training.get("sizes") or []), *([int(h), int(w)] for h, w in sizes)]}


def kept_calibration(previous: Previous, manifest: dict[str, Any]) -> Carry:
    """The served calibration, unchanged, for the new memory of ``manifest`` (operator feedback)."""
    last = previous.calibration
    if last is None:
        return Carry(with_calibration(manifest, None), None, None)
    record = {**last, "model_version": manifest["model_version"],
              "carried": {"from_model_version": previous.version, "previous_threshold": last["threshold"],
                          "reason": "operator feedback keeps the threshold"}}
    info = RefitCalibration(carried=True, rule=last.get("method"), threshold=last["threshold"],
                            previous_threshold=last["threshold"], previous_rule=last.get("method"),
                            source="dataset" if last.get("source") == "dataset" else "scores",
                            n_ok=int(last.get("n_ok") or 0), n_ng=int(last.get("n_ng") or 0),
                            warning=last.get("warning"), reason="operator feedback keeps the threshold")
    return Carry(with_calibration(manifest, record, info), record, info)

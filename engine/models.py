"""The stateful layer around stored models: where they live, loading with its checks, the LRU of
loaded models, per-model fit locks, and start-up recovery.

Every model is named by a ``ModelKey`` (recipe, role, ROI); the default recipe (None) lives
directly under the data root, the others under ``recipes/<recipe>/``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import structlog

from engine.backbones import BackboneInfo, FeatureLayout
from engine.datasets import DatasetStore
from engine.errors import CorruptModel, FitInProgress, IncompatibleModel, MmPerPxMismatch, ModelNotFound
from engine.knn import TorchBank, deserialize_index, set_nprobe
from engine.model_cache import ModelCache
from engine.patchcore import MemorySearch, searcher
from engine.recipes import manifest_layout
from engine.schemas import ModelSummary, StateResult
from engine.storage import DEFAULT_VERSIONS_KEPT, ModelStore, remove_temp_files, version_of
from engine.validate import check_id, check_recipe, stored_calibration

__all__ = ["LoadedModel", "ModelKey", "ModelRegistry", "Previous", "model_not_found"]

log = structlog.get_logger("engine.models")
_WRITE_POLL_S = 0.05     # how often a waiting calibration or delete looks whether a fit took the model


class ModelKey(NamedTuple):
    recipe: str | None
    role_id: str
    roi_id: str

    @property
    def where(self) -> str:
        return f"{self.role_id}/{self.roi_id}"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score: its manifest, search of its memory and calibration."""

    manifest: dict[str, Any]
    index: MemorySearch | TorchBank
    calibration: dict[str, Any] | None
    origins: np.ndarray | None = None      # (M, 3) int32 source of each memory row; None: unknown

    @property
    def side(self) -> int:
        return int(self.manifest["input"]["side"])

    @property
    def layout(self) -> FeatureLayout | None:
        """The feature layout the model was fitted with (None: the backbone's own, older models)."""
        return manifest_layout(self.manifest)


@dataclass(frozen=True)
class Previous:
    """What a refit replaces: the stored manifest and its calibration (None when uncalibrated)."""

    manifest: dict[str, Any]
    calibration: dict[str, Any] | None

    @property
    def version(self) -> int:
        return int(self.manifest["model_version"])


def fit_in_progress(key: ModelKey) -> FitInProgress:
    return FitInProgress(f"a fit of model {key.where} is running; retry when it has finished")


def model_not_found(key: ModelKey) -> ModelNotFound:
    # "memory not found" is also the phrase the existing GUI recognises for an untrained ROI
    return ModelNotFound(f"memory not found for role_id={key.role_id} roi_id={key.roi_id}: fit the model first")


class ModelRegistry:
    """Stored models of every recipe under one data root, and the ones loaded in memory."""

    def __init__(self, data_root: Path, backbone: BackboneInfo, *, precision: str, device: str,
                 cache_size: int, mm_per_px_rtol: float, versions_kept: int = DEFAULT_VERSIONS_KEPT) -> None:
        self.data_root = Path(data_root)
        self._backbone = backbone
        self._precision = precision
        self._device = device
        self._mm_rtol = mm_per_px_rtol
        self._versions_kept = versions_kept
        self._cache: ModelCache[ModelKey, LoadedModel] = ModelCache(cache_size)
        self._locks: dict[ModelKey, tuple[threading.Lock, threading.Lock]] = {}   # (fitting, writing)
        self._locks_guard = threading.Lock()

    # --- naming and places -----------------------------------------------------------------

    def key(self, role_id: object, roi_id: object, recipe_id: str | None = None) -> ModelKey:
        """Validated key. Raises InvalidId / ReservedRecipe."""
        return ModelKey(check_recipe(recipe_id), check_id("role_id", role_id), check_id("roi_id", roi_id))

    def base(self, recipe: str | None) -> Path:
        return self.data_root if recipe is None else self.data_root / "recipes" / recipe

    def store(self, recipe: str | None) -> ModelStore:
        return ModelStore(self.base(recipe), self._versions_kept)

    def datasets(self, recipe: str | None) -> DatasetStore:
        return DatasetStore(self.base(recipe))

    def _model_locks(self, key: ModelKey) -> tuple[threading.Lock, threading.Lock]:
        with self._locks_guard:
            return self._locks.setdefault(key, (threading.Lock(), threading.Lock()))

    @contextmanager
    def fit_guard(self, key: ModelKey) -> Iterator[None]:
        """Held for a whole fit of ``key``. A second fit of the same model is refused at once.

        Raises:
            FitInProgress: a fit of this model is running.
        """
        fitting, writing = self._model_locks(key)
        if not fitting.acquire(blocking=False):
            raise fit_in_progress(key)
        try:
            with writing:             # waits only for a calibration or delete being written
                yield
        finally:
            fitting.release()

    @contextmanager
    def write_guard(self, key: ModelKey) -> Iterator[None]:
        """Held while a calibration or a delete of ``key`` is written (milliseconds). Never waits
        for a fit: a door worker stuck behind a long fit could not serve other ROIs.

        Raises:
            FitInProgress: a fit of this model is running (or starts while this call waits).
        """
        fitting, writing = self._model_locks(key)
        while not writing.acquire(timeout=_WRITE_POLL_S):
            if fitting.locked():
                raise fit_in_progress(key)
        try:
            if fitting.locked():       # a fit has started and waits for this lock: it comes first
                raise fit_in_progress(key)
            yield
        finally:
            writing.release()

    def check_not_fitting(self, key: ModelKey) -> None:
        """Raises FitInProgress when a fit of ``key`` is running (a cheap early check)."""
        if self._model_locks(key)[0].locked():
            raise fit_in_progress(key)

    def recover_all(self) -> None:
        """Finish or undo model swaps a crash cut short, and remove temp files a crash left, in every
        recipe (called once at start-up)."""
        recipes = self.data_root / "recipes"
        bases = [self.data_root, *(sorted(p for p in recipes.iterdir() if p.is_dir()) if recipes.is_dir() else ())]
        for base in bases:
            ModelStore(base, self._versions_kept).recover_all()
            removed = sum(remove_temp_files(folder) for folder in DatasetStore(base).sample_folders())
            if removed:
                log.info("temp_files_removed", base=str(base), count=removed)

    # --- reading ---------------------------------------------------------------------------

    def manifest(self, key: ModelKey) -> dict[str, Any] | None:
        return self.store(key.recipe).read_manifest(key.role_id, key.roi_id)

    def require_manifest(self, key: ModelKey) -> dict[str, Any]:
        manifest = self.manifest(key)
        if manifest is None:
            raise model_not_found(key)
        return manifest

    def previous(self, key: ModelKey) -> Previous | None:
        """The stored model a refit replaces (manifest and calibration), or None when there is none
        or its manifest is damaged (a refit repairs it); a damaged calibration counts as none."""
        store = self.store(key.recipe)
        try:
            manifest = store.read_manifest(key.role_id, key.roi_id)
        except CorruptModel:
            return None
        if manifest is None:
            return None
        try:
            calibration = store.read_calibration(key.role_id, key.roi_id, manifest.get("model_version"))
            stored_calibration(calibration, key.where)
        except CorruptModel as exc:
            log.warning("previous_calibration_unreadable", role_id=key.role_id, roi_id=key.roi_id, error=exc.message)
            calibration = None
        return Previous(manifest, calibration)

    def load(self, key: ModelKey) -> LoadedModel:
        """The model, from the LRU or from disk with every check.

        Raises:
            ModelNotFound, CorruptModel, IncompatibleModel.
        """
        return self._cache.get_or_load(key, lambda: self._read(key))

    def _read(self, key: ModelKey) -> LoadedModel:
        files = self.store(key.recipe).load(key.role_id, key.roi_id)
        where = key.where
        self.check_compatible(files.manifest, where)
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
        stored_calibration(files.calibration, where)
        fitted_precision = files.manifest.get("backbone", {}).get("precision")
        if fitted_precision not in (None, self._precision):
            log.warning("precision_differs", role_id=key.role_id, roi_id=key.roi_id, fitted=fitted_precision,
                        running=self._precision,
                        note="scores may shift slightly against the calibrated threshold; refit to align")
        try:
            return self.serving(files.manifest, emb, index, files.calibration, files.origins)
        except ValueError as exc:     # an index layout this engine does not search
            raise CorruptModel(f"model {where}: coreset.faiss has an unsupported layout; refit the model") from exc

    def serving(self, manifest: dict[str, Any], bank: np.ndarray, index: Any,
                calibration: dict[str, Any] | None = None, origins: np.ndarray | None = None) -> LoadedModel:
        """A model ready to score from a memory in hand (a fit's, before or after it is stored).

        Raises:
            ValueError: an index layout this engine does not search.
        """
        # faiss-cpu has no GPU path: on CUDA the exact torch bank serves instead
        if self._device == "cuda":
            search: MemorySearch | TorchBank = TorchBank(bank, manifest["distance"], self._device)
        else:
            search = searcher(index, bank, manifest["distance"], int(manifest["knn_k"]), manifest.get("index") or {})
        return LoadedModel(manifest, search, calibration, origins)

    def check_compatible(self, manifest: dict[str, Any], where: str) -> None:
        """Raises IncompatibleModel when the model was fitted with another backbone or weights."""
        fitted, info = manifest.get("backbone", {}), self._backbone
        if fitted.get("name") != info.name or fitted.get("weights_sha256") != info.weights_sha256:
            raise IncompatibleModel(
                f"model {where} was fitted with backbone {fitted.get('name')} "
                f"(weights {str(fitted.get('weights_sha256'))[:12]}), but this engine runs {info.name} "
                f"(weights {info.weights_sha256[:12]}): refit it, or start the engine with that backbone"
            )

    def check_mm(self, manifest: dict[str, Any], mm_per_px: float) -> None:
        """Raises MmPerPxMismatch when ``mm_per_px`` is not the scale the model was fitted at."""
        fitted = float(manifest["mm_per_px"])
        if not math.isclose(mm_per_px, fitted, rel_tol=self._mm_rtol, abs_tol=0.0):
            raise MmPerPxMismatch(f"mm_per_px {mm_per_px} differs from the {fitted} the model was fitted with")

    # --- writing and the cache -------------------------------------------------------------

    def save(self, key: ModelKey, manifest: dict[str, Any], bank: np.ndarray, index: Any,
             index_bytes: bytes, calibration: dict[str, Any] | None = None, *, created_by: str = "fit",
             extra: dict[str, bytes] | None = None, origins: np.ndarray | None = None) -> dict[str, Any]:
        """Store a fitted model (with the calibration carried over to it and where its rows came
        from) as a new version and serve it at once; returns the manifest written."""
        written = self.store(key.recipe).save(key.role_id, key.roi_id, manifest, bank, index_bytes, calibration,
                                              created_by=created_by, extra=extra, origins=origins)
        self._cache.put(key, self.serving(written, bank, index, calibration, origins))
        return written

    def invalidate(self, key: ModelKey) -> None:
        self._cache.invalidate(key)

    def loaded_keys(self) -> list[ModelKey]:
        return self._cache.keys()

    def close(self) -> None:
        for key in self._cache.keys():
            self._cache.invalidate(key)

    # --- summaries -------------------------------------------------------------------------

    def state(self, key: ModelKey) -> StateResult:
        manifest = self.manifest(key)
        m = manifest or {}
        calibrated = m.get("threshold") is not None
        return StateResult(
            status="ready" if calibrated else ("fitted" if manifest else "empty"),
            role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe,
            memory_fitted=manifest is not None, calib_present=calibrated,
            model_version=m.get("model_version"), threshold=m.get("threshold"), mm_per_px=m.get("mm_per_px"),
            active_version=version_of(m) if manifest else None,
            token_shape=tuple(m["token_shape"]) if manifest else None, coreset_size=m.get("coreset_size"),
            backbone=m.get("backbone", {}).get("name") if manifest else None,
        )

    def summaries(self, recipe: str | None) -> list[ModelSummary]:
        store, out = self.store(recipe), []
        for role_id, roi_id in store.list():
            try:
                manifest = store.read_manifest(role_id, roi_id)
            except CorruptModel as exc:   # one damaged model must not hide the others
                log.warning("model_skipped", role_id=role_id, roi_id=roi_id, error=exc.message)
                continue
            if manifest is not None:
                out.append(ModelSummary(
                    role_id=role_id, roi_id=roi_id, recipe_id=recipe, model_version=manifest["model_version"],
                    calibrated=manifest.get("threshold") is not None, coreset_size=manifest["coreset_size"],
                    backbone=manifest["backbone"]["name"], created_at=manifest["created_at"],
                ))
        return out

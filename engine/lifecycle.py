"""The model lifecycle part of the engine facade (``Engine.lifecycle``): kept versions and
rollback, adding OK images without a refit, operator feedback, portable archives.

Each public method is a ZeroMQ op (``ipc.protocol.OPS`` entries with ``part="lifecycle"``) and has
a REST route (``http_compat.routes_lifecycle``); like ``Engine``, it checks ids and delegates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import BaseModel

from engine.adding import OkAdder
from engine.archive import read_archive, write_archive
from engine.backbones import BackboneInfo
from engine.calibrator import Calibrator
from engine.errors import ArchiveInvalid, InvalidInput, PayloadTooLarge
from engine.fitting import Fitter, now_utc
from engine.knn import deserialize_index
from engine.models import ModelRegistry, model_not_found
from engine.samples import Samples
from engine.schemas import (
    ActivateResult,
    AddOkResult,
    ExportResult,
    ImportResult,
    MarkResult,
    Shape,
    VersionInfo,
    VersionsResult,
)
from engine.scoring import Scorer
from engine.settings import Settings
from engine.storage import version_of
from engine.threads import on_fresh_thread
from engine.validate import mm_per_px as check_mm_per_px

__all__ = ["Lifecycle"]

ImageInput = bytes | bytearray | memoryview | np.ndarray
ProgressFn = Callable[[str, int, int], None]
_STANDARD_FILES = ("manifest.json", "embeddings.npy", "coreset.faiss", "calibration.json", "sources.npy")
_VERSION_FIELDS = ("manifest_sha256", "files", "version", "version_created_by", "version_created_at")

log = structlog.get_logger("engine.lifecycle")


def _no_progress(stage: str, done: int, total: int) -> None: ...


def _version_info(number: int, manifest: dict[str, Any], active: int | None) -> VersionInfo:
    """One kept version as listed (its manifest as stored: a damaged field reads as absent)."""
    def number_of(name: str) -> int:
        value = manifest.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    threshold = manifest.get("threshold")
    return VersionInfo(
        version=number, active=number == active, created_at=str(manifest.get("version_created_at") or "") or None,
        created_by=str(manifest.get("version_created_by") or "unknown"), model_version=number_of("model_version"),
        n_images=number_of("n_images"), coreset_size=number_of("coreset_size"),
        threshold=float(threshold) if isinstance(threshold, int | float) and not isinstance(threshold, bool) else None)


class Lifecycle:
    """Versions, add_ok, mark_ok / mark_ng, export_model / import_model of the stored models."""

    def __init__(self, settings: Settings, models: ModelRegistry, fitter: Fitter, calibrator: Calibrator,
                 samples: Samples, scorer: Scorer, backbone: BackboneInfo) -> None:
        self._settings = settings
        self._models = models
        self._samples = samples
        self._scorer = scorer
        self._backbone = backbone
        self._adder = OkAdder(settings, models, fitter, calibrator)

    # --- versions --------------------------------------------------------------------------

    def versions(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> VersionsResult:
        """The kept versions of a model, oldest first, and the one served.

        Raises: InvalidId (400), ModelNotFound (404: no model and no kept version)."""
        key = self._models.key(role_id, roi_id, recipe_id)
        active, kept = self._models.store(key.recipe).versions(key.role_id, key.roi_id)
        if active is None and not kept:
            raise model_not_found(key)
        return VersionsResult(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, active_version=active,
                              kept_limit=self._settings.model_versions_kept,
                              versions=tuple(_version_info(n, m, active) for n, m in kept))

    def activate(self, role_id: str, roi_id: str, version: int, *, recipe_id: str | None = None) -> ActivateResult:
        """Serve kept ``version`` (one swap; inferences in flight finish on the model they started with).

        Raises: InvalidId / InvalidInput (400), ModelNotFound, VersionNotFound (404), FitInProgress (409),
            CorruptModel / IncompatibleModel (500: that version is damaged; the served one is untouched),
            StorageError (507)."""
        key = self._models.key(role_id, roi_id, recipe_id)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidInput(f"version must be a version number >= 1, got {version!r}")
        with self._models.write_guard(key):
            store = self._models.store(key.recipe)
            served, kept = store.versions(key.role_id, key.roi_id)     # a damaged served model: None
            if served is None and not kept:
                raise model_not_found(key)
            files, _ = store.read_version(key.role_id, key.roi_id, version)
            self._models.check_compatible(files.manifest, key.where)   # before it is served, not after
            manifest = store.activate(key.role_id, key.roi_id, version)
            self._models.invalidate(key)
        log.info("version_activated", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, version=version)
        return ActivateResult(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, active_version=version,
                              previous_version=served,
                              model_version=int(manifest["model_version"]), threshold=manifest.get("threshold"))

    # --- adding OK images and operator feedback ---------------------------------------------

    def add_ok(self, role_id: str, roi_id: str, images: Sequence[ImageInput], mm_per_px: float | None = None, *,
               operator_id: str | None = None, recipe_id: str | None = None,
               progress: ProgressFn | None = None) -> AddOkResult:
        """Add OK images to a fitted model without a refit, as a new version (docs/lifecycle.md);
        ``mm_per_px``, when given, must be the model's.

        Raises: InvalidInput / InvalidImage (400), ModelNotFound (404), FitInProgress / MmPerPxMismatch
            (409), PayloadTooLarge (413), CorruptModel / IncompatibleModel (500), StorageError (507)."""
        key = self._models.key(role_id, roi_id, recipe_id)
        mm = None if mm_per_px is None else check_mm_per_px(mm_per_px)
        if not images:
            raise InvalidInput("add_ok needs at least one OK image")
        if len(images) > self._settings.max_fit_images:
            raise PayloadTooLarge(f"{len(images)} images exceed the limit of {self._settings.max_fit_images}")
        # torch and faiss work on a thread that ends with it (engine.threads)
        return on_fresh_thread(lambda: self._adder.add(key, images, mm, operator_id=operator_id, sources=None,
                                                       feedback=False, report=progress or _no_progress))

    def mark_ok(self, role_id: str, roi_id: str, image: bytes, mm_per_px: float | None = None,
                shape: Shape | dict[str, Any] | str | None = None, *, operator_id: str | None = None,
                recipe_id: str | None = None) -> MarkResult:
        """An inspection the operator overruled as OK: the image is stored as an OK sample with its
        provenance and added to the model (``add_ok``, keeping the served threshold: one false alarm
        must not move it, and the grown memory only lowers scores)."""
        return on_fresh_thread(lambda: self._mark(role_id, roi_id, "ok", image, mm_per_px, shape, operator_id,
                                                  recipe_id))

    def mark_ng(self, role_id: str, roi_id: str, image: bytes, mm_per_px: float | None = None,
                shape: Shape | dict[str, Any] | str | None = None, *, operator_id: str | None = None,
                recipe_id: str | None = None) -> MarkResult:
        """A missed defect: the image is stored as an NG sample with its provenance, for the next
        calibration (``calibrate_dataset``); the model is unchanged."""
        return on_fresh_thread(lambda: self._mark(role_id, roi_id, "ng", image, mm_per_px, shape, operator_id,
                                                  recipe_id))

    def _mark(self, role_id: str, roi_id: str, label: Literal["ok", "ng"], image: bytes, mm_per_px: float | None,
              shape: object, operator_id: str | None, recipe_id: str | None) -> MarkResult:
        """Raises: InvalidInput / InvalidImage / InvalidShape (400), ModelNotFound (404),
        MmPerPxMismatch / FitInProgress (409), PayloadTooLarge (413)."""
        key = self._models.key(role_id, roi_id, recipe_id)
        if not isinstance(image, bytes | bytearray | memoryview):
            raise InvalidInput("the marked image must be an encoded image file (PNG, JPEG, BMP, TIFF)")
        # request faults before the model's state (Scorer.prepare), unless the scale must come from the model
        mm = self._models.load(key).manifest["mm_per_px"] if mm_per_px is None else mm_per_px
        roi, scored = self._scorer.score_image(key, mm, image, shape, "none")
        model = roi.model
        marked = {"at": now_utc(), "label": label, "operator_id": operator_id, "score": scored.score,
                  "threshold": scored.threshold, "decision": scored.decision, "model_version": scored.model_version,
                  "version": version_of(model.manifest)}
        if label == "ok":
            self._models.check_not_fitting(key)      # 409 before anything is stored
        meta: dict[str, Any] = {"mm_per_px": roi.mm_per_px, "marked": marked}
        if shape is not None:
            meta["shape_json"] = shape if isinstance(shape, str) else json.dumps(
                shape.model_dump() if isinstance(shape, BaseModel) else shape)
        sample = self._samples.upload(key, label, bytes(image), None, meta)
        added = None
        if label == "ok":
            added = self._adder.add(key, [bytes(image)], roi.mm_per_px, operator_id=operator_id,
                                    sources=[sample.filename],
                                    feedback=True, report=_no_progress)
        log.info("inspection_marked", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, label=label,
                 filename=sample.filename, score=scored.score, threshold=scored.threshold)
        return MarkResult(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, label=label,
                          filename=sample.filename, score=scored.score, threshold=scored.threshold,
                          decision=scored.decision, marked_version=marked["version"], added=added)

    # --- archives --------------------------------------------------------------------------

    def export_model(self, role_id: str, roi_id: str, version: int | None = None, *,
                     recipe_id: str | None = None) -> ExportResult:
        """One zip file holding a kept version (default: the served one) and its checksums.

        Raises: InvalidId / InvalidInput (400), ModelNotFound, VersionNotFound (404), CorruptModel (500)."""
        key = self._models.key(role_id, roi_id, recipe_id)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise InvalidInput(f"version must be a version number >= 1, got {version!r}")
        store = self._models.store(key.recipe)
        active, _ = store.versions(key.role_id, key.roi_id)
        number = active if version is None else version
        if number is None:
            raise model_not_found(key)
        _, files = store.read_version(key.role_id, key.roi_id, number)
        origin = {"role_id": key.role_id, "roi_id": key.roi_id, "recipe_id": key.recipe, "version": number,
                  "exported_at": now_utc()}
        archive = write_archive(files, origin, self._backbone)
        return ExportResult(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, version=number,
                            filename=f"{key.role_id}_{key.roi_id}_v{number}.zip",
                            sha256=hashlib.sha256(archive).hexdigest(), archive=archive)

    def import_model(self, role_id: str, roi_id: str, archive: bytes, *, recipe_id: str | None = None) -> ImportResult:
        """Install an exported archive, verified first (docs/lifecycle.md), as a new served version.

        Raises: InvalidId (400), ArchiveInvalid (400: nothing installed), FitInProgress (409),
            PayloadTooLarge (413), StorageError (507)."""
        key = self._models.key(role_id, roi_id, recipe_id)
        if not isinstance(archive, bytes | bytearray | memoryview):
            raise InvalidInput("archive must be the bytes of an exported model archive")
        limit = self._settings.max_image_bytes * 32
        if len(archive) > limit:
            raise PayloadTooLarge(f"the archive is larger than {limit} bytes")
        found = read_archive(bytes(archive), self._backbone, limit)
        model = found.model
        try:
            index = deserialize_index(model.index_bytes)
        except RuntimeError as exc:   # faiss's error for bytes that are no index
            raise ArchiveInvalid("coreset.faiss is not a faiss index") from exc
        emb = model.embeddings
        if emb.ndim != 2 or index.ntotal != len(emb) or index.d != emb.shape[1]:
            raise ArchiveInvalid("index and embeddings disagree")
        extra = {name: blob for name, blob in found.files.items() if name not in _STANDARD_FILES}
        with self._models.fit_guard(key):
            store = self._models.store(key.recipe)
            number = store.next_model_version(key.role_id, key.roi_id)
            manifest = {name: value for name, value in model.manifest.items() if name not in _VERSION_FIELDS}
            manifest.update(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, model_version=number,
                            imported={"at": now_utc(), "origin": found.info.get("origin")})
            calibration = None if model.calibration is None else {**model.calibration, "model_version": number}
            written = self._models.save(key, manifest, model.embeddings, index, model.index_bytes, calibration,
                                        created_by="import", extra=extra, origins=model.origins)
        log.info("model_imported", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe,
                 version=version_of(written), origin=found.info.get("origin"))
        return ImportResult(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe,
                            version=version_of(written), model_version=number, threshold=written.get("threshold"),
                            origin=found.info.get("origin") or {})

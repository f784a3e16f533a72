"""The observability part of the engine facade (``Engine.monitor``): the inspection history,
the drift state of every ROI, and the normal patches region explanations point to.

Its public methods are ZeroMQ ops (``ipc.protocol.OPS`` entries with ``part="monitor"``): op name
= method name, args = keyword args. ``record`` is the scorer's recorder: it runs on the request's
thread, queues the record (the history's writer thread does the I/O) and updates the drift
window; it never raises. See docs/observability.md.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import structlog

from engine.drift_watch import DriftChange, DriftWatch, RoiKey
from engine.errors import ImageNotKept, InvalidInput, SampleNotFound
from engine.explain import patch_box
from engine.history import InspectionHistory, InspectionRecord
from engine.models import ModelKey, ModelRegistry
from engine.samples import Samples
from engine.schemas import DriftResult, ExplainPatchResult, HistoryResult
from engine.scoring import Inspection, Scorer
from engine.settings import Settings

__all__ = ["DriftListener", "Monitor"]

DriftListener = Callable[[dict[str, Any]], None]
Decision = Literal["ok", "ng"]
_THUMB_SIDE = 64
_MAX_LIMIT = 1_000   # a page; older records are paged with `until` (a page stays well under 50 ms)
_SEED_WINDOWS = 5          # a ROI's window is seeded from up to this many windows of history

log = structlog.get_logger("engine.monitor")


def _roi_key(key: ModelKey) -> RoiKey:
    return key.recipe or "", key.role_id, key.roi_id


def _reference(manifest: dict[str, Any]) -> list[float]:
    """The fit's hold-out OK scores: how unseen OK parts scored."""
    return [float(v) for v in (manifest.get("ok_scores") or {}).get("values") or []]


def _thumbnails(inspection: Inspection) -> tuple[np.ndarray, np.ndarray]:
    """(image BGR, heatmap grey) at most ``_THUMB_SIDE`` pixels a side, the ROI's aspect kept."""
    height, width = inspection.result.image_shape
    scale = _THUMB_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = inspection.roi.resized
    # halvings while the image stays at least twice the thumbnail, then a linear step of less than
    # two: OpenCV's area resize at a non-integer ratio is slow (in the request, 224 -> 64 px 0.38 ms,
    # 416 -> 208 -> 64 px 0.55 ms; these steps 0.13 and 0.29 ms). A thumbnail of an elongated ROI is
    # still far below the (square) image on its short side: an area step there.
    while min(image.shape[:2]) >= 2 * max(size):
        image = cv2.pyrDown(image)
    linear = image.shape[0] < 2 * size[1] and image.shape[1] < 2 * size[0]
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if linear else cv2.INTER_AREA)
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    heat = cv2.resize(inspection.amap, size, interpolation=cv2.INTER_LINEAR)
    grey = np.clip(heat * (128.0 / inspection.result.heatmap_scale), 0, 255).astype(np.uint8)
    return image, grey


class Monitor:
    """History, drift and explanation crops over the engine's models and stored samples; it
    becomes ``scorer``'s recorder."""

    def __init__(self, settings: Settings, models: ModelRegistry, samples: Samples, scorer: Scorer) -> None:
        self._settings = settings
        self._models = models
        self._samples = samples
        self._decode = scorer.decode_held
        self._history = self._open_history(settings, models.data_root / "history.sqlite")
        self._watch = DriftWatch(settings.drift_window)
        self._listeners: list[DriftListener] = []
        scorer.recorder = self.record

    @staticmethod
    def _open_history(settings: Settings, path: Path) -> InspectionHistory | None:
        """The history, or None when it is off or its file cannot be opened (the engine serves on)."""
        if not settings.history_enabled:
            return None
        try:
            return InspectionHistory(path, max_per_roi=settings.history_max_per_roi,
                                     flush_interval_s=settings.history_flush_interval_s)
        except (sqlite3.Error, OSError) as exc:
            log.error("history_unavailable", path=str(path), error=str(exc))
            return None

    def close(self) -> None:
        if self._history is not None:
            self._history.close()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the records queued so far are written."""
        if self._history is not None:
            self._history.flush(timeout)

    def subscribe(self, listener: DriftListener) -> Callable[[], None]:
        """Call ``listener(event)`` on every drift state change; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # --- recording (the scorer's recorder) ---------------------------------------------------

    def record(self, inspection: Inspection) -> None:
        if self._history is None:
            return
        try:
            self._record(inspection)
        except Exception:   # an inspection never fails for its record
            log.exception("inspection_not_recorded")

    def _record(self, inspection: Inspection) -> None:
        result, key = inspection.result, inspection.roi.key
        context = structlog.contextvars.get_contextvars()
        request_id = context.get("request_id")
        image, heat = _thumbnails(inspection) if self._settings.history_thumbnails else (None, None)
        regions = result.regions
        assert self._history is not None
        self._history.record(InspectionRecord(
            time=time.time(), recipe_id=key.recipe or "", role_id=key.role_id, roi_id=key.roi_id,
            model_version=result.model_version, score=result.score, threshold=result.threshold,
            decision=result.decision, n_regions=len(regions), area_mm2=float(sum(r.area_mm2 for r in regions)),
            max_area_mm2=float(max((r.area_mm2 for r in regions), default=0.0)),
            request_id=None if request_id is None else str(request_id), operator_id=inspection.operator_id,
            boxes=";".join(",".join(map(str, r.bbox)) for r in regions), image_h=result.image_shape[0],
            image_w=result.image_shape[1], thumbnail=image, heatmap=heat))
        roi = _roi_key(key)
        reference = _reference(inspection.roi.model.manifest)
        if not self._watch.known(roi, result.model_version):
            self._seed(roi, result.model_version, reference)
        change = self._watch.observe(roi, result.model_version, reference, result.score, result.decision)
        if change is not None:
            self._announce(change, request_id)

    def _seed(self, roi: RoiKey, version: int, reference: list[float]) -> None:
        """The ROI's window from the history (once per ROI and model version in this process)."""
        assert self._history is not None
        past = self._history.query(roi[1], roi[2], roi[0] or None, limit=_SEED_WINDOWS * self._watch.window)
        self._watch.seed(roi, version, reference,
                         [(r.score, r.decision) for r in reversed(past) if r.model_version == version])

    def _announce(self, change: DriftChange, request_id: object) -> None:
        report = change.report
        event = {"event": "drift_state", "recipe_id": change.key[0] or None, "role_id": change.key[1],
                 "roi_id": change.key[2], "model_version": change.model_version, "previous": change.previous,
                 "state": report.state, "reason": report.reason, "ks_d": report.ks_d, "ks_p": report.ks_p,
                 "n_window": report.n_window, "window": self._watch.window, "time": change.time,
                 "request_id": request_id}
        level = log.warning if report.state == "alarm" else log.info
        level("drift_state_changed", **{k: v for k, v in event.items() if k not in ("event", "request_id")})
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("drift_listener_failed")

    # --- ops ---------------------------------------------------------------------------------

    def history(
        self, role_id: str, roi_id: str, since: float | None = None, until: float | None = None,
        decision: Decision | None = None, limit: int = 100, *, thumbnails: bool = False,
        recipe_id: str | None = None,
    ) -> HistoryResult:
        """The ROI's last inspections, newest first: in [since, until] (epoch seconds), of one
        ``decision``, at most ``limit`` (1..1000); ``thumbnails`` adds the 64-px thumbnails.

        Raises: InvalidInput / InvalidId (400)."""
        key = self._models.key(role_id, roi_id, recipe_id)
        if not 1 <= limit <= _MAX_LIMIT:
            raise InvalidInput(f"limit must be 1..{_MAX_LIMIT}, got {limit}")
        if decision not in (None, "ok", "ng"):
            raise InvalidInput(f"decision must be ok or ng, got {decision!r}")
        for name, value in (("since", since), ("until", until)):
            if value is not None and not np.isfinite(value):
                raise InvalidInput(f"{name} must be a finite number of seconds since the epoch")
        records = [] if self._history is None else self._history.query(
            key.role_id, key.roi_id, key.recipe, since=since, until=until, decision=decision, limit=limit,
            thumbnails=thumbnails)
        items = tuple(r.entry() for r in records)
        return HistoryResult(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, n=len(items),
                             items=items, dropped=self._history.dropped if self._history else 0,
                             enabled=self._history is not None)

    def drift(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> DriftResult:
        """The ROI's drift state against its current model's OK scores.

        Raises: InvalidId (400), ModelNotFound (404)."""
        key = self._models.key(role_id, roi_id, recipe_id)
        manifest = self._models.require_manifest(key)
        version, reference = int(manifest["model_version"]), _reference(manifest)
        roi = _roi_key(key)
        if self._history is not None and not self._watch.known(roi, version):
            self._seed(roi, version, reference)
        watch = self._watch.current(roi)
        report = watch.report if watch is not None and watch.model_version == version else None
        baseline = watch.baseline if report is not None and watch is not None else None
        rule = {name: float(value) for name, value in asdict(self._watch.rule).items()}
        reason = ("inspection history is off or unavailable (see the log)" if self._history is None else
                  "the model has no hold-out OK scores (fitted on one image)" if not reference else
                  report.reason if report is not None else "no inspection of this model yet")
        return DriftResult(
            role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, model_version=version,
            state=report.state if report else "ok", reason=reason, ks_d=report.ks_d if report else None,
            ks_p=report.ks_p if report else None, n_window=report.n_window if report else 0,
            window=self._watch.window, reference="baseline" if baseline else "fit",
            n_reference=len(baseline or reference), median_window=report.median_window if report else None,
            median_reference=float(np.median(baseline or reference)) if reference else None,
            ng_rate_window=report.ng_rate_window if report else None,
            ng_rate_history=report.ng_rate_history if report else None,
            changed_at=watch.changed_at if report and watch else None, rule=rule)

    def explain_patch(self, role_id: str, roi_id: str, image_index: int, patch_row: int, patch_col: int, *,
                      recipe_id: str | None = None) -> ExplainPatchResult:
        """The normal patch an explanation names (``image_index``, ``source_patch``) as a PNG crop of
        its stored training sample, with one patch of context around it.

        Raises: InvalidInput (400), ModelNotFound (404), ImageNotKept (404: the fit's images were
        sent with the request, not stored, or the sample was deleted)."""
        key = self._models.key(role_id, roi_id, recipe_id)
        manifest = self._models.require_manifest(key)
        training = manifest.get("training_images") or {}
        names, grid = training.get("sources"), tuple(int(v) for v in manifest["token_shape"])
        n_images = int(manifest.get("n_images", 0))
        if not 0 <= image_index < n_images or not (0 <= patch_row < grid[0] and 0 <= patch_col < grid[1]):
            raise InvalidInput(f"image_index must be 0..{n_images - 1} and the patch within {grid[0]}x{grid[1]}")
        if not names or image_index >= len(names):
            raise ImageNotKept(f"model {key.where} was fitted from images sent with the request; the engine did "
                               "not keep them (fit with use_dataset to keep explanations' images)")
        try:
            rgb = self._decode(self._samples.read(key, "ok", names[image_index]), "training image")
        except SampleNotFound as exc:
            raise ImageNotKept(f"training image {names[image_index]!r} of model {key.where} was deleted "
                               "from the dataset") from exc
        height, width = rgb.shape[:2]
        box = patch_box(patch_row, patch_col, grid, (height, width))
        x0, y0 = max(0, box[0] - box[2]), max(0, box[1] - box[3])
        x1, y1 = min(width, box[0] + 2 * box[2]), min(height, box[1] + 2 * box[3])
        ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2BGR))
        assert ok, "PNG encoding of a crop failed"
        return ExplainPatchResult(
            role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe,
            model_version=int(manifest["model_version"]), image_index=image_index, source=names[image_index],
            source_patch=(patch_row, patch_col), source_box=box, crop_box=(x0, y0, x1 - x0, y1 - y0),
            png=png.tobytes())


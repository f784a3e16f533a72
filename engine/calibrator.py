"""Setting a model's decision threshold: from scores a client sends, or from the stored samples.

The rules themselves are pure functions in ``engine.calibration``; this module checks the request,
gathers the scores and writes ``calibration.json`` with the manifest's mirror of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import structlog

from engine.calibration import Calibration, calibrate
from engine.errors import EngineError, InvalidInput
from engine.fitting import now_utc
from engine.models import LoadedModel, ModelKey, ModelRegistry
from engine.samples import Samples
from engine.schemas import CalibrationResult
from engine.settings import Settings
from engine.validate import non_negative_number, percentile_fraction, positive_number

__all__ = ["Calibrator"]

ProgressFn = Callable[[str, int, int], None]
log = structlog.get_logger("engine.calibrator")


class Calibrator:
    """Writes calibrations; serialized with fits of the same model by the registry's lock."""

    def __init__(self, settings: Settings, models: ModelRegistry, samples: Samples) -> None:
        self._settings = settings
        self._models = models
        self._samples = samples

    def from_scores(self, key: ModelKey, mm_per_px: object, ok_scores: Sequence[float],
                    ng_scores: Sequence[float] | None, score_percentile: float | None,
                    area_mm2_thr: float | None) -> CalibrationResult:
        """Seed §5: midpoint of p99(OK) and p5(NG), or an OK quantile times the safety factor."""
        s = self._settings
        mm = positive_number(mm_per_px)
        percentile = s.calibration_percentile if score_percentile is None else score_percentile
        percentile_fraction(percentile)
        area = non_negative_number(s.default_area_mm2_thr if area_mm2_thr is None else area_mm2_thr, "area_mm2_thr")
        with self._models.lock(key):
            manifest = self._models.require_manifest(key)
            self._models.check_mm(manifest, mm)
            result = calibrate(ok_scores, ng_scores, percentile, s.calibration_safety_factor)
            calibration = _record(result, area, len(ok_scores), len(ng_scores or []), manifest, mm)
            manifest = {**manifest, "threshold": result.threshold, "area_mm2_thr": area,
                        "calibrated_at": calibration["created_at"]}
            self._models.store(key.recipe).write_calibration(key.role_id, key.roi_id, calibration, manifest)
            self._models.invalidate(key)
        log.info("calibrated", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe,
                 threshold=result.threshold, method=result.method, warning=result.warning)
        return CalibrationResult(
            role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, threshold=result.threshold,
            method=result.method, score_percentile=result.score_percentile, area_mm2_thr=area,
            safety_factor=result.safety_factor, ok_mean=result.ok_mean, ng_mean=result.ng_mean,
            ok_p99=result.ok_p99, ng_p5=result.ng_p5, n_ok=len(ok_scores), n_ng=len(ng_scores or []),
            warning=result.warning, model_version=manifest["model_version"], mm_per_px=mm,
        )

    def from_samples(self, key: ModelKey, default_mm_per_px: float | None, score_percentile: float | None,
                     area_mm2_thr: float | None, report: ProgressFn) -> CalibrationResult:
        """Calibrate from the stored samples: NG samples are scored now; OK samples that trained the
        model use their 5-fold hold-out scores from the fit (scored against a memory that contains
        them they would score near zero); other OK samples are scored now.

        Raises:
            ModelNotFound, InvalidInput (no OK score available).
        """
        model = self._models.load(key)
        manifest = model.manifest
        if default_mm_per_px is not None:
            positive_number(default_mm_per_px, "default_mm_per_px")
        ok_scores, ng_scores = self._sample_scores(key, model, default_mm_per_px, report)
        mm = manifest["mm_per_px"] if default_mm_per_px is None else default_mm_per_px
        return self.from_scores(key, mm, ok_scores, ng_scores or None, score_percentile, area_mm2_thr)

    def _sample_scores(self, key: ModelKey, model: LoadedModel, default_mm_per_px: float | None,
                       report: ProgressFn) -> tuple[list[float], list[float]]:
        trained = model.manifest.get("ok_scores", {})
        trained_sources = set(trained.get("sources") or [])
        held_out = dict(zip(trained.get("sources") or [], trained.get("values") or [], strict=False))
        items = self._samples.items(key)
        ok_scores: list[float] = []
        ng_scores: list[float] = []
        for done, (label, name) in enumerate(items, start=1):
            if label == "ok" and name in held_out:
                ok_scores.append(float(held_out[name]))
            elif not (label == "ok" and name in trained_sources):
                try:
                    result = self._samples.score(key, model, label, name, False, default_mm_per_px)
                except EngineError as exc:
                    log.warning("calibration_sample_skipped", role_id=key.role_id, roi_id=key.roi_id,
                                filename=name, error=exc.code)
                    continue
                (ok_scores if label == "ok" else ng_scores).append(result.score)
            report("score_samples", done, len(items))
        if not ok_scores and not trained_sources:
            ok_scores = [float(v) for v in trained.get("values") or []]
        if not ok_scores:
            raise InvalidInput(f"no OK score available for {key.where}: upload OK samples or refit")
        return ok_scores, ng_scores


def _record(result: Calibration, area: float, n_ok: int, n_ng: int, manifest: dict[str, Any],
            mm_per_px: float) -> dict[str, Any]:
    """The calibration.json contents."""
    return {
        "threshold": result.threshold, "method": result.method, "score_percentile": result.score_percentile,
        "safety_factor": result.safety_factor, "area_mm2_thr": area, "ok_mean": result.ok_mean,
        "ng_mean": result.ng_mean, "ok_p99": result.ok_p99, "ng_p5": result.ng_p5,
        "n_ok": n_ok, "n_ng": n_ng, "warning": result.warning,
        "model_version": manifest["model_version"], "mm_per_px": mm_per_px, "created_at": now_utc(),
    }

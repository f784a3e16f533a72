"""Setting a model's decision threshold: from scores a client sends, from the stored samples, or
carried over a refit by re-deriving it on the new memory.

The rules themselves are pure functions in ``engine.calibration``; this module checks the request,
gathers the scores and writes ``calibration.json`` with the manifest's mirror of it (one swap,
``ModelStore.write_calibration``). Request faults are reported before the model's state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from engine.calibration import Calibration, calibrate
from engine.errors import InvalidInput, ModelChanged, PayloadTooLarge
from engine.fitting import now_utc
from engine.models import LoadedModel, ModelKey, ModelRegistry, Previous
from engine.samples import Samples
from engine.schemas import CalibrationResult, RefitCalibration
from engine.settings import Settings
from engine.validate import LABELS, mm_per_px as check_mm_per_px, non_negative_number, percentile_fraction

__all__ = ["Calibrator", "Carry", "calibration_record", "with_calibration"]

ProgressFn = Callable[[str, int, int], None]
Source = Literal["scores", "dataset"]
log = structlog.get_logger("engine.calibrator")


class Calibrator:
    """Writes calibrations; a calibration never waits for a fit of its model (409 fit_in_progress)."""

    def __init__(self, settings: Settings, models: ModelRegistry, samples: Samples) -> None:
        self._settings = settings
        self._models = models
        self._samples = samples

    def from_scores(self, key: ModelKey, mm_per_px: object, ok_scores: Sequence[float],
                    ng_scores: Sequence[float] | None, score_percentile: float | None,
                    area_mm2_thr: float | None, *, source: Source = "scores",
                    expected_version: int | None = None) -> CalibrationResult:
        """Seed §5: midpoint of p99(OK) and p5(NG), or an OK quantile times the safety factor.

        Raises (request faults first): InvalidInput (400), ModelNotFound (404), FitInProgress,
        ModelChanged (the model is no longer ``expected_version``), MmPerPxMismatch (409).
        """
        s = self._settings
        mm = check_mm_per_px(mm_per_px)
        for name, scores in (("ok_scores", ok_scores), ("ng_scores", ng_scores or ())):
            if len(scores) > s.max_scores:
                raise PayloadTooLarge(f"{name} holds {len(scores)} scores; the limit is {s.max_scores}")
        percentile, area = self._rule_values(score_percentile, area_mm2_thr)
        result = calibrate(ok_scores, ng_scores, percentile, s.calibration_safety_factor)
        n_ok, n_ng = len(ok_scores), len(ng_scores or [])
        with self._models.write_guard(key):
            manifest = self._models.require_manifest(key)
            version = int(manifest["model_version"])
            if expected_version is not None and version != expected_version:
                raise ModelChanged(f"model {key.where} was refitted (version {expected_version} -> {version}) "
                                   "while its samples were being scored; calibrate again")
            self._models.check_mm(manifest, mm)
            record = calibration_record(result, area, n_ok, n_ng, version, mm, source)
            manifest = with_calibration(manifest, record)
            self._models.store(key.recipe).write_calibration(key.role_id, key.roi_id, record, manifest)
            self._models.invalidate(key)
        log.info("calibrated", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, source=source,
                 threshold=result.threshold, method=result.method, warning=result.warning)
        return CalibrationResult(
            role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, threshold=result.threshold,
            method=result.method, source=source, score_percentile=result.score_percentile, area_mm2_thr=area,
            safety_factor=result.safety_factor, ok_mean=result.ok_mean, ng_mean=result.ng_mean,
            ok_p99=result.ok_p99, ng_p5=result.ng_p5, n_ok=n_ok, n_ng=n_ng, warning=result.warning,
            model_version=version, mm_per_px=mm,
        )

    def _rule_values(self, score_percentile: float | None, area_mm2_thr: float | None) -> tuple[float, float]:
        """(percentile, area threshold) of a request, the settings' defaults where absent.

        Raises: InvalidInput."""
        s = self._settings
        percentile = s.calibration_percentile if score_percentile is None else score_percentile
        percentile_fraction(percentile)
        area = non_negative_number(s.default_area_mm2_thr if area_mm2_thr is None else area_mm2_thr, "area_mm2_thr")
        return percentile, area

    def from_samples(self, key: ModelKey, default_mm_per_px: float | None, score_percentile: float | None,
                     area_mm2_thr: float | None, report: ProgressFn) -> CalibrationResult:
        """Calibrate from the stored samples: NG samples are scored now; OK samples that trained the
        model use their 5-fold hold-out scores from the fit (scored against a memory that contains
        them they would score near zero); other OK samples are scored now. The scoring runs on the
        model loaded at the start; the result is written only if that is still the stored version.

        Raises:
            InvalidInput (no OK score available, bad values), ModelNotFound, FitInProgress,
            ModelChanged, MmPerPxMismatch.
        """
        if default_mm_per_px is not None:
            check_mm_per_px(default_mm_per_px, "default_mm_per_px")
        self._rule_values(score_percentile, area_mm2_thr)
        self._models.check_not_fitting(key)
        model = self._models.load(key)
        manifest = model.manifest
        ok_scores, ng_scores = self._sample_scores(key, model, default_mm_per_px, report)
        mm = manifest["mm_per_px"] if default_mm_per_px is None else default_mm_per_px
        return self.from_scores(key, mm, ok_scores, ng_scores or None, score_percentile, area_mm2_thr,
                                source="dataset", expected_version=int(manifest["model_version"]))

    def _sample_scores(self, key: ModelKey, model: LoadedModel, default_mm_per_px: float | None,
                       report: ProgressFn) -> tuple[list[float], list[float]]:
        trained = model.manifest.get("ok_scores", {})
        sources = trained.get("sources") or []
        held_out = dict(zip(sources, trained.get("values") or [], strict=False))
        ok_scores = [float(held_out[name]) for label, name in self._samples.items(key)
                     if label == "ok" and name in held_out]
        scored = self._samples.score_stored(key, model, LABELS, set(sources), report, "score_samples",
                                            default_mm_per_px)
        ok_scores += scored["ok"]
        if not ok_scores and not sources:
            ok_scores = [float(v) for v in trained.get("values") or []]
        if not ok_scores:
            raise InvalidInput(f"no OK score available for {key.where}: upload OK samples or refit")
        return ok_scores, scored["ng"]

    def carry(self, key: ModelKey, previous: Previous | None, model: LoadedModel, enabled: bool,
              report: ProgressFn) -> Carry:
        """The calibration a refit gives its new ``model`` (not stored yet): the rule of the last
        calibration re-applied to scores against the new memory (docs/engine.md, "Refit")."""
        if previous is None or previous.calibration is None:
            return Carry(model.manifest, None, None)
        last = previous.calibration
        source: Source = "dataset" if last.get("source") == "dataset" else "scores"
        midpoint = last.get("method") == "ok_ng_midpoint"
        refused = {"carried": False, "rule": None, "threshold": None, "previous_threshold": float(last["threshold"]),
                   "previous_rule": last.get("method"), "source": source, "n_ok": 0, "n_ng": 0, "warning": None}
        if not enabled:
            return _uncalibrated(model, RefitCalibration(
                **refused, reason="allow_refit_recalibration is false: calibrate again"))
        labels = [*(["ok"] if source == "dataset" else []), *(["ng"] if source == "dataset" or midpoint else [])]
        trained = model.manifest["ok_scores"]
        scored = self._samples.score_stored(key, model, labels, set(trained.get("sources") or []), report,
                                            "recalibrate")
        ok = [float(v) for v in trained["values"]] + scored.get("ok", [])
        ng = scored.get("ng", [])
        if not ok:
            return _uncalibrated(model, RefitCalibration(
                **refused, reason="no OK score to re-derive the threshold from (fitted on one image): calibrate again"))
        s = self._settings
        try:
            result = calibrate(ok, ng or None, last.get("score_percentile") or s.calibration_percentile,
                               last.get("safety_factor") or s.calibration_safety_factor)
        except InvalidInput as exc:   # an edited calibration.json: refit anyway, uncalibrated
            return _uncalibrated(model, RefitCalibration(
                **refused, reason=f"the last calibration's rule cannot be applied ({exc.message}): calibrate again"))
        reason = None
        if midpoint and not ng:
            reason = "the last calibration used NG scores and no stored NG sample could be scored: OK-only rule"
        info = RefitCalibration(**{**refused, "carried": True, "rule": result.method, "threshold": result.threshold,
                                   "n_ok": len(ok), "n_ng": len(ng), "warning": result.warning}, reason=reason)
        record = calibration_record(result, float(last["area_mm2_thr"]), len(ok), len(ng),
                                    int(model.manifest["model_version"]), float(model.manifest["mm_per_px"]), source)
        record["carried"] = {"from_model_version": previous.version, "previous_threshold": info.previous_threshold,
                             "reason": reason}
        log.info("calibration_carried", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe,
                 rule=result.method, threshold=result.threshold, previous_threshold=info.previous_threshold)
        return Carry(with_calibration(model.manifest, record, info), record, info)


@dataclass(frozen=True)
class Carry:
    """What a refit stores: its manifest (with the calibration mirror), the calibration.json
    contents (None: uncalibrated), and what the fit reply says about it (None: nothing to carry)."""

    manifest: dict[str, Any]
    record: dict[str, Any] | None
    info: RefitCalibration | None


def _uncalibrated(model: LoadedModel, info: RefitCalibration) -> Carry:
    return Carry(with_calibration(model.manifest, None, info), None, info)


def calibration_record(result: Calibration, area: float, n_ok: int, n_ng: int, model_version: int,
                       mm_per_px: float, source: Source) -> dict[str, Any]:
    """The calibration.json contents."""
    return {
        "threshold": result.threshold, "method": result.method, "source": source,
        "score_percentile": result.score_percentile, "safety_factor": result.safety_factor,
        "area_mm2_thr": area, "ok_mean": result.ok_mean, "ng_mean": result.ng_mean, "ok_p99": result.ok_p99,
        "ng_p5": result.ng_p5, "n_ok": n_ok, "n_ng": n_ng, "warning": result.warning,
        "model_version": model_version, "mm_per_px": mm_per_px, "created_at": now_utc(),
    }


def with_calibration(manifest: dict[str, Any], record: dict[str, Any] | None,
                     refit: RefitCalibration | None = None) -> dict[str, Any]:
    """The manifest with its mirror of a calibration: ``threshold``, ``area_mm2_thr`` and a
    ``calibration`` summary (how the threshold was obtained; for a refit, what it carried over)."""
    summary: dict[str, Any] = {"carried": False}
    if record is not None:
        summary = {"rule": record["method"], "source": record["source"], "threshold": record["threshold"],
                   "carried": "carried" in record, "created_at": record["created_at"]}
    if refit is not None:
        summary.update(previous_threshold=refit.previous_threshold, previous_rule=refit.previous_rule,
                       reason=refit.reason)
    return {**manifest, "threshold": None if record is None else record["threshold"],
            "area_mm2_thr": None if record is None else record["area_mm2_thr"],
            "calibrated_at": None if record is None else record["created_at"], "calibration": summary}

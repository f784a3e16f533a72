"""A refit keeps a calibrated station calibrated, and calibrations never mix model versions.

A real EfficientNet-Lite0 at 64 px on synthetic parts (``tests.support.part_png``: a fixed texture
with sensor noise; NG parts carry a red disc), so every fit takes a second or two. Checked: the
carried threshold is exactly what the last calibration's rule gives on scores against the new
memory; the fit reply, the
manifest, ``state`` and ``infer`` agree on it; ``allow_refit_recalibration`` (setting and per-call
flag) keeps the old behaviour; a calibration scored on one version is refused on another (409
``model_changed``); calibrations, deletes and second fits never wait for a running fit (409
``fit_in_progress``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.api import Engine
from engine.calibration import calibrate
from engine.errors import CalibrationMissing, FitInProgress, ModelChanged
from engine.storage import ModelStore
from tests.support import door_settings, part_png

ROLE, MM = "cam", 0.1


def part(seed: int, defect: bool = False) -> bytes:
    return part_png(seed, defect)


def upload(engine: Engine, roi: str, label: str, seeds: range) -> None:
    for seed in seeds:
        engine.dataset_upload(ROLE, roi, label, part(seed, label == "ng"), f"{label}_{seed}.png",
                              {"mm_per_px": MM, "label": label})


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(door_settings(tmp_path_factory.mktemp("refit")).engine)
    yield eng
    eng.close()


def _agree(engine: Engine, roi: str, threshold: float) -> None:
    """state, infer, the manifest and calibration.json all hold ``threshold``."""
    state = engine.state(ROLE, roi)
    assert state.calib_present and state.threshold == pytest.approx(threshold, abs=0)
    assert engine.infer(ROLE, roi, MM, part(999), heatmap="none").threshold == pytest.approx(threshold, abs=0)
    folder = ModelStore(engine.data_root).model_dir(ROLE, roi)
    assert json.loads((folder / "calibration.json").read_text())["threshold"] == threshold
    assert engine.manifest(ROLE, roi)["threshold"] == threshold


def test_refit_carries_the_ok_only_rule_of_client_scores(engine: Engine) -> None:
    first = engine.fit_ok(ROLE, "okonly", MM, [part(s) for s in range(6)])
    assert first.calibration is None                       # nothing to carry on a first fit
    cal = engine.calibrate_ng(ROLE, "okonly", MM, list(first.ok_scores), None, 99)
    refit = engine.fit_ok(ROLE, "okonly", MM, [part(s) for s in range(10, 16)])
    carried = refit.calibration
    assert carried is not None and carried.carried and carried.rule == "ok_percentile"
    assert carried.previous_threshold == cal.threshold and carried.source == "scores"
    # exactly the last rule (p99 of OK x 1.1) applied to the new fit's hold-out scores
    expected = calibrate(list(refit.ok_scores), None, 0.99, cal.safety_factor or 0).threshold
    assert carried.threshold == pytest.approx(expected, rel=1e-12) and carried.n_ok == len(refit.ok_scores)
    assert carried.threshold != cal.threshold
    _agree(engine, "okonly", carried.threshold)
    manifest = engine.manifest(ROLE, "okonly")
    assert manifest["model_version"] == 2
    assert manifest["calibration"]["carried"] is True and manifest["calibration"]["previous_threshold"] == cal.threshold
    stored = json.loads((ModelStore(engine.data_root).model_dir(ROLE, "okonly") / "calibration.json").read_text())
    assert stored["model_version"] == 2 and stored["carried"]["from_model_version"] == 1


def test_refit_carries_the_dataset_rule_with_stored_samples_rescored(engine: Engine) -> None:
    upload(engine, "ds", "ok", range(6))
    upload(engine, "ds", "ng", range(100, 103))
    engine.fit_ok(ROLE, "ds", MM, use_dataset=True)
    first = engine.calibrate_dataset(ROLE, "ds")
    assert (first.method, first.source, first.n_ng) == ("ok_ng_midpoint", "dataset", 3)
    upload(engine, "ds", "ok", range(6, 9))              # the operator adds OK parts, then refits
    refit = engine.fit_ok(ROLE, "ds", MM, use_dataset=True)
    carried = refit.calibration
    assert carried is not None and carried.carried and (carried.rule, carried.source) == ("ok_ng_midpoint", "dataset")
    assert carried.n_ng == 3 and carried.n_ok == 9 and carried.reason is None
    # the same rule on the same data: a fresh calibration from the dataset gives the same threshold
    fresh = engine.calibrate_dataset(ROLE, "ds")
    assert fresh.threshold == pytest.approx(carried.threshold or 0, rel=1e-9)
    assert (fresh.n_ok, fresh.n_ng) == (carried.n_ok, carried.n_ng)
    _agree(engine, "ds", fresh.threshold)


def test_client_ng_scores_without_stored_ng_fall_back_to_the_ok_only_rule(engine: Engine) -> None:
    first = engine.fit_ok(ROLE, "clientng", MM, [part(s) for s in range(4)])
    ng = [engine.infer(ROLE, "clientng", MM, part(s, True), allow_uncalibrated=True).score for s in (1, 2)]
    cal = engine.calibrate_ng(ROLE, "clientng", MM, list(first.ok_scores), ng, 99)
    assert cal.method == "ok_ng_midpoint"
    carried = engine.fit_ok(ROLE, "clientng", MM, [part(s) for s in range(20, 24)]).calibration
    assert carried is not None and carried.carried and carried.rule == "ok_percentile"
    assert carried.previous_rule == "ok_ng_midpoint" and "OK-only" in (carried.reason or "")
    _agree(engine, "clientng", carried.threshold or 0)


def test_refit_recalibration_can_be_turned_off_per_call_and_by_setting(engine: Engine, tmp_path: Path) -> None:
    first = engine.fit_ok(ROLE, "off", MM, [part(s) for s in range(3)])
    engine.calibrate_ng(ROLE, "off", MM, list(first.ok_scores))
    carried = engine.fit_ok(ROLE, "off", MM, [part(s) for s in range(3)], allow_refit_recalibration=False)
    assert carried.calibration is not None and not carried.calibration.carried
    assert carried.calibration.threshold is None and "allow_refit_recalibration" in (carried.calibration.reason or "")
    assert not engine.state(ROLE, "off").calib_present
    with pytest.raises(CalibrationMissing):
        engine.infer(ROLE, "off", MM, part(1))
    assert engine.manifest(ROLE, "off")["calibration"]["carried"] is False

    strict = Engine(door_settings(tmp_path, allow_refit_recalibration=False).engine)
    try:
        fit = strict.fit_ok(ROLE, "s", MM, [part(s) for s in range(3)])
        strict.calibrate_ng(ROLE, "s", MM, list(fit.ok_scores))
        assert strict.fit_ok(ROLE, "s", MM, [part(s) for s in range(3)]).calibration.carried is False  # type: ignore[union-attr]
        assert not strict.state(ROLE, "s").calib_present
        again = strict.fit_ok(ROLE, "s", MM, [part(s) for s in range(3)], allow_refit_recalibration=True)
        assert again.calibration is None                   # the model was uncalibrated: nothing to carry
    finally:
        strict.close()


def test_calibration_scored_on_a_replaced_version_is_model_changed(engine: Engine) -> None:
    upload(engine, "race", "ok", range(6))
    upload(engine, "race", "ng", range(200, 202))
    engine.fit_ok(ROLE, "race", MM, use_dataset=True)
    refitted: list[int] = []

    def refit_while_scoring(stage: str, done: int, total: int) -> None:
        if stage == "score_samples" and not refitted:    # the samples are being scored against version 1
            refitted.append(engine.fit_ok(ROLE, "race", MM, use_dataset=True).model_version)

    with pytest.raises(ModelChanged) as info:
        engine.calibrate_dataset(ROLE, "race", progress=refit_while_scoring)
    assert info.value.status == 409 and info.value.code == "model_changed" and refitted == [2]
    assert not engine.state(ROLE, "race").calib_present     # nothing was written on version 2
    assert engine.calibrate_dataset(ROLE, "race").model_version == 2


def test_work_on_a_model_being_fitted_is_refused_at_once(engine: Engine) -> None:
    fit = engine.fit_ok(ROLE, "busy", MM, [part(s) for s in range(6)])
    engine.calibrate_ng(ROLE, "busy", MM, list(fit.ok_scores))
    engine.fit_ok(ROLE, "other", MM, [part(s) for s in range(3)])
    inside, release = threading.Event(), threading.Event()
    out: dict[str, Any] = {}

    def hold(stage: str, done: int, total: int) -> None:
        if stage == "coreset" and not inside.is_set():
            inside.set()
            release.wait(60)

    worker = threading.Thread(target=lambda: out.update(fit=engine.fit_ok(
        ROLE, "busy", MM, [part(s) for s in range(30, 36)], progress=hold)))
    worker.start()
    try:
        assert inside.wait(60)
        refusals = {
            "calibrate_ng": lambda: engine.calibrate_ng(ROLE, "busy", MM, [1.0, 2.0]),
            "calibrate_dataset": lambda: engine.calibrate_dataset(ROLE, "busy"),
            "delete_model": lambda: engine.delete_model(ROLE, "busy"),
            "fit_ok": lambda: engine.fit_ok(ROLE, "busy", MM, [part(1)]),
        }
        for name, call in refusals.items():
            start = time.perf_counter()
            with pytest.raises(FitInProgress) as info:
                call()
            assert (info.value.status, info.value.code) == (409, "fit_in_progress"), name
            assert time.perf_counter() - start < 1.0, name     # refused at once, not after the fit
        # the running fit blocks nothing else: the old model of the ROI and other ROIs are served
        assert engine.infer(ROLE, "busy", MM, part(3), heatmap="none").model_version == 1
        engine.calibrate_ng(ROLE, "other", MM, [1.0, 2.0])
    finally:
        release.set()
        worker.join(120)
    assert out["fit"].model_version == 2 and out["fit"].calibration.carried
    assert engine.delete_model(ROLE, "busy").deleted

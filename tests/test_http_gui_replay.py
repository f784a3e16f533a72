"""The existing GUI's whole call sequence, replayed against a real uvicorn server, every reply read
the way the GUI reads it (``tests.dotnet_client``: .NET-style multipart and headers, strict mirrors
of its C# DTOs, its error phrase matching).

The station: a real EfficientNet-Lite0 at 64 px; the parts are synthetic (``part_png``), so the
replay takes seconds. Sequence: upload OK samples, fit from the dataset, collect raw scores
(/infer_dataset) and calibrate OK-only (/calibrate_ng), upload NG samples, calibrate from the
dataset, inspect with each shape, add OK samples and refit (the fit carries the calibration over),
inspect again, the bad-input cases, and an untrained ROI that the GUI's recovery handles by itself:
fit from its dataset, retry, then ask the operator to calibrate.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import BaseModel

from engine.api import Engine
from http_compat.server import HttpServer
from tests.dotnet_client import (
    BackendStateInfo,
    CalibrateDatasetResponse,
    CalibResult,
    DatasetListResponse,
    FitOkResult,
    Gui,
    HealthInfo,
    InferDatasetResponse,
    InferResult,
    SampleMetadata,
    assert_error,
    gui_reading,
)
from tests.support import door_settings, part_png

ROLE, ROI, NEW_ROI, MM = "station1", "solder", "fresh", 0.05
SHAPES = [{"kind": "rect", "x": 0, "y": 0, "w": 64, "h": 64},
          {"kind": "circle", "cx": 32.0, "cy": 32.0, "r": 31.5},
          {"kind": "annulus", "cx": 32.0, "cy": 32.0, "r": 31.5, "r_inner": 6.5}]
T = TypeVar("T", bound=BaseModel)


def read(r: httpx.Response, dto: type[T]) -> T:
    """The reply as the GUI deserializes it: 2xx, then its DTO from the raw JSON text."""
    assert 200 <= r.status_code < 300, r.text
    return dto.model_validate_json(r.content)


@pytest.fixture(scope="module")
def gui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gui]:
    config = door_settings(tmp_path_factory.mktemp("replay"))
    engine = Engine(config.engine)
    server = HttpServer(engine, config.http)
    server.start()
    with Gui(server.url, recipe="line-A") as client:
        yield client
    server.stop()
    engine.close()


def upload(gui: Gui, roi: str, label: str, seeds: range) -> None:
    """/datasets/<label>/upload, one PNG and its metas JSON part per call, as the GUI saves samples."""
    for seed in seeds:
        name = f"{label}_{seed:03d}.png"
        meta = {"role_id": ROLE, "roi_id": roi, "label": label, "filename": name, "angle": 12.5,
                "timestamp": "2025-10-01T08:00:00", "mm_per_px": MM, "shape_json": json.dumps(SHAPES[0]),
                "created_at_utc": "2025-10-01T08:00:00Z", "source_path": f"C:\\captures\\{name}"}
        r = gui.form(f"/datasets/{label}/upload", [("role_id", ROLE), ("roi_id", roi)],
                     [("images", name, part_png(seed, label == "ng"))], [("metas", json.dumps(meta))])
        assert 200 <= r.status_code < 300, r.text


def fit_from_dataset(gui: Gui, roi: str) -> tuple[FitOkResult, dict[str, Any]]:
    r = gui.form("/fit_ok", [("role_id", ROLE), ("roi_id", roi), ("mm_per_px", f"{MM}"), ("memory_fit", "false"),
                             ("model_key", roi), ("use_dataset", "true")])
    return read(r, FitOkResult), r.json()


def infer(gui: Gui, roi: str, seed: int, defect: bool = False, shape: Any = None) -> httpx.Response:
    return gui.infer(part_png(seed, defect), role=ROLE, roi=roi, mm=MM, shape=shape)


def test_the_gui_workflow_end_to_end(gui: Gui) -> None:
    health = read(gui.get("/health"), HealthInfo)
    assert health.status == "ok" and health.recipe_id == "line-A"

    # 1. the operator saves OK samples; 2. the GUI trains from them
    upload(gui, ROI, "ok", range(10))
    listing = read(gui.get("/datasets/list", role_id=ROLE, roi_id=ROI), DatasetListResponse)
    assert listing.classes and listing.classes.ok and listing.classes.ok.count == 10
    assert listing.classes.ok.meta and all(listing.classes.ok.meta.values())
    meta = read(gui.get("/datasets/meta", role_id=ROLE, roi_id=ROI, label="ok", filename="ok_000.png"),
                SampleMetadata)
    assert (meta.mm_per_px, meta.angle, meta.filename) == (MM, 12.5, "ok_000.png")
    stored = gui.get("/datasets/file", role_id=ROLE, roi_id=ROI, label="ok", filename="ok_000.png")
    assert stored.status_code == 200 and stored.content == part_png(0)
    upload(gui, ROI, "ok", range(90, 91))                   # saved by mistake, deleted again
    assert gui.delete("/datasets/file", role_id=ROLE, roi_id=ROI, label="ok", filename="ok_090.png").is_success
    fit, _ = fit_from_dataset(gui, ROI)
    assert fit.n_embeddings > 0 and 0 < fit.coreset_size <= fit.n_embeddings and fit.token_shape == [8, 8]
    state = read(gui.get("/state", role_id=ROLE, roi_id=ROI, model_key=ROI), BackendStateInfo)
    assert (state.memory_fitted, state.calib_present) == (True, False)

    # 3a. raw scores of the stored samples, then an OK-only calibration from them
    raw = read(gui.post_json("/infer_dataset", {"role_id": ROLE, "roi_id": ROI, "include_heatmap": False,
                                                "default_mm_per_px": MM}), InferDatasetResponse)
    assert raw.n_total == 10 and raw.n_errors == 0 and raw.items
    assert all(item.threshold is None and item.score is not None for item in raw.items)
    ok_scores = [item.score for item in raw.items]
    calib = read(gui.post_json("/calibrate_ng", {
        "role_id": ROLE, "roi_id": ROI, "model_key": ROI, "mm_per_px": MM, "ok_scores": ok_scores,
        "ng_scores": None, "area_mm2_thr": 1.0, "score_percentile": 99}), CalibResult)
    assert calib.ng_mean == 0.0 and calib.score_percentile == 99.0 and calib.threshold

    # 3b. NG samples, then the GUI's main path: calibrate from the dataset
    upload(gui, ROI, "ng", range(100, 103))
    by_dataset = read(gui.post_json("/calibrate_dataset", {"role_id": ROLE, "roi_id": ROI,
                                                           "default_mm_per_px": MM}), CalibrateDatasetResponse)
    assert (by_dataset.n_ok, by_dataset.n_ng, by_dataset.score_percentile) == (10, 3, 99)
    assert by_dataset.model_key == ROI and by_dataset.threshold > 0

    # 4. inspection with each shape: OK parts pass, defective parts are NG with regions
    for shape in SHAPES:
        good = read(infer(gui, ROI, 50, shape=shape), InferResult)
        bad = read(infer(gui, ROI, 101, defect=True, shape=shape), InferResult)
        assert good.threshold == bad.threshold == by_dataset.threshold
        assert (good.decision, bad.decision) == ("ok", "ng") and bad.regions and bad.score > good.score
        assert all(r.bbox == [r.x, r.y, r.w, r.h] for r in bad.regions)

    # 5. more OK parts, a refit: the station stays calibrated and says how
    upload(gui, ROI, "ok", range(10, 13))
    refit, raw_fit = fit_from_dataset(gui, ROI)
    carried = raw_fit["calibration"]
    assert carried["carried"] is True and carried["rule"] == "ok_ng_midpoint"
    assert carried["previous_threshold"] == by_dataset.threshold and isinstance(carried["threshold"], float)
    assert raw_fit["model_version"] == 2 and refit.n_embeddings > fit.n_embeddings
    again = read(infer(gui, ROI, 101, defect=True), InferResult)
    assert again.threshold == carried["threshold"] and again.decision == "ng"
    assert read(gui.get("/state", role_id=ROLE, roi_id=ROI, model_key=ROI), BackendStateInfo).calib_present
    after = read(gui.post_json("/infer_dataset", {"role_id": ROLE, "roi_id": ROI, "include_heatmap": True,
                                                  "default_mm_per_px": MM}), InferDatasetResponse)
    assert after.n_total == 16 and after.n_errors == 0 and after.items
    assert all(item.threshold == carried["threshold"] and item.heatmap_png_base64 for item in after.items)
    assert {item.n_regions > 0 for item in after.items if item.label == "ng"} == {True}


def test_bad_input_is_a_plain_error_for_the_gui_whatever_the_model_state(gui: Gui) -> None:
    # on a ROI without a model, a bad request is 400 for what is wrong with it, never "untrained":
    # otherwise the GUI would start a fit for a garbage image
    cases = {
        "invalid_image": dict(image=b"not an image"),
        "invalid_shape": dict(shape={"kind": "hexagon", "r": 3}),
        "invalid_input": dict(mm=-1.0),
    }
    for roi in ("never_fitted", ROI):
        for code, change in cases.items():
            image = change.get("image", part_png(7))
            r = gui.infer(image, role=ROLE, roi=roi, mm=change.get("mm", MM), shape=change.get("shape"))
            assert_error(r, 400, code)
            assert gui_reading(r) == "error", (roi, code, r.text)
        out_of_bounds = {"kind": "rect", "x": 0, "y": 0, "w": 500, "h": 500}
        assert_error(gui.infer(part_png(7), role=ROLE, roi=roi, mm=MM, shape=out_of_bounds), 400, "invalid_shape")


def test_the_gui_recovers_an_untrained_roi_by_itself(gui: Gui) -> None:
    upload(gui, NEW_ROI, "ok", range(200, 210))
    upload(gui, NEW_ROI, "ng", range(300, 302))
    first = infer(gui, NEW_ROI, 205)
    assert gui_reading(first) == "untrained", first.text
    # the GUI's automatic fit: at least 10 OK samples stored -> fit from the dataset, then retry
    listing = read(gui.get("/datasets/list", role_id=ROLE, roi_id=NEW_ROI), DatasetListResponse)
    assert listing.classes and listing.classes.ok and listing.classes.ok.count >= 10
    fit, raw_fit = fit_from_dataset(gui, NEW_ROI)
    assert fit.n_embeddings > 0 and raw_fit["calibration"] is None
    retry = infer(gui, NEW_ROI, 205)
    assert gui_reading(retry) == "calibrate", retry.text
    # the operator calibrates when asked; the next inspection passes
    read(gui.post_json("/calibrate_dataset", {"role_id": ROLE, "roi_id": NEW_ROI, "default_mm_per_px": MM}),
         CalibrateDatasetResponse)
    assert read(infer(gui, NEW_ROI, 205), InferResult).decision == "ok"
    # the brief's clients (no model_key) get the brief's statuses for the same situations
    seed_style = gui.infer(part_png(1), role=ROLE, roi="never_fitted", mm=MM, model_key=False)
    assert_error(seed_style, 404, "model_not_found")


@pytest.mark.parametrize(("dto", "body"), [
    (CalibResult, {"threshold": 1.0, "ok_mean": 0.5, "ng_mean": None, "score_percentile": 0.99, "area_mm2_thr": 1.0}),
    (CalibrateDatasetResponse, {"threshold": 1.0, "score_percentile": 0.995, "area_mm2_thr": 1.0, "n_ok": 3,
                                "n_ng": 0}),
    (CalibrateDatasetResponse, {"threshold": 1.0, "score_percentile": 99.0, "area_mm2_thr": 1.0, "n_ok": 3,
                                "n_ng": 0}),
    (CalibrateDatasetResponse, {"threshold": None, "score_percentile": 99, "n_ok": 3, "n_ng": 0}),
    (BackendStateInfo, {"memory_fitted": None, "calib_present": False}),
    (FitOkResult, {"n_embeddings": 64.0, "coreset_size": 6}),
    (InferResult, {"score": None}),
    (HealthInfo, {"status": 1}),
])
def test_the_dto_mirrors_refuse_what_the_gui_cannot_read(dto: type[BaseModel], body: dict[str, Any]) -> None:
    # the replies the shim gave before (null ng_mean, a fraction into an int, ...) fail here, as
    # they fail in System.Text.Json: the replay above would catch them
    with pytest.raises(ValueError):
        dto.model_validate_json(json.dumps(body))


@pytest.mark.parametrize("field", [{"mm_per_px": None}, {"mm_per_px": "0.1"}, {"mm_per_px": 0}, {"angle": "north"},
                                   {"timestamp": "yesterday"}, {"filename": 7}])
def test_metadata_the_gui_could_not_read_back_is_refused(gui: Gui, field: dict[str, Any]) -> None:
    # /datasets/meta answers the stored metadata as it is: a value the GUI's SampleMetadata cannot
    # hold (mm_per_px is a non-nullable double) is refused at upload, nothing is stored
    meta = {"role_id": ROLE, "roi_id": "metas", "label": "ok", "filename": "m.png", "mm_per_px": MM, **field}
    r = gui.form("/datasets/ok/upload", [("role_id", ROLE), ("roi_id", "metas")],
                 [("images", "m.png", part_png(3))], [("metas", json.dumps(meta))])
    assert_error(r, 400, "invalid_input")
    listing = read(gui.get("/datasets/list", role_id=ROLE, roi_id="metas"), DatasetListResponse)
    assert listing.classes and listing.classes.ok and listing.classes.ok.count == 0

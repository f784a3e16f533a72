"""The two error dialects of the REST door, over real uvicorn servers (``http_error_dialect``).

* seed (the brief): an untrained ROI is 404 ``model_not_found``, a missing calibration 428
  ``calibration_missing``.
* gui (the existing GUI's original backend): both are 400, with texts the GUI's phrase matching
  recognises, so it fits from its dataset by itself or asks the operator to calibrate.
* auto (default): gui for requests that carry ``model_key`` (only the GUI sends it), seed otherwise.

The body's ``code`` is the same in every dialect; other errors are not affected.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.api import Engine
from http_compat.server import HttpServer
from tests.dotnet_client import CALIBRATION_PHRASES, UNTRAINED_PHRASES, Gui, assert_error, gui_reading
from tests.support import door_settings, part_png

ROLE, MM = "cam", 0.1


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("dialect")
    engine = Engine(door_settings(root).engine)
    engine.fit_ok(ROLE, "uncal", MM, [part_png(s) for s in range(3)])
    servers = {d: HttpServer(engine, door_settings(root, http_error_dialect=d).http) for d in ("seed", "gui", "auto")}
    for server in servers.values():
        server.start()
    yield {d: s.url for d, s in servers.items()}
    for server in servers.values():
        server.stop()
    engine.close()


@pytest.mark.parametrize(("dialect", "model_key", "gui_statuses"), [
    ("seed", True, False), ("seed", False, False),
    ("gui", True, True), ("gui", False, True),
    ("auto", True, True), ("auto", False, False),
])
def test_infer_on_untrained_and_uncalibrated_rois(urls: dict[str, str], dialect: str, model_key: bool,
                                                  gui_statuses: bool) -> None:
    with Gui(urls[dialect]) as gui:
        untrained = gui.infer(part_png(9), role=ROLE, roi="never_fitted", mm=MM, model_key=model_key)
        uncalibrated = gui.infer(part_png(9), role=ROLE, roi="uncal", mm=MM, model_key=model_key)
    if gui_statuses:
        assert_error(untrained, 400, "model_not_found")
        assert_error(uncalibrated, 400, "calibration_missing")
        # what the GUI does with them: fit from its dataset by itself / ask the operator to calibrate
        assert (gui_reading(untrained), gui_reading(uncalibrated)) == ("untrained", "calibrate")
    else:
        assert_error(untrained, 404, "model_not_found")
        assert_error(uncalibrated, 428, "calibration_missing")
        assert gui_reading(untrained) == gui_reading(uncalibrated) == "error"


def test_each_text_matches_only_its_own_phrase_list(urls: dict[str, str]) -> None:
    with Gui(urls["gui"]) as gui:
        untrained = gui.infer(part_png(9), role=ROLE, roi="never_fitted", mm=MM).json()["error"].lower()
        uncalibrated = gui.infer(part_png(9), role=ROLE, roi="uncal", mm=MM).json()["error"].lower()
    assert "memory not found" in untrained and "run /fit_ok first" in untrained
    assert "calibration_missing" in uncalibrated
    assert not any(phrase in untrained for phrase in CALIBRATION_PHRASES)
    assert not any(phrase in uncalibrated for phrase in UNTRAINED_PHRASES)


def test_the_dialect_changes_only_those_two_errors(urls: dict[str, str]) -> None:
    with Gui(urls["gui"]) as gui:
        assert_error(gui.infer(part_png(9), role=ROLE, roi="uncal", mm=0.3), 400, "calibration_missing")
        assert_error(gui.infer(b"garbage", role=ROLE, roi="never_fitted", mm=MM), 400, "invalid_image")
        calibrate = gui.post_json("/calibrate_ng", {"role_id": ROLE, "roi_id": "never_fitted", "model_key": "x",
                                                    "mm_per_px": MM, "ok_scores": [1.0]})
        assert_error(calibrate, 400, "model_not_found")
        missing_sample = gui.get("/datasets/file", role_id=ROLE, roi_id="uncal", label="ok", filename="none.png")
        assert_error(missing_sample, 404, "sample_not_found")
    with Gui(urls["auto"]) as gui:
        # a calibrate_ng without model_key, on the auto door: the brief's status
        calibrate = gui.post_json("/calibrate_ng", {"role_id": ROLE, "roi_id": "never_fitted", "mm_per_px": MM,
                                                    "ok_scores": [1.0]})
        assert_error(calibrate, 404, "model_not_found")
        state = gui.get("/state", role_id=ROLE, roi_id="never_fitted", model_key="never_fitted")
        assert state.status_code == 200 and state.json()["memory_fitted"] is False

"""The request's own faults are reported before the model's state, on both doors.

A table: every kind of bad input (image bytes, shape kind, shape bounds, ids, number formats,
heatmap format) and a valid request, against every model state (no model, fitted but not
calibrated, calibrated, calibrated but asked at another mm_per_px), for ``infer``, the items of
``infer_batch`` and ``infer_dataset``. A bad request is answered 400 with the code of its fault
whatever the state; a valid one gets the state's answer (404, 428, 200, 409). The REST requests
are the brief's (no ``model_key``), so the seed's error dialect applies (the GUI's is tested in
tests/test_http_dialect.py). The ZeroMQ door refuses a wrongly typed arg (a heatmap name outside
its type) itself, with 400 ``invalid_args``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from engine.api import Engine
from tests.support import Doors, door_settings, part_png

ROLE, MM, OTHER_MM = "cam", 0.1, 0.2
STATES = {"no_model": "nomodel", "uncalibrated": "uncal", "calibrated": "cal", "mm_mismatch": "cal"}
VALID = {"no_model": (404, "model_not_found"), "uncalibrated": (428, "calibration_missing"),
         "calibrated": (200, None), "mm_mismatch": (409, "mm_per_px_mismatch")}
OUT_OF_BOUNDS = {"kind": "rect", "x": 0, "y": 0, "w": 500, "h": 500}

# kind -> (changes to a valid ROI request, the codes a door may answer with)
ROI_FAULTS: dict[str, tuple[dict[str, Any], set[str]]] = {
    "valid": ({}, set()),
    "image_bytes": ({"image": b"this is not an image"}, {"invalid_image"}),
    "empty_image": ({"image": b""}, {"invalid_image"}),
    "shape_kind": ({"shape": {"kind": "hexagon", "r": 3}}, {"invalid_shape"}),
    "shape_bounds": ({"shape": OUT_OF_BOUNDS}, {"invalid_shape"}),
    "shape_json": ({"shape": "{not json"}, {"invalid_shape"}),
    "roi_id": ({"roi_id": "../up"}, {"invalid_id"}),
    "mm_negative": ({"mm_per_px": -1.0}, {"invalid_input"}),
    "mm_nan": ({"mm_per_px": math.nan}, {"invalid_input"}),
}
CALL_FAULTS: dict[str, tuple[dict[str, Any], set[str]]] = {
    "role_id": ({"role_id": "a/b"}, {"invalid_id"}),
    "heatmap": ({"heatmap": "jpeg"}, {"invalid_input", "invalid_args"}),
}


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doors]:
    config = door_settings(tmp_path_factory.mktemp("order"))
    engine = Engine(config.engine)
    engine.fit_ok(ROLE, "uncal", MM, [part_png(s) for s in range(3)])
    fit = engine.fit_ok(ROLE, "cal", MM, [part_png(s) for s in range(3)])
    engine.calibrate_ng(ROLE, "cal", MM, list(fit.ok_scores))
    for roi in ("nomodel", "uncal", "cal"):          # samples without mm_per_px: the request's default applies
        engine.dataset_upload(ROLE, roi, "ok", part_png(40), "ok_40.png")
    with Doors(engine, config) as both:
        yield both
    engine.close()


def _expected(state: str, codes: set[str]) -> tuple[int, set[str | None]]:
    if codes:
        return 400, set(codes)
    status, code = VALID[state]
    return status, {code}


def _roi_request(state: str, changes: dict[str, Any]) -> dict[str, Any]:
    request = {"role_id": ROLE, "roi_id": STATES[state], "mm_per_px": OTHER_MM if state == "mm_mismatch" else MM,
               "image": part_png(41), "shape": None, "heatmap": "none"}
    return {**request, **changes}


def _infer(doors: Doors, door: str, req: dict[str, Any]) -> tuple[int, str | None]:
    if door == "zmq":
        status, answer = doors.zmq_answer("infer", {k: v for k, v in req.items() if v is not None})
        return status, None if status == 200 else answer
    data = {"role_id": req["role_id"], "roi_id": req["roi_id"], "mm_per_px": str(req["mm_per_px"]),
            "heatmap": req["heatmap"]}
    if req["shape"] is not None:
        data["shape"] = req["shape"] if isinstance(req["shape"], str) else json.dumps(req["shape"])
    status, body = doors.http_answer("POST", "/infer", data=data, files={"image": ("roi.png", req["image"])})
    return status, None if status == 200 else body["code"]


def _batch(doors: Doors, door: str, req: dict[str, Any]) -> tuple[int, str | None]:
    """(status, code) of the call when it fails as a whole, else of its one item."""
    item = {"roi_id": req["roi_id"], "mm_per_px": req["mm_per_px"], "image": req["image"]}
    if req["shape"] is not None:
        item["shape"] = req["shape"]
    if door == "zmq":
        status, answer = doors.zmq_answer("infer_batch", {"role_id": req["role_id"], "items": [item],
                                                          "heatmap": req["heatmap"]})
        if status != 200:
            return status, answer
        error = answer["items"][0]["error"]
    else:
        items = json.dumps([{k: v for k, v in item.items() if k != "image"}])
        status, body = doors.http_answer("POST", "/infer_batch", files={"images": ("a.png", req["image"])},
                                         data={"role_id": req["role_id"], "items": items, "heatmap": req["heatmap"]})
        if status != 200:
            return status, body["code"]
        error = body["items"][0]["error"]
    return (200, None) if error is None else (error["status"], error["code"])


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("kind", [*ROI_FAULTS, *CALL_FAULTS])
@pytest.mark.parametrize("door", ["zmq", "http"])
def test_infer(doors: Doors, door: str, kind: str, state: str) -> None:
    changes, codes = {**ROI_FAULTS, **CALL_FAULTS}[kind]
    status, code = _infer(doors, door, _roi_request(state, changes))
    want_status, want_codes = _expected(state, codes)
    assert status == want_status and code in want_codes, (door, kind, state, status, code)


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("kind", [*ROI_FAULTS, *CALL_FAULTS])
@pytest.mark.parametrize("door", ["zmq", "http"])
def test_infer_batch_item(doors: Doors, door: str, kind: str, state: str) -> None:
    if door == "http" and kind == "mm_nan":
        pytest.skip("JSON has no NaN: the items text cannot carry one")
    changes, codes = {**ROI_FAULTS, **CALL_FAULTS}[kind]
    status, code = _batch(doors, door, _roi_request(state, changes))
    want_status, want_codes = _expected(state, codes)
    assert status == want_status and code in want_codes, (door, kind, state, status, code)


DATASET_FAULTS: dict[str, tuple[dict[str, Any], set[str]]] = {
    "valid": ({}, set()),
    "roi_id": ({"roi_id": "x\\y"}, {"invalid_id"}),
    "role_id": ({"role_id": ".."}, {"invalid_id"}),
    "mm_negative": ({"default_mm_per_px": -0.5}, {"invalid_input"}),
    "mm_zero": ({"default_mm_per_px": 0.0}, {"invalid_input"}),
}


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("kind", list(DATASET_FAULTS))
@pytest.mark.parametrize("door", ["zmq", "http"])
def test_infer_dataset(doors: Doors, door: str, kind: str, state: str) -> None:
    changes, codes = DATASET_FAULTS[kind]
    req = {"role_id": ROLE, "roi_id": STATES[state], "include_heatmap": False,
           "default_mm_per_px": OTHER_MM if state == "mm_mismatch" else MM, **changes}
    if door == "zmq":
        status, answer = doors.zmq_answer("infer_dataset", req)
        body = answer if status == 200 else {"code": answer}
    else:
        status, body = doors.http_answer("POST", "/infer_dataset", json=req)
    if codes:
        assert (status, body["code"]) in {(400, c) for c in codes}, (door, kind, state, body)
    elif state == "no_model":
        assert (status, body["code"]) == (404, "model_not_found")
    else:
        # scored one by one: raw scores when uncalibrated, 409 per sample at another mm_per_px
        assert status == 200 and body["n_total"] == 1, body
        error = body["items"][0]["error"]
        if state == "mm_mismatch":
            assert error.startswith("mm_per_px_mismatch"), error
        else:
            assert error is None and (body["items"][0]["threshold"] is None) == (state == "uncalibrated")

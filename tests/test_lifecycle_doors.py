"""The lifecycle ops on both doors: real ZeroMQ and real uvicorn on loopback, one small CPU engine
(EfficientNet-Lite0 at 64 px) on synthetic parts. Each family (versions/activate, add_ok,
mark_ok/mark_ng, export/import) is called on both doors, errors included."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator

import pytest

from engine.api import Engine
from tests.support import Doors, door_settings, part_png

ROLE, MM = "door", 0.1


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doors]:
    settings = door_settings(tmp_path_factory.mktemp("lifecycle_doors"))
    engine = Engine(settings.engine)
    engine.fit_ok(ROLE, "a", MM, [part_png(s) for s in range(4)])
    engine.calibrate_ng(ROLE, "a", MM, [1.0, 2.0])
    d = Doors(engine, settings, timeout=60)
    yield d
    d.close()
    engine.close()


def _files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", im, "image/png")) for i, im in enumerate(images)]


def test_versions_and_activate_on_both_doors(doors: Doors) -> None:
    status, listing = doors.http_answer("GET", "/versions", params={"role_id": ROLE, "roi_id": "a"})
    assert status == 200 and listing["active_version"] == 2 and listing["request_id"]
    assert [v["created_by"] for v in listing["versions"]] == ["fit", "calibration"]
    assert doors.zmq.versions(ROLE, "a").active_version == 2

    status, body = doors.http_answer("POST", "/activate", json={"role_id": ROLE, "roi_id": "a", "version": 1})
    assert status == 200 and (body["active_version"], body["previous_version"]) == (1, 2)
    assert doors.http_answer("GET", "/state", params={"role_id": ROLE, "roi_id": "a"})[1]["active_version"] == 1
    assert doors.zmq.activate(ROLE, "a", 2).active_version == 2
    assert doors.zmq.state(ROLE, "a").active_version == 2

    status, body = doors.http_answer("POST", "/activate", json={"role_id": ROLE, "roi_id": "a", "version": 7})
    assert (status, body["code"]) == (404, "version_not_found")
    assert doors.zmq_error("activate", {"role_id": ROLE, "roi_id": "a", "version": 7})[:2] == (404, "version_not_found")
    assert doors.zmq_error("activate", {"role_id": ROLE, "roi_id": "a", "version": "2"})[:2] == (400, "invalid_args")
    status, body = doors.http_answer("GET", "/versions", params={"role_id": ROLE, "roi_id": "none"})
    assert (status, body["code"]) == (404, "model_not_found")


def test_add_ok_on_both_doors(doors: Doors) -> None:
    doors.engine.fit_ok(ROLE, "grow", MM, [part_png(s) for s in range(3)])
    r = doors.web.post("/add_ok", data={"role_id": ROLE, "roi_id": "grow", "operator_id": "op1"},
                       files=_files([part_png(10), part_png(11)]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["version"], body["n_images"], body["n_images_total"]) == (2, 2, 5) and len(body["ok_scores"]) == 2
    added = doors.zmq.add_ok(ROLE, "grow", [part_png(12)])
    assert (added.version, added.n_images_total) == (3, 6)
    assert doors.zmq_error("add_ok", {"role_id": ROLE, "roi_id": "nope", "images": [part_png(1)]})[:2] == (
        404, "model_not_found")
    r = doors.web.post("/add_ok", data={"role_id": ROLE, "roi_id": "grow"})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_input")
    r = doors.web.post("/add_ok", data={"role_id": ROLE, "roi_id": "grow", "mm_per_px": "0.5"},
                       files=_files([part_png(13)]))
    assert (r.status_code, r.json()["code"]) == (409, "mm_per_px_mismatch")
    assert doors.zmq.versions(ROLE, "grow").active_version == 3          # nothing added by the refused call


def test_mark_ok_and_mark_ng_on_both_doors(doors: Doors) -> None:
    doors.engine.fit_ok(ROLE, "mark", MM, [part_png(s) for s in range(3)])
    alarm = part_png(5, defect=True)
    r = doors.web.post("/mark_ok", data={"role_id": ROLE, "roi_id": "mark", "operator_id": "op2", "mm_per_px": "0.1"},
                       files={"image": ("x.png", alarm, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == "ok" and body["added"]["version"] == 2 and body["marked_version"] == 1
    meta = doors.zmq.dataset_meta(ROLE, "mark", "ok", body["filename"])
    assert meta["marked"]["operator_id"] == "op2" and meta["marked"]["score"] == pytest.approx(body["score"])

    missed = doors.zmq.mark_ng(ROLE, "mark", part_png(6, defect=True), operator_id="op4")
    assert missed.label == "ng" and missed.added is None
    r = doors.web.post("/mark_ng", data={"role_id": ROLE, "roi_id": "mark", "mm_per_px": "0.5"},
                       files={"image": ("x.png", alarm, "image/png")})
    assert (r.status_code, r.json()["code"]) == (409, "mm_per_px_mismatch")
    assert doors.zmq_error("mark_ok", {"role_id": ROLE, "roi_id": "mark", "image": b"not an image"})[:2] == (
        400, "invalid_image")


def test_export_on_rest_import_on_zeromq_and_a_bad_archive_on_both(doors: Doors) -> None:
    r = doors.web.get("/export_model", params={"role_id": ROLE, "roi_id": "a", "version": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["x-model-version"] == "2" and "attachment" in r.headers["content-disposition"]
    archive = r.content
    imported = doors.zmq.import_model(ROLE, "copy", archive)
    assert imported.version == 1 and imported.origin["roi_id"] == "a"
    image = part_png(20)
    here = doors.zmq.infer(ROLE, "a", MM, image, heatmap="none").score
    assert abs(doors.zmq.infer(ROLE, "copy", MM, image, heatmap="none").score - here) <= 1e-6
    exported = doors.zmq.export_model(ROLE, "copy")
    assert exported.version == 1 and zipfile.ZipFile(io.BytesIO(exported.archive)).testzip() is None

    r = doors.web.post("/import_model", data={"role_id": ROLE, "roi_id": "bad"},
                       files={"archive": ("m.zip", archive[:-200], "application/zip")})
    assert (r.status_code, r.json()["code"]) == (400, "archive_invalid")
    assert doors.zmq_error("import_model", {"role_id": ROLE, "roi_id": "bad", "archive": b"PK\x03\x04"})[:2] == (
        400, "archive_invalid")
    assert doors.http_answer("GET", "/state", params={"role_id": ROLE, "roi_id": "bad"})[1]["memory_fitted"] is False
    r = doors.web.get("/export_model", params={"role_id": ROLE, "roi_id": "a", "version": 99})
    assert (r.status_code, r.json()["code"]) == (404, "version_not_found")
    assert json.loads(doors.web.get("/openapi.json").text)["paths"]["/add_ok"]["post"]

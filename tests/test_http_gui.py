"""The desktop GUI's workflow over a real uvicorn server and a real engine, on MVTec bottle images.

Requests are built the way .NET HttpClient builds them (quoted boundary, unquoted part names,
``filename*``); one goes over a raw socket byte by byte. Every status of the brief's section 7
(400, 404, 409, 428) plus 401, 413 and 422 is exercised against the real engine.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from engine.api import Engine
from engine.settings import Settings
from http_compat.server import HttpServer
from http_compat.settings import HttpSettings
from tests.support import MVTEC_BOTTLE, load_bgr, png_bytes

SIDE = 224                     # images are downscaled from 900x900 to keep the module fast
MM = 0.1                       # mm per pixel of the downscaled images
ROLE, ROI = "cam1", "neck"

pytestmark = pytest.mark.skipif(
    not (MVTEC_BOTTLE / "train" / "good").is_dir(),
    reason=f"MVTec AD bottle data not found at {MVTEC_BOTTLE} (shared/data is not part of the repo)",
)

SHAPES = {
    "rect": {"kind": "rect", "x": 0, "y": 0, "w": SIDE, "h": SIDE},
    "circle": {"kind": "circle", "cx": 112.0, "cy": 112.0, "r": 112.0},
    "annulus": {"kind": "annulus", "cx": 112.0, "cy": 112.0, "r": 112.0, "r_inner": 40.5},
}


# ---------------------------------------------------------------- .NET-style requests

TextField = tuple[str, str]
FilePart = tuple[str, str, bytes]         # field name, file name, bytes


def dotnet_multipart(fields: Sequence[TextField], files: Sequence[FilePart] = (),
                     json_fields: Sequence[TextField] = ()) -> tuple[str, bytes]:
    """(Content-Type, body) exactly as .NET's MultipartFormDataContent writes them."""
    boundary = str(uuid.uuid4())
    out = bytearray()
    for name, value in fields:
        out += (f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Disposition: form-data; name={name}\r\n\r\n").encode() + value.encode() + b"\r\n"
    for name, value in json_fields:
        out += (f"--{boundary}\r\nContent-Type: application/json; charset=utf-8\r\n"
                f"Content-Disposition: form-data; name={name}\r\n\r\n").encode() + value.encode() + b"\r\n"
    for name, filename, data in files:
        out += (f"--{boundary}\r\nContent-Type: image/png\r\nContent-Disposition: form-data; name={name}; "
                f"filename={filename}; filename*=utf-8''{filename}\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f'multipart/form-data; boundary="{boundary}"', bytes(out)


class Gui:
    """The GUI's habits: a fresh X-Request-Id per call, X-Recipe-Id when a recipe is chosen."""

    def __init__(self, base_url: str, recipe: str | None = None, api_key: str | None = None) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=120)
        self.recipe, self.api_key = recipe, api_key

    def headers(self, content_type: str | None = None) -> dict[str, str]:
        h = {"X-Request-Id": str(uuid.uuid4())}
        if self.recipe:
            h["X-Recipe-Id"] = self.recipe
        if self.api_key:
            h["X-API-Key"] = self.api_key
        if content_type:
            h["Content-Type"] = content_type
        return h

    def form(self, path: str, fields: Sequence[TextField], files: Sequence[FilePart] = (),
             json_fields: Sequence[TextField] = ()) -> httpx.Response:
        ctype, body = dotnet_multipart(fields, files, json_fields)
        return self.check_id(self.http.post(path, content=body, headers=self.headers(ctype)))

    def post_json(self, path: str, body: dict[str, Any]) -> httpx.Response:
        data = json.dumps(body).encode()
        return self.check_id(self.http.post(path, content=data,
                                            headers=self.headers("application/json; charset=utf-8")))

    def get(self, path: str, **params: str) -> httpx.Response:
        return self.check_id(self.http.get(path, params=params, headers=self.headers()))

    def delete(self, path: str, **params: str) -> httpx.Response:
        return self.check_id(self.http.delete(path, params=params, headers=self.headers()))

    def infer(self, image: bytes, *, roi: str = ROI, mm: float = MM, shape: dict[str, Any] | str | None = None,
              extra: Sequence[TextField] = ()) -> httpx.Response:
        fields = [("role_id", ROLE), ("roi_id", roi), ("mm_per_px", f"{mm}"), ("model_key", roi), *extra]
        if shape is not None:
            fields.append(("shape", shape if isinstance(shape, str) else json.dumps(shape)))
        return self.form("/infer", fields, [("image", "roi.png", image)])

    def __enter__(self) -> Gui:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    @staticmethod
    def check_id(r: httpx.Response) -> httpx.Response:
        sent = r.request.headers["x-request-id"]
        assert r.headers["x-request-id"] == sent
        if r.headers.get("content-type", "").startswith("application/json"):
            body = r.json()
            if isinstance(body, dict) and ("request_id" in body or r.status_code >= 400):
                assert body["request_id"] == sent
        return r


def assert_error(r: httpx.Response, status: int, *codes: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "code", "request_id"} and body["code"] in codes, body
    assert "Traceback" not in body["error"]
    return body


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def images() -> dict[str, list[bytes]]:
    def take(sub: str, n: int) -> list[bytes]:
        return [png_bytes(load_bgr(p, SIDE)) for p in sorted((MVTEC_BOTTLE / sub).glob("*.png"))[:n]]

    return {"train": take("train/good", 6), "good": take("test/good", 2),
            "broken_large": take("test/broken_large", 2), "contamination": take("test/contamination", 1)}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    settings = Settings(data_root=tmp_path_factory.mktemp("data"), backbone="efficientnet_lite0",
                        input_size=SIDE, device="cpu")
    eng = Engine(settings)
    yield eng
    eng.close()


def _serve(engine: Engine, root: Path, **overrides: Any) -> HttpServer:
    srv = HttpServer(engine, HttpSettings(http_host="127.0.0.1", http_port=0, **overrides))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    srv = _serve(engine, tmp_path_factory.mktemp("srv"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gui(server: HttpServer) -> Iterator[Gui]:
    with Gui(server.url) as g:
        yield g


@pytest.fixture(scope="module")
def trained(gui: Gui, images: dict[str, list[bytes]]) -> dict[str, Any]:
    """GUI steps 1-3: store OK/NG samples, fit from the dataset, calibrate from the dataset."""
    gui.delete("/datasets/clear", role_id=ROLE, roi_id=ROI)
    samples = [("ok", f"ok_{i}.png", img) for i, img in enumerate(images["train"])]
    samples += [("ng", "ng_broken.png", images["broken_large"][0]),
                ("ng", "ng_contamination.png", images["contamination"][0])]
    for label, name, data in samples:
        meta = {"role_id": ROLE, "roi_id": ROI, "label": label, "filename": name, "angle": 0.0,
                "mm_per_px": MM, "shape_json": json.dumps(SHAPES["rect"]), "created_at_utc": "2025-10-01T08:00:00Z"}
        r = gui.form(f"/datasets/{label}/upload", [("role_id", ROLE), ("roi_id", ROI)],
                     [("images", name, data)], [("metas", json.dumps(meta))])
        assert r.status_code == 200, r.text
    fit = gui.form("/fit_ok", [("role_id", ROLE), ("roi_id", ROI), ("mm_per_px", f"{MM}"),
                               ("memory_fit", "false"), ("model_key", ROI), ("use_dataset", "true")])
    assert fit.status_code == 200, fit.text
    calib = gui.post_json("/calibrate_dataset", {"role_id": ROLE, "roi_id": ROI, "default_mm_per_px": MM})
    assert calib.status_code == 200, calib.text
    return {"fit": fit.json(), "calib": calib.json(), "samples": samples}


# ---------------------------------------------------------------- the workflow

def test_health(gui: Gui) -> None:
    r = gui.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert {"status", "device", "model", "version", "uptime_s", "roles_loaded", "rois", "request_id"} <= set(body)
    assert body["device"] == "cpu"


@pytest.mark.slow
def test_fit_from_dataset_reports_memory(trained: dict[str, Any]) -> None:
    fit = trained["fit"]
    assert isinstance(fit["n_embeddings"], int) and fit["n_embeddings"] > 0
    assert 0 < fit["coreset_size"] <= fit["n_embeddings"]
    assert len(fit["token_shape"]) == 2 and all(isinstance(v, int) for v in fit["token_shape"])
    assert fit["model_key"] == ROI and fit["model_version"] >= 1


@pytest.mark.slow
def test_calibrate_dataset_reply(trained: dict[str, Any]) -> None:
    calib = trained["calib"]
    assert {"status", "threshold", "score_percentile", "area_mm2_thr", "n_ok", "n_ng", "request_id",
            "recipe_id", "role_id", "roi_id", "model_key"} <= set(calib)
    assert isinstance(calib["threshold"], float) and calib["threshold"] > 0
    assert (calib["n_ok"], calib["n_ng"]) == (6, 2)
    assert calib["model_key"] == calib["roi_id"] == ROI


@pytest.mark.slow
def test_state_after_training(gui: Gui, trained: dict[str, Any]) -> None:
    body = gui.get("/state", role_id=ROLE, roi_id=ROI, model_key=ROI).json()
    assert body["memory_fitted"] is True and body["calib_present"] is True
    assert (body["role_id"], body["roi_id"], body["model_key"]) == (ROLE, ROI, ROI)
    assert {"status", "request_id", "recipe_id"} <= set(body)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.slow
def test_infer_each_shape_kind(gui: Gui, trained: dict[str, Any], images: dict[str, list[bytes]],
                               kind: str) -> None:
    good = gui.infer(images["good"][0], shape=SHAPES[kind])
    bad = gui.infer(images["broken_large"][1], shape=SHAPES[kind])
    assert good.status_code == 200 and bad.status_code == 200, (good.text, bad.text)
    g, b = good.json(), bad.json()
    for body in (g, b):
        assert body["threshold"] == pytest.approx(trained["calib"]["threshold"])
        assert body["decision"] in ("ok", "ng")
        assert body["image_shape"] == [SIDE, SIDE] and len(body["token_shape"]) == 2
        assert isinstance(body["model_version"], int) and "recipe_id" in body
        assert "heatmap_raw" not in body
        heat = cv2.imdecode(np.frombuffer(base64.b64decode(body["heatmap_png_base64"]), np.uint8),
                            cv2.IMREAD_UNCHANGED)
        assert heat.shape[:2] == (SIDE, SIDE)
        for reg in body["regions"]:
            assert reg["bbox"] == [reg["x"], reg["y"], reg["w"], reg["h"]]
            assert reg["area_mm2"] == pytest.approx(reg["area_px"] * MM * MM)
            assert 0 <= reg["x"] and reg["x"] + reg["w"] <= SIDE
            assert {"centroid", "max_score", "mean_score", "contour"} <= set(reg)
    assert b["score"] > g["score"]
    assert b["decision"] == "ng" and b["regions"]


@pytest.mark.slow
def test_infer_without_shape_means_whole_image(gui: Gui, trained: dict[str, Any],
                                               images: dict[str, list[bytes]]) -> None:
    whole = gui.infer(images["broken_large"][1]).json()
    rect = gui.infer(images["broken_large"][1], shape=SHAPES["rect"]).json()
    assert whole["score"] == pytest.approx(rect["score"])


@pytest.mark.slow
def test_infer_dataset(gui: Gui, trained: dict[str, Any]) -> None:
    r = gui.post_json("/infer_dataset", {"role_id": ROLE, "roi_id": ROI, "include_heatmap": True,
                                         "default_mm_per_px": MM})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] and body["n_total"] == len(trained["samples"]) and body["n_errors"] == 0
    for item in body["items"]:
        assert {"label", "filename", "mm_per_px", "score", "threshold", "regions", "n_regions",
                "heatmap_png_base64", "error"} <= set(item)
        assert item["error"] is None and isinstance(item["heatmap_png_base64"], str)
        assert item["n_regions"] == len(item["regions"])
    scores = {item["filename"]: item["score"] for item in body["items"]}
    assert scores["ng_broken.png"] > max(v for k, v in scores.items() if k.startswith("ok_"))


@pytest.mark.slow
def test_dataset_list_file_meta_delete(gui: Gui, trained: dict[str, Any], images: dict[str, list[bytes]]) -> None:
    listing = gui.get("/datasets/list", role_id=ROLE, roi_id=ROI).json()["classes"]
    assert listing["ok"]["count"] == 6 and listing["ng"]["count"] == 2
    assert "ng_broken.png" in listing["ng"]["files"] and listing["ng"]["meta"]["ng_broken.png"] is True
    q = {"role_id": ROLE, "roi_id": ROI, "label": "ng", "filename": "ng_broken.png"}
    f = gui.get("/datasets/file", **q)
    assert f.status_code == 200 and f.headers["content-type"] == "image/png"
    assert f.content == images["broken_large"][0]
    meta = gui.get("/datasets/meta", **q).json()
    assert meta["filename"] == "ng_broken.png" and meta["mm_per_px"] == MM and meta["label"] == "ng"
    # a sample added and removed again leaves the trained set as it was
    extra = gui.form("/datasets/ok/upload", [("role_id", ROLE), ("roi_id", ROI)],
                     [("images", "tmp.png", images["good"][1])],
                     [("metas", json.dumps({"filename": "tmp.png", "label": "ok", "mm_per_px": MM}))])
    assert extra.status_code == 200 and extra.json()["filename"] == "tmp.png"
    assert gui.delete("/datasets/file", role_id=ROLE, roi_id=ROI, label="ok", filename="tmp.png").status_code == 200
    assert_error(gui.get("/datasets/file", role_id=ROLE, roi_id=ROI, label="ok", filename="tmp.png"),
                 404, "sample_not_found")


def test_dataset_clear_one_class(gui: Gui, images: dict[str, list[bytes]]) -> None:
    for i in range(2):
        gui.form("/datasets/ng/upload", [("role_id", ROLE), ("roi_id", "scratch")],
                 [("images", f"n{i}.png", images["good"][0])])
    r = gui.delete("/datasets/clear", role_id=ROLE, roi_id="scratch", label="ng")
    assert r.status_code == 200 and r.json()["removed"] >= 2
    assert gui.get("/datasets/list", role_id=ROLE, roi_id="scratch").json()["classes"]["ng"]["count"] == 0


@pytest.mark.parametrize("expect_continue", [False, True], ids=["plain", "expect-100"])
@pytest.mark.slow
def test_dotnet_request_over_a_raw_socket(server: HttpServer, trained: dict[str, Any],
                                          images: dict[str, list[bytes]], expect_continue: bool) -> None:
    ctype, body = dotnet_multipart(
        [("role_id", ROLE), ("roi_id", ROI), ("mm_per_px", "0.1"), ("model_key", ROI),
         ("shape", json.dumps(SHAPES["circle"]))], [("image", "x.png", images["broken_large"][1])])
    rid = str(uuid.uuid4())
    head = (f"POST /infer HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Request-Id: {rid}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            + ("Expect: 100-continue\r\n" if expect_continue else "") + "\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head)
        if expect_continue:   # .NET Framework's default: wait for the go-ahead before the body
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):
                interim += sock.recv(1)
            assert interim.startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    assert f"x-request-id: {rid}".encode() in reply.lower()
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 200"), reply[:500]
    data = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert data["decision"] == "ng" and data["threshold"] is not None


# ---------------------------------------------------------------- brief-style calls and raw scoring

@pytest.fixture(scope="module")
def uncalibrated(server: HttpServer, images: dict[str, list[bytes]]) -> dict[str, Any]:
    """The brief's /fit_ok with standard multipart: two parts named images, one named images[]."""
    files = [("images", ("a.png", images["train"][0], "image/png")),
             ("images", ("b.png", images["train"][1], "image/png")),
             ("images[]", ("c.png", images["train"][2], "image/png"))]
    r = httpx.post(f"{server.url}/fit_ok", timeout=120, files=files,
                   data={"role_id": ROLE, "roi_id": "raw", "mm_per_px": "0.1", "operator_id": "op7"})
    assert r.status_code == 200, r.text
    assert r.json()["n_images"] == 3
    return r.json()


@pytest.mark.slow
def test_uncalibrated_infer_is_428_unless_raw_scoring_is_asked(gui: Gui, uncalibrated: dict[str, Any],
                                                               images: dict[str, list[bytes]]) -> None:
    body = assert_error(gui.infer(images["good"][0], roi="raw"), 428, "calibration_missing")
    assert "calibration_missing" in body["error"]
    raw = gui.infer(images["broken_large"][0], roi="raw", extra=[("allow_uncalibrated", "true")])
    assert raw.status_code == 200, raw.text
    data = raw.json()
    assert data["threshold"] is None and data["decision"] is None
    assert data["score"] > 0 and isinstance(data["heatmap_png_base64"], str)


@pytest.mark.slow
def test_raw_map_only_when_asked(gui: Gui, uncalibrated: dict[str, Any], images: dict[str, list[bytes]]) -> None:
    data = gui.infer(images["good"][0], roi="raw",
                     extra=[("allow_uncalibrated", "true"), ("heatmap", "float32")]).json()
    raw = data["heatmap_raw"]
    arr = np.frombuffer(base64.b64decode(raw["data_base64"]), dtype=raw["dtype"]).reshape(raw["shape"])
    assert arr.shape == (SIDE, SIDE) and np.isfinite(arr).all()


@pytest.mark.slow
def test_calibrate_ng_then_infer(gui: Gui, uncalibrated: dict[str, Any], images: dict[str, list[bytes]]) -> None:
    ng = gui.infer(images["broken_large"][0], roi="raw", extra=[("allow_uncalibrated", "true")]).json()["score"]
    r = gui.post_json("/calibrate_ng", {"role_id": ROLE, "roi_id": "raw", "model_key": "raw", "mm_per_px": MM,
                                        "ok_scores": uncalibrated["ok_scores"], "ng_scores": [ng],
                                        "area_mm2_thr": 1.0, "score_percentile": 99})
    assert r.status_code == 200, r.text
    calib = r.json()
    assert {"threshold", "ok_mean", "ng_mean", "score_percentile", "area_mm2_thr"} <= set(calib)
    assert max(uncalibrated["ok_scores"]) < calib["threshold"] < ng
    only_ok = gui.post_json("/calibrate_ng", {"role_id": ROLE, "roi_id": "raw", "mm_per_px": MM,
                                              "ok_scores": uncalibrated["ok_scores"], "ng_scores": None,
                                              "area_mm2_thr": 1.0, "score_percentile": 99})
    assert only_ok.status_code == 200 and only_ok.json()["ng_mean"] is None
    assert gui.infer(images["good"][0], roi="raw").json()["threshold"] == pytest.approx(only_ok.json()["threshold"])


# ---------------------------------------------------------------- recipes

@pytest.mark.slow
def test_recipe_from_header_form_and_query(server: HttpServer, images: dict[str, list[bytes]]) -> None:
    with Gui(server.url, recipe="R-42") as gui, Gui(server.url) as plain:
        r = gui.form("/fit_ok", [("role_id", ROLE), ("roi_id", "rcp"), ("mm_per_px", "0.1")],
                     [("images", f"{i}.png", img) for i, img in enumerate(images["train"][:2])])
        assert r.status_code == 200 and r.json()["recipe_id"] == "R-42"
        assert gui.get("/state", role_id=ROLE, roi_id="rcp").json()["memory_fitted"] is True
        assert plain.get("/state", role_id=ROLE, roi_id="rcp").json()["memory_fitted"] is False
        by_query = plain.get("/state", role_id=ROLE, roi_id="rcp", recipe_id="R-42").json()
        assert by_query["memory_fitted"] is True and by_query["recipe_id"] == "R-42"
        by_form = plain.infer(images["good"][0], roi="rcp",
                              extra=[("recipe_id", "R-42"), ("allow_uncalibrated", "true")])
        assert by_form.status_code == 200 and by_form.json()["recipe_id"] == "R-42"


def test_reserved_recipe_is_400(server: HttpServer, images: dict[str, list[bytes]]) -> None:
    with Gui(server.url, recipe="last") as gui:
        assert_error(gui.infer(images["good"][0]), 400, "reserved_recipe")


# ---------------------------------------------------------------- errors of the brief's section 7

def test_model_missing_is_404_with_gui_wording(gui: Gui, images: dict[str, list[bytes]]) -> None:
    body = assert_error(gui.infer(images["good"][0], roi="never_fitted"), 404, "model_not_found")
    assert "memory not found" in body["error"] and "run /fit_ok first" in body["error"]


@pytest.mark.slow
def test_mm_per_px_mismatch_is_409(gui: Gui, trained: dict[str, Any], images: dict[str, list[bytes]]) -> None:
    assert_error(gui.infer(images["good"][0], mm=0.25), 409, "mm_per_px_mismatch")


@pytest.mark.parametrize("shape", [
    '{"kind": "rect", "x": 0, "y": 0, "w": 500, "h": 500}',
    '{"kind": "hexagon", "r": 3}',
    "not json",
    '{"kind": "annulus", "cx": 112, "cy": 112, "r": 50, "r_inner": 80}',
])
@pytest.mark.slow
def test_bad_shape_is_400(gui: Gui, trained: dict[str, Any], images: dict[str, list[bytes]], shape: str) -> None:
    assert_error(gui.infer(images["good"][0], shape=shape), 400, "invalid_shape")


@pytest.mark.slow
def test_bad_image_is_400(gui: Gui, trained: dict[str, Any]) -> None:
    assert_error(gui.infer(b"this is not an image"), 400, "invalid_image")


def test_bad_metas_is_400(gui: Gui, images: dict[str, list[bytes]]) -> None:
    r = gui.form("/datasets/ok/upload", [("role_id", ROLE), ("roi_id", ROI)],
                 [("images", "m.png", images["good"][0])], [("metas", "{not json")])
    assert_error(r, 400, "invalid_input")


def test_missing_field_is_422(gui: Gui, images: dict[str, list[bytes]]) -> None:
    r = gui.form("/infer", [("roi_id", ROI), ("mm_per_px", "0.1")], [("image", "x.png", images["good"][0])])
    body = assert_error(r, 422, "validation_error")
    assert "role_id" in body["error"]
    assert_error(gui.post_json("/calibrate_ng", {"role_id": ROLE}), 422, "validation_error")


def test_size_limits_are_413(engine: Engine, tmp_path: Path, images: dict[str, list[bytes]]) -> None:
    # (a declared body over max_request_bytes is refused before reading: tests/test_http_server.py)
    # the door refuses uploads over the engine's limits before reading them
    limited = Engine(Settings(data_root=tmp_path, backbone="efficientnet_lite0", input_size=SIDE, device="cpu",
                              max_image_bytes=150_000, max_fit_images=2))   # bottle PNGs are ~65 kB
    srv = _serve(limited, tmp_path)
    try:
        with Gui(srv.url) as gui:
            big = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
            big_png = png_bytes(big)                                   # noise barely compresses: ~270 kB
            assert "limit is 150000" in assert_error(gui.infer(big_png), 413, "payload_too_large")["error"]
            three = [("images", f"{i}.png", images["train"][i]) for i in range(3)]
            r = gui.form("/fit_ok", [("role_id", ROLE), ("roi_id", "lim"), ("mm_per_px", "0.1")], three)
            assert "3 images" in assert_error(r, 413, "payload_too_large")["error"]
    finally:
        srv.stop()
        limited.close()


def test_api_key_on_real_calls(engine: Engine, tmp_path: Path, images: dict[str, list[bytes]]) -> None:
    srv = _serve(engine, tmp_path, api_key="plant-secret")
    try:
        with Gui(srv.url) as anonymous, Gui(srv.url, api_key="guess") as wrong, \
                Gui(srv.url, api_key="plant-secret") as keyed:
            assert_error(anonymous.get("/health"), 401, "unauthorized")
            assert_error(wrong.infer(images["good"][0]), 401, "unauthorized")
            assert keyed.get("/health").status_code == 200
    finally:
        srv.stop()


def test_request_id_is_generated_when_absent(server: HttpServer) -> None:
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert len(rid) == 32 and int(rid, 16) >= 0 and r.json()["request_id"] == rid


@pytest.mark.slow
def test_stop_lets_a_running_request_finish(engine: Engine, tmp_path: Path, images: dict[str, list[bytes]]) -> None:
    srv = _serve(engine, tmp_path)
    result: dict[str, Any] = {}

    def fit() -> None:
        with Gui(srv.url) as gui:
            result["r"] = gui.form("/fit_ok", [("role_id", ROLE), ("roi_id", "drain"), ("mm_per_px", "0.1")],
                                   [("images", f"{i}.png", img) for i, img in enumerate(images["train"])])

    worker = threading.Thread(target=fit)
    worker.start()
    deadline = time.monotonic() + 30
    while not srv_busy(srv) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert srv_busy(srv), "the fit request never reached the server"
    srv.stop(timeout=30)
    worker.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["n_images"] == 6


def srv_busy(srv: HttpServer) -> bool:
    """True once the server has a request in progress (uvicorn's own bookkeeping)."""
    server = srv._server   # noqa: SLF001 - test-only peek at the running uvicorn server
    return server is not None and any(task for task in server.server_state.tasks)


@pytest.mark.slow
def test_infer_batch_scores_like_single_infers(gui: Gui, trained: dict[str, Any],
                                               images: dict[str, list[bytes]]) -> None:
    items = [{"roi_id": ROI, "mm_per_px": MM, "shape": SHAPES["circle"]},
             {"roi_id": ROI, "mm_per_px": MM},
             {"roi_id": "no_such_roi", "mm_per_px": MM}]
    parts = [("images", f"{i}.png", img) for i, img in
             enumerate([images["good"][0], images["broken_large"][1], images["good"][0]])]
    r = gui.form("/infer_batch", [("role_id", ROLE), ("items", json.dumps(items))], parts)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["n_total"], body["n_errors"]) == (3, 1)
    first, second, third = body["items"]
    single = gui.infer(images["good"][0], shape=SHAPES["circle"]).json()
    assert first["result"]["score"] == pytest.approx(single["score"], abs=1e-4)
    assert second["result"]["decision"] == "ng"
    assert third["result"] is None and third["error"]["status"] == 404
    mismatch = gui.form("/infer_batch", [("role_id", ROLE), ("items", json.dumps(items[:1]))], parts)
    assert_error(mismatch, 400, "invalid_input")

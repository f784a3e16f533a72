"""Bad input on both doors: each case gets its documented answer, and both doors stay healthy.

One engine (EfficientNet-Lite0 at 64 px, ROI ``a`` fitted on 64x64 images and calibrated) behind
the ZeroMQ door and the REST shim. After every test an autouse fixture calls ``health`` on both
doors. The table of cases and answers is in docs/reliability.md.
"""

from __future__ import annotations

import io
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import msgpack
import numpy as np
import pytest
from PIL import Image

import http_compat.middleware
from engine.api import Engine
from engine.errors import InvalidImage, InvalidInput
from engine.images import decode_image
from http_compat.server import HttpServer
from tests.support import Doors, door_settings, noise, png_bytes, png_header_only

ROLE, ROI, MM, SIDE = "cam1", "a", 0.1, 64


# --- images --------------------------------------------------------------------------------------

def _pil(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


GOOD_PNG = png_bytes(noise(SIDE))
GOOD_TIFF = _pil(Image.fromarray(noise(SIDE)), "TIFF")
REJECTED_IMAGES: dict[str, tuple[bytes, int, str]] = {
    "zero_bytes": (b"", 400, "invalid_image"),
    "truncated_png": (GOOD_PNG[: len(GOOD_PNG) // 2], 400, "invalid_image"),
    "not_an_image": (b"%PDF-1.4 definitely not pixels" * 10, 400, "invalid_image"),
    "gif": (_pil(Image.new("RGB", (SIDE, SIDE)), "GIF"), 400, "invalid_image"),
    "tiff_header_only": (GOOD_TIFF[:8], 400, "invalid_image"),
    "one_pixel": (png_bytes(noise(1)), 400, "invalid_image"),
    "30000x30000_png": (png_header_only(30000, 30000), 413, "payload_too_large"),
}
ACCEPTED_IMAGES: dict[str, bytes] = {
    "png_16bit_rgb": png_bytes(noise(SIDE).astype(np.uint16) * 257),
    "png_16bit_gray": png_bytes(noise(SIDE)[:, :, 0].astype(np.uint16) * 257),
    "png_rgba": png_bytes(np.dstack([noise(SIDE), np.full((SIDE, SIDE), 200, np.uint8)])),
    "png_gray": png_bytes(noise(SIDE)[:, :, 0]),
    "png_palette": _pil(Image.fromarray(noise(SIDE)).convert("P"), "PNG"),
    "jpeg_cmyk": _pil(Image.fromarray(noise(SIDE)).convert("CMYK"), "JPEG"),
    "jpeg_gray": _pil(Image.fromarray(noise(SIDE)[:, :, 0]), "JPEG"),
    "bmp": _pil(Image.fromarray(noise(SIDE)), "BMP"),
    "tiff": _pil(Image.fromarray(noise(SIDE)), "TIFF"),
}


# --- the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doors]:
    settings = door_settings(tmp_path_factory.mktemp("bad_input"))
    engine = Engine(settings.engine)
    engine.fit_ok(ROLE, ROI, MM, [png_bytes(noise(SIDE, seed=s)) for s in range(4)])
    engine.calibrate_ng(ROLE, ROI, MM, [1.0, 2.0])
    d = Doors(engine, settings, timeout=60)
    yield d
    d.close()
    engine.close()


@pytest.fixture(autouse=True)
def _healthy_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "doors" in request.fixturenames:
        request.getfixturevalue("doors").assert_healthy()


def _zmq_infer(**changes: Any) -> dict[str, Any]:
    return {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "image": GOOD_PNG, **changes}


def _http_infer(image: bytes = GOOD_PNG, **fields: str) -> dict[str, Any]:
    data = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM), **fields}
    return {"data": data, "files": {"image": ("roi.png", image, "application/octet-stream")}}


# --- images --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(REJECTED_IMAGES))
def test_rejected_image(doors: Doors, case: str) -> None:
    image, status, code = REJECTED_IMAGES[case]
    start = time.perf_counter()
    assert doors.zmq_answer("infer", _zmq_infer(image=image)) == (status, code)
    got, body = doors.http_answer("POST", "/infer", **_http_infer(image))
    assert (got, body["code"]) == (status, code), body
    assert time.perf_counter() - start < 10     # the 30000x30000 PNG is refused from its header
    # in a fit too: the whole fit is refused and names the image; the stored model is untouched
    version = doors.engine.state(ROLE, ROI).model_version
    fit = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "images": [GOOD_PNG, image]}
    assert doors.zmq_answer("fit_ok", fit) == (status, code)
    assert doors.engine.state(ROLE, ROI).model_version == version


def test_corrupt_tiff_warnings_stay_inside_the_decoder() -> None:
    """Regression: Pillow's "Corrupt EXIF data" UserWarning escaped decode_image (an exception under
    -W error, so 500 internal_error on the doors; noise on stderr otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidImage):
            decode_image(GOOD_TIFF[:8], 10_000)


@pytest.mark.parametrize("case", list(ACCEPTED_IMAGES))
def test_accepted_image_layouts(doors: Doors, case: str) -> None:
    image = ACCEPTED_IMAGES[case]
    status, result = doors.zmq_answer("infer", _zmq_infer(image=image))
    assert status == 200 and isinstance(result, dict) and result["image_shape"] == [SIDE, SIDE], result
    got, body = doors.http_answer("POST", "/infer", **_http_infer(image))
    assert got == 200 and body["score"] == pytest.approx(result["score"]), body


def test_other_image_size_is_scored_on_its_own_grid(doors: Doors) -> None:
    """A ROI of another size than the fit's: resized to the model's input, map upsampled to its own size."""
    image = png_bytes(noise(80, 100))                               # H 80, W 100
    status, result = doors.zmq_answer("infer", _zmq_infer(image=image, heatmap="uint8"))
    assert status == 200 and isinstance(result, dict)
    assert result["image_shape"] == [80, 100] and result["heatmap_raw"]["shape"] == [80, 100]
    assert result["token_shape"] == [SIDE // 8, SIDE // 8]
    got, body = doors.http_answer("POST", "/infer", **_http_infer(image, heatmap="uint8"))
    assert got == 200 and body["heatmap_raw"]["shape"] == [80, 100]
    heatmap = np.frombuffer(doors.engine.infer(ROLE, ROI, MM, image).heatmap_png or b"", np.uint8)
    assert cv2.imdecode(heatmap, cv2.IMREAD_UNCHANGED).shape == (80, 100)


# --- numbers and shapes --------------------------------------------------------------------------

@pytest.mark.parametrize(("zmq_value", "http_value", "zmq_answer", "http_answer"), [
    (float("nan"), "nan", (400, "invalid_input"), (400, "invalid_input")),
    (float("inf"), "inf", (400, "invalid_input"), (400, "invalid_input")),
    (float("-inf"), "1e400", (400, "invalid_input"), (400, "invalid_input")),
    (-0.1, "-0.1", (400, "invalid_input"), (400, "invalid_input")),
    (0.0, "0", (400, "invalid_input"), (400, "invalid_input")),
    ("0.1", "abc", (400, "invalid_args"), (422, "validation_error")),
    (True, "", (400, "invalid_args"), (422, "validation_error")),
    (0.2, "0.2", (409, "mm_per_px_mismatch"), (409, "mm_per_px_mismatch")),
])
def test_bad_mm_per_px(doors: Doors, zmq_value: Any, http_value: str, zmq_answer: tuple[int, str],
                       http_answer: tuple[int, str]) -> None:
    assert doors.zmq_answer("infer", _zmq_infer(mm_per_px=zmq_value)) == zmq_answer
    status, body = doors.http_answer("POST", "/infer", **_http_infer(mm_per_px=http_value))
    assert (status, body["code"]) == http_answer, body


BAD_SHAPES = {
    "invalid_json": '{"kind": "circle", "cx": ',
    "not_an_object": "[1, 2, 3]",
    "unknown_kind": '{"kind": "hexagon", "cx": 10, "cy": 10, "r": 5}',
    "missing_field": '{"kind": "circle", "cx": 10, "cy": 10}',
    "text_number": '{"kind": "circle", "cx": "ten", "cy": 10, "r": 5}',
    "rect_out_of_bounds": '{"kind": "rect", "x": 0, "y": 0, "w": 500, "h": 10}',
    "circle_out_of_bounds": '{"kind": "circle", "cx": 32, "cy": 32, "r": 100}',
    "annulus_r_inner_ge_r": '{"kind": "annulus", "cx": 32, "cy": 32, "r": 10, "r_inner": 10}',
    "nan_value": '{"kind": "circle", "cx": NaN, "cy": 32, "r": 5}',
    "covers_no_pixel": '{"kind": "rect", "x": 10, "y": 10, "w": 0.1, "h": 0.1}',
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_bad_shape_is_400_invalid_shape(doors: Doors, case: str) -> None:
    shape = BAD_SHAPES[case]
    assert doors.zmq_answer("infer", _zmq_infer(shape=shape)) == (400, "invalid_shape")
    status, body = doors.http_answer("POST", "/infer", **_http_infer(shape=shape))
    assert (status, body["code"]) == (400, "invalid_shape"), body


def test_shape_as_a_map_on_the_zmq_door(doors: Doors) -> None:
    bad = {"kind": "annulus", "cx": 32, "cy": 32, "r": 5, "r_inner": 9}
    assert doors.zmq_answer("infer", _zmq_infer(shape=bad)) == (400, "invalid_shape")
    status, result = doors.zmq_answer("infer", _zmq_infer(shape={"kind": "circle", "cx": 32, "cy": 32, "r": 20}))
    assert status == 200


def test_int_beyond_float_range_is_400(doors: Doors) -> None:
    """Regression: math.isfinite raised OverflowError on an int beyond the float range (engine API)."""
    with pytest.raises(InvalidInput):
        doors.engine.calibrate_ng(ROLE, ROI, MM, [1.0], area_mm2_thr=10**400)
    with pytest.raises(InvalidInput):
        doors.engine.infer(ROLE, ROI, 10**400, GOOD_PNG)
    status, body = doors.http_answer("POST", "/calibrate_ng", content=(
        b'{"role_id": "cam1", "roi_id": "a", "mm_per_px": 0.1, "ok_scores": [1], "area_mm2_thr": 1' + b"0" * 400
        + b"}"), headers={"Content-Type": "application/json"})
    assert status in (400, 422), body


# --- ids -----------------------------------------------------------------------------------------

BAD_IDS = {
    "dotdot_slash": "../x", "dotdot": "..", "slash": "a/b", "backslash": "a\\b", "nul": "a\x00b",
    "long_10k": "r" * 10_000, "unicode": "caméra", "emoji": "cam\U0001f4f7", "absolute": "/etc",
    "windows_device": "con", "trailing_dot": "cam.", "leading_dash": "-cam", "newline": "cam\n1",
}


@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_role_id_is_400_invalid_id(doors: Doors, case: str) -> None:
    bad = BAD_IDS[case]
    assert doors.zmq_answer("infer", _zmq_infer(role_id=bad)) == (400, "invalid_id")
    assert doors.zmq_answer("state", {"role_id": ROLE, "roi_id": bad}) == (400, "invalid_id")
    status, body = doors.http_answer("POST", "/infer", **_http_infer(role_id=bad))
    assert (status, body["code"]) == (400, "invalid_id"), body
    status, body = doors.http_answer("GET", "/state", params={"role_id": ROLE, "roi_id": bad})
    assert (status, body["code"]) == (400, "invalid_id"), body


def test_bad_recipe_id_is_400_on_both_doors(doors: Doors) -> None:
    assert doors.zmq_answer("state", {"role_id": ROLE, "roi_id": ROI, "recipe_id": "../up"}) == (400, "invalid_id")
    status, body = doors.http_answer("GET", "/state", params={"role_id": ROLE, "roi_id": ROI},
                                     headers={"X-Recipe-Id": "..\\up"})
    assert (status, body["code"]) == (400, "invalid_id")


# --- the ZeroMQ door: messages -------------------------------------------------------------------

def _req(op: str, args: Any, **top: Any) -> bytes:
    return msgpack.packb({"v": 1, "op": op, "id": "t", "args": args, **top}, use_bin_type=True)


@pytest.mark.parametrize(("payload", "status", "code"), [
    (_req("infer", {**_zmq_infer(), "role_id": 7}), 400, "invalid_args"),
    (_req("infer", {**_zmq_infer(), "image": 12345}), 400, "invalid_args"),
    (_req("infer", {**_zmq_infer(), "heatmap": "jpeg"}), 400, "invalid_args"),
    (_req("infer", {**_zmq_infer(), "bogus": 1}), 400, "invalid_args"),
    (_req("fit_ok", {"role_id": ROLE, "roi_id": "n", "mm_per_px": MM, "images": GOOD_PNG}), 400, "invalid_args"),
    (_req("calibrate_ng", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "ok_scores": "1,2"}), 400,
     "invalid_args"),
    (_req("infer", [1, 2, 3]), 400, "invalid_args"),
    (_req("infer", {"role_id": ROLE}), 400, "invalid_args"),
    (_req("rm_rf", {}), 400, "unknown_op"),
    (_req("__init__", {}), 400, "unknown_op"),
    (_req("infer", {}, id={"nested": 1}), 400, "malformed_message"),
    (_req("health", {}, v=2), 400, "unsupported_version"),
    (msgpack.packb([1, 2, 3]), 400, "malformed_message"),
    (b"\x91" * 100_000 + b"\xc0", 400, "malformed_message"),                 # nested 100 000 deep
    (b"\xc1garbage", 400, "malformed_message"),
    (_req("health", {}) + b"\x00", 400, "malformed_message"),                # trailing bytes
])
def test_bad_zmq_message_gets_a_refusal(doors: Doors, payload: bytes, status: int, code: str) -> None:
    reply = doors.zmq_raw(payload)
    assert reply is not None, "the server must answer every message it can route a reply to"
    assert reply["ok"] is False and (reply["status"], reply["error"]["code"]) == (status, code), reply


def _nest(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("depth", [200, 1010])
def test_deeply_nested_args(doors: Doors, depth: int) -> None:
    assert doors.zmq_answer("infer", _zmq_infer(shape=_nest(depth))) == (400, "invalid_shape")
    answer = doors.zmq_answer("dataset_upload", {"role_id": ROLE, "roi_id": "nest", "label": "ok",
                                                 "image": GOOD_PNG, "filename": "n.png", "meta": _nest(depth)})
    # shallow enough to store as JSON: stored; deeper: refused before anything is written
    assert answer[0] == 200 if depth == 200 else answer == (400, "invalid_input")


def test_meta_with_binary_is_400_not_500(doors: Doors) -> None:
    """Regression: meta holding msgpack bin failed in json.dumps (500 internal_error)."""
    args = {"role_id": ROLE, "roi_id": "meta", "label": "ok", "image": GOOD_PNG, "filename": "m.png",
            "meta": {"blob": b"\x00\x01"}}
    assert doors.zmq_answer("dataset_upload", args) == (400, "invalid_input")
    assert doors.engine.dataset_list(ROLE, "meta").classes["ok"].count == 0


def test_200_mb_message_is_dropped_and_the_server_lives(doors: Doors) -> None:
    """Above ZMQ_MAXMSGSIZE (128 MiB) libzmq drops the message and the sender's connection."""
    payload = _req("infer", _zmq_infer(image=bytes(200 * 1024 * 1024)))
    replies: list[dict[str, Any] | None] = []
    sender = threading.Thread(target=lambda: replies.append(doors.zmq_raw(payload, timeout_ms=5000)))
    sender.start()
    time.sleep(0.5)
    doors.assert_healthy()                                  # served while the big message is in flight
    sender.join(60)
    assert replies == [None]
    assert doors.zmq_answer("infer", _zmq_infer())[0] == 200


def test_message_over_max_request_bytes_is_413(tmp_path: Path) -> None:
    settings = door_settings(tmp_path, max_request_bytes=1024 * 1024)
    engine = Engine(settings.engine)
    d = Doors(engine, settings, timeout=60)
    try:
        reply = d.zmq_raw(_req("infer", _zmq_infer(image=bytes(2 * 1024 * 1024))))
        assert reply is not None and (reply["status"], reply["error"]["code"]) == (413, "payload_too_large")
        d.assert_healthy()
    finally:
        d.close()
        engine.close()


# --- the HTTP door: requests ---------------------------------------------------------------------

@pytest.mark.parametrize(("path", "kwargs"), [
    ("/infer", {"data": {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.1"}}),                 # no image
    ("/infer", {"data": {"roi_id": ROI, "mm_per_px": "0.1"}, "files": {"image": ("a.png", GOOD_PNG)}}),
    ("/fit_ok", {"data": {"role_id": ROLE, "roi_id": ROI}, "files": {"images": ("a.png", GOOD_PNG)}}),
    ("/calibrate_ng", {"json": {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM}}),             # no ok_scores
    ("/calibrate_ng", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
    ("/calibrate_ng", {"json": {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "ok_scores": "many"}}),
])
def test_missing_or_mistyped_http_fields_are_422(doors: Doors, path: str, kwargs: dict[str, Any]) -> None:
    status, body = doors.http_answer("POST", path, **kwargs)
    assert (status, body["code"]) == (422, "validation_error"), body


def test_fit_without_images_is_400(doors: Doors) -> None:
    status, body = doors.http_answer("POST", "/fit_ok", data={"role_id": ROLE, "roi_id": "x", "mm_per_px": "0.1"})
    assert (status, body["code"]) == (400, "invalid_input")


def test_10000_images_in_one_fit_is_413(doors: Doors) -> None:
    tiny = GOOD_PNG[:64]             # never decoded: the part count is refused while parsing
    files = [("images", (f"{i}.png", tiny, "image/png")) for i in range(10_000)]
    start = time.perf_counter()
    status, body = doors.http_answer("POST", "/fit_ok", data={"role_id": ROLE, "roi_id": "many", "mm_per_px": "0.1"},
                                     files=files)
    assert (status, body["code"]) == (413, "payload_too_large"), body
    assert str(doors.config.engine.max_fit_images + 1) in body["error"]   # stopped at the limit, not at 10 000
    assert time.perf_counter() - start < 30
    assert doors.zmq_answer("fit_ok", {"role_id": ROLE, "roi_id": "many", "mm_per_px": MM,
                                       "images": [tiny] * 10_000}) == (413, "payload_too_large")


def test_deeply_nested_metas_is_400(doors: Doors) -> None:
    """Regression: json.loads hit the recursion limit on a deep ``metas`` part (500 internal_error)."""
    metas = '{"k":' * 5000 + "1" + "}" * 5000
    status, body = doors.http_answer("POST", "/datasets/ok/upload", data={"role_id": ROLE, "roi_id": ROI,
                                                                         "metas": metas},
                                     files={"image": ("x.png", GOOD_PNG, "image/png")})
    assert (status, body["code"]) == (400, "invalid_input"), body


def test_stalled_upload_times_out_with_408(doors: Doors, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Regression: a body that stops arriving held its connection open forever (uvicorn has no body timeout)."""
    monkeypatch.setattr(http_compat.middleware, "BODY_READ_TIMEOUT_S", 1.5)
    server = HttpServer(doors.engine, door_settings(tmp_path).http)
    server.start()
    try:
        head = (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=BB\r\n"
                b"Content-Length: 1000000\r\n\r\n--BB\r\nContent-Disposition: form-data; name=\"role_id\"\r\n\r\n")
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as slow:
            slow.sendall(head)
            start = time.perf_counter()
            with httpx.Client(base_url=server.url, timeout=10) as other:    # others are served meanwhile
                for _ in range(3):
                    assert other.get("/health").status_code == 200
                    files = {"image": ("a.png", GOOD_PNG)}
                    r = other.post("/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.1"}, files=files)
                    assert r.status_code == 200
            reply = b""
            while chunk := slow.recv(65536):          # the server answers, then closes the connection
                reply += chunk
            assert time.perf_counter() - start < 15
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply[:300]
    finally:
        server.stop(timeout=2)

"""The shim's parts that need no engine: error bodies, the request gate, wire models, upload helpers."""

from __future__ import annotations

import inspect
import io
import runpy
from pathlib import Path

import pytest
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.testclient import TestClient
from starlette.datastructures import Headers

import engine.errors as engine_errors
import http_compat.server
from engine.errors import EngineError
from engine.schemas import DatasetItemResult, InferDatasetResult, InferResult
from http_compat.errors import install_error_handlers
from http_compat.middleware import RequestGate
from http_compat.server import is_loopback
from http_compat.uploads import UploadedImages, part_filename
from http_compat.wire import DatasetItemReply, InferDatasetReply, InferReply

ERROR_CLASSES = [
    cls for _, cls in inspect.getmembers(engine_errors, inspect.isclass)
    if issubclass(cls, EngineError)
]


def _app(*, api_key: str | None = None, max_request_bytes: int = 1 << 20, max_files: int = 1000) -> FastAPI:
    """A bare app with the shim's handlers and gate, and routes that fail on purpose."""
    app = FastAPI(form_limits={"max_files": max_files})
    install_error_handlers(app)
    app.add_middleware(RequestGate, api_key=api_key, max_request_bytes=max_request_bytes)
    by_name = {cls.__name__: cls for cls in ERROR_CLASSES}

    @app.get("/raise/{name}")
    def _raise(name: str) -> None:
        raise by_name[name](f"{name} happened")

    @app.get("/crash")
    def _crash() -> None:
        raise RuntimeError("secret internals /home/x/engine.py line 42")

    @app.post("/form")
    def _form(role_id: str = Form(), images: list[UploadFile] = File()) -> dict[str, int]:
        return {"n": len(images)}

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    with TestClient(_app(), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_engine_error_maps_to_its_status_and_code(client: TestClient, cls: type[EngineError]) -> None:
    r = client.get(f"/raise/{cls.__name__}", headers={"X-Request-Id": "req-1"})
    assert r.status_code == cls.status
    body = r.json()
    assert body["code"] == cls.code
    assert body["request_id"] == "req-1" == r.headers["x-request-id"]
    assert f"{cls.__name__} happened" in body["error"]
    assert set(body) == {"error", "code", "request_id"}


def test_model_not_found_message_has_the_gui_phrases(client: TestClient) -> None:
    msg = client.get("/raise/ModelNotFound").json()["error"]
    assert "memory not found" in msg and "run /fit_ok first" in msg


def test_calibration_missing_message_has_the_gui_phrase(client: TestClient) -> None:
    assert "calibration_missing" in client.get("/raise/CalibrationMissing").json()["error"]


def test_unexpected_exception_is_a_500_without_traceback(client: TestClient) -> None:
    r = client.get("/crash")
    assert r.status_code == 500
    assert r.json()["code"] == "internal_error"
    assert "secret" not in r.text and "Traceback" not in r.text
    assert len(r.headers["x-request-id"]) == 32


def test_schema_error_is_422_validation_error(client: TestClient) -> None:
    r = client.post("/form", files=[("images", ("a.png", b"x"))])
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "validation_error"
    assert "role_id" in body["error"]
    assert body["detail"][0]["loc"] == ["body", "role_id"]


def test_unknown_path_and_wrong_method_use_the_error_body(client: TestClient) -> None:
    r = client.get("/nope")
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    r = client.options("/form")
    assert (r.status_code, r.json()["code"]) == (405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_starlette_multipart_limits_answer_413() -> None:
    # Starlette reports "Too many files" as a 400; the shim answers every size limit with 413.
    with TestClient(_app(max_files=2)) as c:
        files = [("images", (f"{i}.png", b"x")) for i in range(3)]
        r = c.post("/form", data={"role_id": "r"}, files=files)
    assert r.status_code == 413
    assert r.json()["code"] == "payload_too_large"


def test_content_length_over_limit_is_413_before_the_body_is_read() -> None:
    with TestClient(_app(max_request_bytes=100)) as c:
        r = c.post("/form", data={"role_id": "r"}, files=[("images", ("a.png", b"x" * 200))])
    assert r.status_code == 413
    assert r.json()["code"] == "payload_too_large"


def test_api_key_is_checked_before_routing() -> None:
    with TestClient(_app(api_key="s3cret")) as c:
        assert c.get("/nope").status_code == 401
        r = c.get("/raise/InvalidInput", headers={"X-API-Key": "wrong"})
        assert (r.status_code, r.json()["code"]) == (401, "unauthorized")
        assert c.get("/raise/InvalidInput", headers={"X-API-Key": "s3cret"}).status_code == 400


@pytest.mark.parametrize("given", ["", "a b", "x" * 129, "id\x7f"])
def test_unusable_client_request_ids_are_replaced(client: TestClient, given: str) -> None:
    r = client.get("/raise/InvalidInput", headers={"X-Request-Id": given})
    rid = r.headers["x-request-id"]
    assert rid != given and len(rid) == 32 and r.json()["request_id"] == rid


def test_infer_reply_carries_every_infer_result_field() -> None:
    # tripwire: a field added to InferResult must be added to the REST reply too
    wire = set(InferReply.model_fields)
    assert set(InferResult.model_fields) - {"heatmap_png", "heatmap_raw"} <= wire
    assert {"heatmap_png_base64", "heatmap_raw", "request_id", "model_key"} <= wire


def test_dataset_replies_carry_every_result_field() -> None:
    assert set(DatasetItemResult.model_fields) - {"heatmap_png"} <= set(DatasetItemReply.model_fields)
    assert set(InferDatasetResult.model_fields) <= set(InferDatasetReply.model_fields)


def test_public_names() -> None:
    # run the package's __init__ itself: an editable install made before http_compat/__init__.py
    # existed imports the package as a namespace, which would skip that file
    ns = runpy.run_path(str(Path(http_compat.server.__file__).with_name("__init__.py")))
    assert ns["__all__"] == ["HttpServer", "HttpSettings", "create_app"]
    assert all(callable(ns[name]) for name in ns["__all__"])


@pytest.mark.parametrize(("host", "local"), [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
    ("0.0.0.0", False), ("192.168.1.10", False), ("::", False), ("plant-pc", False),
])
def test_is_loopback(host: str, local: bool) -> None:
    assert is_loopback(host) is local


def _upload(filename: str, disposition: str | None) -> UploadFile:
    headers = Headers({"content-disposition": disposition} if disposition else {})
    return UploadFile(io.BytesIO(b"img"), filename=filename, headers=headers)


@pytest.mark.parametrize(("filename", "disposition", "expected"), [
    ("x.png", "form-data; name=images; filename=x.png; filename*=utf-8''x.png", "x.png"),
    # .NET puts an RFC 2047 word in filename= and the real name in filename*=
    ("=?utf-8?B?w6kucG5n?=", "form-data; name=images; filename=\"=?utf-8?B?w6kucG5n?=\"; "
                             "filename*=utf-8''%C3%A9.png", "\u00e9.png"),
    ("=?utf-8?B?w6kucG5n?=", None, "\u00e9.png"),
    ("plain.bmp", None, "plain.bmp"),
])
def test_part_filename_prefers_the_rfc2231_name(filename: str, disposition: str | None, expected: str) -> None:
    assert part_filename(_upload(filename, disposition)) == expected


def test_uploaded_images_read_each_part_on_demand() -> None:
    files = [_upload(f"{i}.png", None) for i in range(3)]
    files[1].file = io.BytesIO(b"second")
    seq = UploadedImages(files)
    assert len(seq) == 3 and seq[1] == b"second" and seq[1] == b"second"   # re-readable
    assert seq[0:2] == [b"img", b"second"]

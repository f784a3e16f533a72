"""The existing desktop GUI as a test client: its requests as .NET writes them, the types it reads
replies into, and how it reads errors (shared GUI_CLIENT.md).

* ``dotnet_multipart``: a body as .NET's ``MultipartFormDataContent`` writes it (GUID boundary,
  quoted in the header; unquoted part names; ``text/plain; charset=utf-8`` on text parts;
  ``filename`` and ``filename*`` plus a media type from the extension on file parts).
* ``Gui``: the GUI's HTTP habits (a fresh ``X-Request-Id`` GUID per call, ``X-Recipe-Id``, JSON
  bodies as ``application/json; charset=utf-8``), checking that every reply echoes the request id.
* The DTOs: pydantic mirrors of the GUI's C# reply types, as strict as ``System.Text.Json``:
  a non-nullable number or bool refuses null, an ``int`` refuses 99.0, a number refuses text.
* ``gui_reading``: what the GUI does with an error reply (automatic fit, calibration prompt, or a
  generic dialog), from its phrase lists.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import PurePath
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

__all__ = [
    "CALIBRATION_PHRASES",
    "UNTRAINED_PHRASES",
    "BackendStateInfo",
    "CalibResult",
    "CalibrateDatasetResponse",
    "DatasetListResponse",
    "FitOkResult",
    "Gui",
    "HealthInfo",
    "InferDatasetResponse",
    "InferResult",
    "SampleMetadata",
    "assert_error",
    "dotnet_multipart",
    "gui_reading",
]

TextField = tuple[str, str]
FilePart = tuple[str, str, bytes]         # field name, file name, bytes

_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
                ".tif": "image/tiff", ".tiff": "image/tiff"}

# GUI_CLIENT.md, "How the GUI reads errors": only /infer, only on 400, matched in the error text
UNTRAINED_PHRASES = ("memory not found", "memoria no encontrada", "run /fit_ok first", "run fit first",
                     "fit_ok primero", "ejecuta /fit_ok", "no embeddings", "embeddings not found", "not fitted",
                     "missing fit")
CALIBRATION_PHRASES = ("calibration_missing", "calibration missing", "missing calibration", "no calibration")


# ---------------------------------------------------------------- requests

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
        media = _MEDIA_TYPES.get(PurePath(filename).suffix.lower(), "application/octet-stream")
        out += (f"--{boundary}\r\nContent-Type: {media}\r\nContent-Disposition: form-data; name={name}; "
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

    def infer(self, image: bytes, *, role: str, roi: str, mm: float, shape: dict[str, Any] | str | None = None,
              extra: Sequence[TextField] = (), model_key: bool = True) -> httpx.Response:
        """/infer as the GUI sends it (``model_key=False``: as a client of the brief, without it)."""
        fields = [("role_id", role), ("roi_id", roi), ("mm_per_px", f"{mm}"), *extra]
        if model_key:
            fields.append(("model_key", roi))
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


def gui_reading(r: httpx.Response) -> Literal["ok", "untrained", "calibrate", "error"]:
    """What the GUI makes of an /infer reply: "untrained" (it fits from its dataset and retries),
    "calibrate" (it asks the operator to calibrate), "error" (a generic dialog) or "ok"."""
    if 200 <= r.status_code < 300:
        return "ok"
    try:
        body = r.json()
    except ValueError:
        body = None
    text = r.text
    if isinstance(body, dict):
        error, detail = body.get("error"), body.get("detail")
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail")
        if isinstance(detail, dict):
            detail = detail.get("message") or detail.get("detail")
        text = str(error if error is not None else detail if detail is not None else text)
    text = text.lower()
    if r.status_code != 400:
        return "error"
    if any(phrase in text for phrase in UNTRAINED_PHRASES):
        return "untrained"
    if any(phrase in text for phrase in CALIBRATION_PHRASES):
        return "calibrate"
    return "error"


# ---------------------------------------------------------------- the GUI's reply types

class _Dto(BaseModel):
    # missing and extra fields are fine for System.Text.Json; the types are not
    model_config = ConfigDict(extra="ignore")


class HealthInfo(_Dto):
    status: StrictStr | None = None
    device: StrictStr | None = None
    model: StrictStr | None = None
    version: StrictStr | None = None
    reason: StrictStr | None = None
    request_id: StrictStr | None = None
    recipe_id: StrictStr | None = None


class FitOkResult(_Dto):
    n_embeddings: StrictInt = 0
    coreset_size: StrictInt = 0
    token_shape: list[StrictInt] | None = None


class CalibResult(_Dto):
    threshold: StrictFloat | None = None
    ok_mean: StrictFloat = 0.0
    ng_mean: StrictFloat = 0.0
    score_percentile: StrictFloat = 0.0
    area_mm2_thr: StrictFloat = 0.0


class Region(_Dto):
    x: StrictFloat = 0.0
    y: StrictFloat = 0.0
    w: StrictFloat = 0.0
    h: StrictFloat = 0.0
    area_px: StrictFloat = 0.0
    area_mm2: StrictFloat = 0.0
    bbox: list[StrictFloat] | None = None


class InferResult(_Dto):
    score: StrictFloat = 0.0
    threshold: StrictFloat | None = None
    heatmap_png_base64: StrictStr | None = None
    regions: list[Region] | None = None
    decision: StrictStr | None = None
    request_id: StrictStr | None = None
    recipe_id: StrictStr | None = None


class BackendStateInfo(_Dto):
    memory_fitted: StrictBool = False
    calib_present: StrictBool = False
    status: StrictStr | None = None
    request_id: StrictStr | None = None
    recipe_id: StrictStr | None = None
    role_id: StrictStr | None = None
    roi_id: StrictStr | None = None
    model_key: StrictStr | None = None


class DatasetClass(_Dto):
    count: StrictInt = 0
    files: list[StrictStr] | None = None
    meta: dict[str, StrictBool] | None = None


class DatasetClasses(_Dto):
    ok: DatasetClass | None = None
    ng: DatasetClass | None = None


class DatasetListResponse(_Dto):
    classes: DatasetClasses | None = None


class SampleMetadata(_Dto):
    role_id: StrictStr | None = None
    roi_id: StrictStr | None = None
    label: StrictStr | None = None
    filename: StrictStr | None = None
    angle: StrictFloat | None = None
    timestamp: datetime | None = None
    mm_per_px: StrictFloat = 0.0
    shape_json: Any = None
    created_at_utc: StrictStr | None = None
    source_path: StrictStr | None = None


class CalibrateDatasetResponse(_Dto):
    threshold: StrictFloat = 0.0
    score_percentile: StrictInt = 0
    area_mm2_thr: StrictFloat = 0.0
    n_ok: StrictInt = 0
    n_ng: StrictInt = 0
    status: StrictStr | None = None
    request_id: StrictStr | None = None
    recipe_id: StrictStr | None = None
    role_id: StrictStr | None = None
    roi_id: StrictStr | None = None
    model_key: StrictStr | None = None


class InferDatasetItem(_Dto):
    label: StrictStr | None = None
    filename: StrictStr | None = None
    mm_per_px: StrictFloat | None = None
    score: StrictFloat | None = None
    threshold: StrictFloat | None = None
    regions: list[Region] | None = None
    n_regions: StrictInt = 0
    heatmap_png_base64: StrictStr | None = None
    error: StrictStr | None = None


class InferDatasetResponse(_Dto):
    n_total: StrictInt = 0
    n_errors: StrictInt = 0
    items: list[InferDatasetItem] | None = None

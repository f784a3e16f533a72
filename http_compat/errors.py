"""Every failure becomes ``{"error": message, "code": machine code, "request_id": ...}``.

One handler maps engine errors by their own ``status``/``code``; Starlette's HTTP errors (404 unknown
path, 405 wrong method, 413 body too large) and FastAPI's schema errors (422) get the same body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EngineError

__all__ = ["BodyTimeout", "BodyTooLarge", "door_message", "error_response", "install_error_handlers"]

log = structlog.get_logger("http_compat")

_HTTP_CODES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

# Starlette's multipart parser reports its count/size limits as a 400 with these messages;
# they are "too large" failures, so they answer 413 like every other size limit.
_MULTIPART_LIMITS = ("Too many files", "Too many fields", "Field exceeded maximum size")


class BodyTooLarge(StarletteHTTPException):
    """The request body grew past ``max_request_bytes`` while it was being read."""

    def __init__(self, limit: int) -> None:
        # the rest of the body is never read, so the connection cannot carry another request
        super().__init__(413, f"request body exceeds the {limit} byte limit", headers={"Connection": "close"})


class BodyTimeout(StarletteHTTPException):
    """No chunk of the request body arrived for ``timeout`` seconds (a stalled or slow-loris upload)."""

    def __init__(self, timeout: float) -> None:
        # the rest of the body may still come: the connection cannot carry another request
        super().__init__(408, f"no request body data for {timeout:g} s", headers={"Connection": "close"})


def error_response(
    status: int, code: str, message: str, request_id: str, *,
    headers: Mapping[str, str] | None = None, detail: Sequence[Mapping[str, Any]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "code": code, "request_id": request_id}
    if detail is not None:
        body["detail"] = list(detail)
    return JSONResponse(body, status, headers=dict(headers) if headers else None)


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


# What a client of this door does about an engine error, added to the engine's message. The
# existing GUI matches these texts: "memory not found" + "run /fit_ok first" marks an untrained
# ROI (it then fits from its dataset and retries), "calibration_missing" a missing calibration.
_HINTS: Mapping[str, tuple[str, str]] = {
    "model_not_found": ("memory not found", "run /fit_ok first"),
    "calibration_missing": ("calibration_missing", "run /calibrate_ng or /calibrate_dataset first"),
}


def door_message(exc: EngineError) -> str:
    """The engine's message with this door's hint, the GUI's phrase guaranteed present."""
    msg = str(exc)
    if exc.code not in _HINTS:
        return msg
    phrase, hint = _HINTS[exc.code]
    if phrase not in msg:
        msg = f"{phrase}: {msg}"
    return f"{msg} ({hint})"


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    # status lives on the error class (ModelNotFound 404, CalibrationMissing 428,
    # MmPerPxMismatch 409, InvalidInput 400), so both doors map it the same way
    if exc.status >= 500:
        log.error("engine_error", code=exc.code, method=request.method, path=request.url.path, error=str(exc))
    return error_response(exc.status, exc.code, door_message(exc), _request_id(request))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status, message = exc.status_code, str(exc.detail)
    if status == 400 and message.startswith(_MULTIPART_LIMITS):
        status = 413
    code = _HTTP_CODES.get(status, "http_error")
    return error_response(status, code, message, _request_id(request), headers=exc.headers)


def _issues(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only loc/msg/type: "input" may hold an UploadFile or raw bytes that JSON cannot carry.
    return [
        {"loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
         "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in exc.errors()
    ]


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    issues = _issues(exc)
    summary = "; ".join(f"{'.'.join(str(p) for p in i['loc'])}: {i['msg']}" for i in issues)
    return error_response(422, "validation_error", f"invalid request: {summary}", _request_id(request),
                          detail=issues)


def install_error_handlers(app: FastAPI) -> None:
    """Register the three handlers; anything else is caught by ``RequestGate`` as a 500."""
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

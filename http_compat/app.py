"""``create_app``: the FastAPI application of the REST shim, bound to one engine."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from engine.api import Engine
from http_compat import routes, routes_datasets, routes_lifecycle, routes_monitor
from http_compat.docs import install_offline_docs
from http_compat.errors import install_error_handlers
from http_compat.middleware import GateLimits, RequestGate
from http_compat.settings import HttpSettings

__all__ = ["create_app", "gate_limits"]

_DESCRIPTION = """\
REST door of the inspection engine, compatible with the existing desktop GUI.

* Every reply carries `X-Request-Id` (the client's, else a new one) and, in JSON bodies, `request_id`.
* Errors: `{"error": message, "code": machine code, "request_id": ...}` with 400 bad input,
  401 API key, 403 cross-site request, 404 model or sample missing, 408 request timeout,
  409 mm_per_px mismatch / fit in progress / model changed, 413 too large, 422 schema error,
  428 calibration missing, 500 internal, 503 server busy.
* `Host` must be a loopback name (or a configured one); POST/PUT/PATCH/DELETE from a web page of
  another origin are refused (403 `cross_site_request`).
* A recipe is chosen with the `recipe_id` form/JSON field, the `recipe_id` query parameter or the
  `X-Recipe-Id` header, in that order of precedence.
* Error dialect (`http_error_dialect`, default `auto`): a request that carries `model_key` (the
  existing GUI) gets 400 instead of 404 `model_not_found` and 428 `calibration_missing`.
* `score_percentile` in replies: `/calibrate_dataset` an integer percent (exact value in
  `score_percentile_exact`), `/calibrate_ng` the unit the request used (a percent when absent).
"""


def create_app(engine: Engine, settings: HttpSettings) -> FastAPI:
    """The shim's app; it serves ``engine`` and never builds or closes it."""
    app = FastAPI(
        title="Inspection engine (REST shim)",
        version=_package_version(),
        description=_DESCRIPTION,
        # Starlette's default of 1000 file parts would cut a large fit off with a 400 before the
        # route could answer the configured limit with a 413.
        form_limits={"max_files": engine.settings.max_fit_images + 1},
        docs_url=None, redoc_url=None,     # served from local files by install_offline_docs
    )
    app.state.engine = engine
    app.state.settings = settings
    install_error_handlers(app)
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    app.add_middleware(RequestGate, api_key=key, max_request_bytes=settings.max_request_bytes,
                       limits=gate_limits(engine, settings))
    app.include_router(routes.router)
    app.include_router(routes_datasets.router)
    app.include_router(routes_lifecycle.router)
    app.include_router(routes_monitor.router)
    install_offline_docs(app)
    if key is not None:
        _document_api_key(app)
    return app


def gate_limits(engine: Engine, settings: HttpSettings) -> GateLimits:
    """``RequestGate``'s rules from the door's settings (and the engine's JSON bounds)."""
    return GateLimits(
        allowed_hosts=(*settings.http_allowed_hosts, settings.http_host),
        allowed_origins=tuple(settings.http_allowed_origins),
        body_gap_s=settings.http_body_gap_s, body_timeout_s=settings.http_body_timeout_s,
        max_json_bytes=settings.http_max_json_bytes, max_json_depth=engine.settings.max_json_depth,
        max_json_items=engine.settings.max_json_items,
    )


def _document_api_key(app: FastAPI) -> None:
    """Declare the X-API-Key header in the OpenAPI schema (``RequestGate`` enforces it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            }
            schema["security"] = [{"APIKeyHeader": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("inspection-engine")
    except PackageNotFoundError:
        return "0+unknown"

"""Observability calls: the inspection history, the drift state of a ROI, the normal patch a
region explanation names, and the read-only console page (docs/observability.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from http_compat.console import render_console
from http_compat.deps import EngineDep, RecipeDep, RequestIdDep, bind_model
from http_compat.wire import DriftReply, HistoryReply, error_responses

__all__ = ["router"]

router = APIRouter(responses=error_responses(400, 401, 422, 500))

_RoleQuery = Annotated[str, Query()]
_RoiQuery = Annotated[str, Query()]


@router.get("/history", response_model=HistoryReply, summary="The last inspections of a ROI, newest first")
def history(
    engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep, role_id: _RoleQuery, roi_id: _RoiQuery,
    since: Annotated[float | None, Query(description="Seconds since the epoch (UTC), inclusive.")] = None,
    until: Annotated[float | None, Query(description="Seconds since the epoch (UTC), inclusive.")] = None,
    decision: Annotated[Literal["ok", "ng"] | None, Query()] = None,
    limit: Annotated[int, Query(description="1..1000; page older records with until.")] = 100,
    thumbnails: Annotated[bool, Query(description="true: add the 64-px image (JPEG) and heatmap (PNG) "
                                                  "thumbnails, base64.")] = False,
) -> HistoryReply:
    bind_model(role_id, roi_id)
    res = engine.monitor.history(role_id, roi_id, since, until, decision, limit, thumbnails=thumbnails,
                                 recipe_id=recipe)
    return HistoryReply.of(res, rid)


@router.get("/drift", response_model=DriftReply, responses=error_responses(404),
            summary="Whether a ROI's recent scores drifted from its model's OK scores")
def drift(engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep, role_id: _RoleQuery,
          roi_id: _RoiQuery) -> DriftReply:
    bind_model(role_id, roi_id)
    return DriftReply(**engine.monitor.drift(role_id, roi_id, recipe_id=recipe).model_dump(), request_id=rid)


@router.get("/explain_patch", response_class=Response, responses={
    200: {"content": {"image/png": {}}, "description": "The normal patch with one patch of context around it; "
                                                       "X-Source, X-Source-Box and X-Crop-Box say where it lies."},
    **error_responses(404)}, summary="The normal patch a region explanation names, from its stored sample")
def explain_patch(engine: EngineDep, recipe: RecipeDep, role_id: _RoleQuery, roi_id: _RoiQuery,
                  image_index: Annotated[int, Query()], patch_row: Annotated[int, Query()],
                  patch_col: Annotated[int, Query()]) -> Response:
    bind_model(role_id, roi_id)
    res = engine.monitor.explain_patch(role_id, roi_id, image_index, patch_row, patch_col, recipe_id=recipe)
    headers = {"X-Source": res.source, "X-Source-Box": ",".join(map(str, res.source_box)),
               "X-Crop-Box": ",".join(map(str, res.crop_box)), "X-Model-Version": str(res.model_version)}
    return Response(res.png, media_type="image/png", headers=headers)


@router.get("/console", response_class=HTMLResponse, summary="Read-only console page (offline HTML)")
def console(engine: EngineDep, recipe: RecipeDep) -> HTMLResponse:
    return HTMLResponse(render_console(engine, recipe))

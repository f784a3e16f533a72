"""The brief's four calls (/health, /fit_ok, /calibrate_ng, /infer) and the GUI's model calls.

Each route only translates: form or JSON in, one engine call, the engine's result out as JSON.
Routes are plain ``def`` so FastAPI runs the blocking engine call in its thread pool.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BeforeValidator

from engine.validate import HEATMAP_FORMATS
from http_compat.deps import EngineDep, RecipeDep, RequestIdDep, SettingsDep, bind_model, first_recipe, note_gui_marker
from http_compat.uploads import UploadedImages, collect_images, one_image_part, parse_batch_items
from http_compat.wire import (
    CalibrateNgRequest,
    CalibrationReply,
    DeleteReply,
    FitReply,
    HealthReply,
    InferBatchReply,
    InferReply,
    ModelsReply,
    StateReply,
    error_responses,
)

__all__ = ["decimal_text", "router"]

router = APIRouter(responses=error_responses(401, 413, 422, 500))
# a decimal with optional exponent; nan/inf pass so the engine refuses them as non-finite (400)
_DECIMAL = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?"
                      r"|nan|inf|infinity)\s*", re.IGNORECASE)


def decimal_text(value: object) -> object:
    """A form number as the GUI writes it ('.' decimal, optional exponent): float() would also take
    "0.1_0" (digit grouping) and hex floats, which no client means (422 like any non-number)."""
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise ValueError("must be a decimal number such as 0.25")
    return value


_RoleForm = Annotated[str, Form(description="Inspection role (camera/station) id.")]
_RoiForm = Annotated[str, Form(description="ROI id within the role.")]
_MmForm = Annotated[float, BeforeValidator(decimal_text),
                    Form(description="Millimetres per pixel of the images sent ('.' decimal).")]
_OptForm = Annotated[str | None, Form()]
_RecipeForm = Annotated[str | None, Form(description="Product recipe; overrides query and X-Recipe-Id.")]
_ModelKeyForm = Annotated[str | None, Form(description="Accepted for the GUI; equals roi_id.")]
_RoleQuery = Annotated[str, Query()]
_RoiQuery = Annotated[str, Query()]
# the heatmap format is checked by the engine (400 invalid_input, as on the ZeroMQ door), not by
# the form schema (422), so a bad one is reported like every other fault of the request
_HEATMAPS: dict[str, Any] = {"enum": list(HEATMAP_FORMATS)}


@router.get("/health", response_model=HealthReply, summary="Liveness, device and backbone")
def health(engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep) -> HealthReply:
    return HealthReply(**engine.health().model_dump(), request_id=rid, recipe_id=recipe)


@router.post("/fit_ok", response_model=FitReply, responses=error_responses(400, 409),
             summary="Build the PatchCore memory from OK images (uploaded, or the stored dataset)")
def fit_ok(
    request: Request, engine: EngineDep, settings: SettingsDep, rid: RequestIdDep, recipe: RecipeDep,
    role_id: _RoleForm, roi_id: _RoiForm, mm_per_px: _MmForm,
    images: Annotated[list[UploadFile] | None, File(description="One part per OK image.")] = None,
    images_brackets: Annotated[list[UploadFile] | None, File(alias="images[]", description="Same as images.")] = None,
    operator_id: _OptForm = None,
    memory_fit: Annotated[bool, Form(description="true: keep every patch (no coreset).")] = False,
    use_dataset: Annotated[bool, Form(description="true: train on the stored OK samples.")] = False,
    allow_refit_recalibration: Annotated[bool | None, Form(
        description="A refit of a calibrated model re-derives its threshold (reply: calibration); "
                    "false: the model answers calibration_missing until calibrated. Absent: the setting.")] = None,
    model_key: _ModelKeyForm = None,
    recipe_id: _RecipeForm = None,
) -> FitReply:
    bind_model(role_id, roi_id)
    note_gui_marker(request, model_key)
    files = collect_images(settings, images, images_brackets, max_count=settings.max_fit_images)
    res = engine.fit_ok(
        role_id, roi_id, mm_per_px, UploadedImages(files) if files else None, operator_id=operator_id,
        memory_fit=memory_fit, use_dataset=use_dataset, allow_refit_recalibration=allow_refit_recalibration,
        recipe_id=first_recipe(recipe_id, recipe),
    )
    return FitReply(**res.model_dump(), model_key=res.roi_id, request_id=rid)


@router.post("/calibrate_ng", response_model=CalibrationReply, responses=error_responses(400, 404, 409),
             summary="Set the threshold from OK (and optionally NG) scores")
def calibrate_ng(request: Request, body: CalibrateNgRequest, engine: EngineDep, rid: RequestIdDep,
                 recipe: RecipeDep) -> CalibrationReply:
    bind_model(body.role_id, body.roi_id)
    note_gui_marker(request, body.model_key)
    res = engine.calibrate_ng(
        body.role_id, body.roi_id, body.mm_per_px, body.ok_scores, body.ng_scores,
        body.score_percentile, body.area_mm2_thr, recipe_id=first_recipe(body.recipe_id, recipe),
    )
    return CalibrationReply.of(res, rid, body.score_percentile)


@router.post("/infer", response_model=InferReply, responses=error_responses(400, 404, 409, 428),
             summary="Score one ROI image: score, decision, regions, heatmap", dependencies=[Depends(one_image_part)])
def infer(
    request: Request, engine: EngineDep, settings: SettingsDep, rid: RequestIdDep, recipe: RecipeDep,
    role_id: _RoleForm, roi_id: _RoiForm, mm_per_px: _MmForm,
    image: Annotated[UploadFile, File(description="The ROI crop (PNG, JPEG, BMP, TIFF).")],
    shape: Annotated[str | None, Form(description='Mask as JSON text, e.g. {"kind":"circle","cx":224,'
                                                  '"cy":224,"r":200}; absent = whole image.')] = None,
    operator_id: _OptForm = None,
    model_key: _ModelKeyForm = None,
    allow_uncalibrated: Annotated[bool, Form(description="true: raw score, threshold and decision null, "
                                                         "instead of 428.")] = False,
    heatmap: Annotated[str, Form(description="png (default), uint8/float32 (adds heatmap_raw), none; anything "
                                             "else is 400 invalid_input.", json_schema_extra=_HEATMAPS)] = "png",
    recipe_id: _RecipeForm = None,
    explain: Annotated[bool, Form(description="true: each region gets its nearest normal patch "
                                              "(regions[].explanation).")] = False,
) -> InferReply:
    bind_model(role_id, roi_id)
    note_gui_marker(request, model_key)
    (upload,) = collect_images(settings, [image], max_count=1)
    res = engine.infer(
        role_id, roi_id, mm_per_px, UploadedImages([upload])[0], shape if shape and shape.strip() else None,
        operator_id=operator_id, allow_uncalibrated=allow_uncalibrated, heatmap=heatmap,
        recipe_id=first_recipe(recipe_id, recipe), explain=explain,
    )
    return InferReply.of(res, rid)


@router.post("/infer_batch", response_model=InferBatchReply, responses=error_responses(400),
             summary="Score several ROIs of one part in one backbone call; each item succeeds or fails alone")
def infer_batch(
    engine: EngineDep, settings: SettingsDep, rid: RequestIdDep, recipe: RecipeDep,
    role_id: _RoleForm,
    items: Annotated[str, Form(description='JSON list, one object per image part in order: '
                                           '[{"roi_id": "a", "mm_per_px": 0.1, "shape": {...}?}, ...]')],
    images: Annotated[list[UploadFile], File(description="One ROI crop per item, in the items' order.")],
    allow_uncalibrated: Annotated[bool, Form()] = False,
    heatmap: Annotated[str, Form(description="As for /infer; default none.", json_schema_extra=_HEATMAPS)] = "none",
    recipe_id: _RecipeForm = None,
) -> InferBatchReply:
    bind_model(role_id)
    uploads = UploadedImages(collect_images(settings, images, max_count=settings.max_batch_items))
    specs = parse_batch_items(items, len(uploads), settings)
    batch = [{**spec, "image": uploads[i]} for i, spec in enumerate(specs)]
    res = engine.infer_batch(role_id, batch, allow_uncalibrated=allow_uncalibrated, heatmap=heatmap,
                             recipe_id=first_recipe(recipe_id, recipe))
    return InferBatchReply.of(res, rid)


@router.get("/state", response_model=StateReply, responses=error_responses(400),
            summary="Whether a ROI has a fitted memory and a calibration")
def state(
    request: Request, engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep, role_id: _RoleQuery,
    roi_id: _RoiQuery,
    model_key: Annotated[str | None, Query(description="Accepted for the GUI; equals roi_id.")] = None,
) -> StateReply:
    bind_model(role_id, roi_id)
    note_gui_marker(request, model_key)
    res = engine.state(role_id, roi_id, recipe_id=recipe)
    return StateReply(**res.model_dump(), model_key=res.roi_id, request_id=rid)


@router.get("/manifest", response_model=dict[str, Any], responses=error_responses(400, 404),
            summary="The stored manifest.json of a model, verbatim (request id in the header only)")
def manifest(engine: EngineDep, recipe: RecipeDep, role_id: _RoleQuery, roi_id: _RoiQuery) -> dict[str, Any]:
    bind_model(role_id, roi_id)
    return engine.manifest(role_id, roi_id, recipe_id=recipe)


@router.get("/models", response_model=ModelsReply, summary="Every stored model of a recipe")
def list_models(engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep) -> ModelsReply:
    return ModelsReply(models=tuple(engine.list_models(recipe_id=recipe)), request_id=rid)


@router.delete("/models", response_model=DeleteReply, responses=error_responses(400, 404),
               summary="Delete one stored model")
def delete_model(engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep,
                 role_id: _RoleQuery, roi_id: _RoiQuery) -> DeleteReply:
    bind_model(role_id, roi_id)
    return DeleteReply(**engine.delete_model(role_id, roi_id, recipe_id=recipe).model_dump(), request_id=rid)

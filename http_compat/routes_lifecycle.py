"""Model lifecycle calls (docs/lifecycle.md): kept versions and rollback, adding OK images without a
refit, operator feedback on inspections, and portable model archives. New routes only: none of the
GUI's calls changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BeforeValidator

from engine.errors import InvalidInput
from engine.settings import Settings
from http_compat.deps import EngineDep, RecipeDep, RequestIdDep, SettingsDep, bind_model, first_recipe
from http_compat.routes import decimal_text
from http_compat.uploads import UploadedImages, collect_images
from http_compat.wire import (
    ActivateReply,
    ActivateRequest,
    AddOkReply,
    ImportReply,
    MarkReply,
    VersionsReply,
    error_responses,
)

__all__ = ["router"]

router = APIRouter(responses=error_responses(400, 401, 413, 422, 500))

_RoleForm = Annotated[str, Form(description="Inspection role (camera/station) id.")]
_RoiForm = Annotated[str, Form(description="ROI id within the role.")]
_OptForm = Annotated[str | None, Form()]
_RecipeForm = Annotated[str | None, Form(description="Product recipe; overrides query and X-Recipe-Id.")]
_OptMmForm = Annotated[float | None, BeforeValidator(decimal_text),
                       Form(description="Millimetres per pixel of the image ('.' decimal); absent: the model's.")]
_ShapeForm = Annotated[str | None, Form(description="Mask as JSON text, as for /infer; absent = whole image.")]
_ImageFile = Annotated[UploadFile, File(description="The inspected ROI crop (PNG, JPEG, BMP, TIFF).")]
_RoleQuery = Annotated[str, Query()]
_RoiQuery = Annotated[str, Query()]


@router.get("/versions", response_model=VersionsReply, responses=error_responses(404),
            summary="The kept versions of a model (oldest first) and the one served")
def versions(engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep, role_id: _RoleQuery,
             roi_id: _RoiQuery) -> VersionsReply:
    bind_model(role_id, roi_id)
    return VersionsReply(**engine.lifecycle.versions(role_id, roi_id, recipe_id=recipe).model_dump(), request_id=rid)


@router.post("/activate", response_model=ActivateReply, responses=error_responses(404, 409),
             summary="Serve a kept version (one atomic swap; inferences in flight finish on theirs)")
def activate(body: ActivateRequest, engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep) -> ActivateReply:
    bind_model(body.role_id, body.roi_id)
    res = engine.lifecycle.activate(body.role_id, body.roi_id, body.version,
                                    recipe_id=first_recipe(body.recipe_id, recipe))
    return ActivateReply(**res.model_dump(), request_id=rid)


@router.post("/add_ok", response_model=AddOkReply, responses=error_responses(404, 409),
             summary="Add OK images to a fitted model without a refit (a new version)")
def add_ok(
    engine: EngineDep, settings: SettingsDep, rid: RequestIdDep, recipe: RecipeDep,
    role_id: _RoleForm, roi_id: _RoiForm,
    images: Annotated[list[UploadFile] | None, File(description="One part per OK image.")] = None,
    images_brackets: Annotated[list[UploadFile] | None, File(alias="images[]", description="Same as images.")] = None,
    mm_per_px: _OptMmForm = None, operator_id: _OptForm = None, recipe_id: _RecipeForm = None,
) -> AddOkReply:
    bind_model(role_id, roi_id)
    files = collect_images(settings, images, images_brackets, max_count=settings.max_fit_images)
    res = engine.lifecycle.add_ok(role_id, roi_id, UploadedImages(files), mm_per_px, operator_id=operator_id,
                                  recipe_id=first_recipe(recipe_id, recipe))
    return AddOkReply(**res.model_dump(), request_id=rid)


@router.post("/mark_ok", response_model=MarkReply, responses=error_responses(404, 409),
             summary="An inspection the operator overruled as OK: store it with its provenance and add it")
def mark_ok(engine: EngineDep, settings: SettingsDep, rid: RequestIdDep, recipe: RecipeDep, role_id: _RoleForm,
            roi_id: _RoiForm, image: _ImageFile, mm_per_px: _OptMmForm = None, shape: _ShapeForm = None,
            operator_id: _OptForm = None, recipe_id: _RecipeForm = None) -> MarkReply:
    return _marked(engine.lifecycle.mark_ok, settings, rid, first_recipe(recipe_id, recipe), role_id, roi_id, image,
                   mm_per_px, shape, operator_id)


@router.post("/mark_ng", response_model=MarkReply, responses=error_responses(404, 409),
             summary="A missed defect: store it as an NG sample with its provenance (for the next calibration)")
def mark_ng(engine: EngineDep, settings: SettingsDep, rid: RequestIdDep, recipe: RecipeDep, role_id: _RoleForm,
            roi_id: _RoiForm, image: _ImageFile, mm_per_px: _OptMmForm = None, shape: _ShapeForm = None,
            operator_id: _OptForm = None, recipe_id: _RecipeForm = None) -> MarkReply:
    return _marked(engine.lifecycle.mark_ng, settings, rid, first_recipe(recipe_id, recipe), role_id, roi_id, image,
                   mm_per_px, shape, operator_id)


def _marked(mark: Callable[..., Any], settings: Settings, rid: str, recipe_id: str | None, role_id: str,
            roi_id: str, image: UploadFile, mm_per_px: float | None, shape: str | None,
            operator_id: str | None) -> MarkReply:
    """One ``mark_ok`` / ``mark_ng`` request: the single uploaded image, an empty shape as none."""
    bind_model(role_id, roi_id)
    (upload,) = collect_images(settings, [image], max_count=1)
    res = mark(role_id, roi_id, UploadedImages([upload])[0], mm_per_px, shape if shape and shape.strip() else None,
               operator_id=operator_id, recipe_id=recipe_id)
    return MarkReply(**res.model_dump(), request_id=rid)


@router.get("/export_model", response_class=Response, responses={
    200: {"content": {"application/zip": {}}, "description": "The model archive (zip)."},
    **error_responses(404)}, summary="Download one kept version (default: the served one) as an archive")
def export_model(engine: EngineDep, recipe: RecipeDep, role_id: _RoleQuery, roi_id: _RoiQuery,
                 version: Annotated[int | None, Query(description="A kept version; absent: the served one.")] = None,
                 ) -> Response:
    bind_model(role_id, roi_id)
    res = engine.lifecycle.export_model(role_id, roi_id, version, recipe_id=recipe)
    return Response(res.archive, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{res.filename}"', "X-Model-Version": str(res.version),
        "X-Archive-Sha256": res.sha256})


@router.post("/import_model", response_model=ImportReply, responses=error_responses(409),
             summary="Install an exported archive (verified first) as a new served version")
def import_model(
    engine: EngineDep, settings: SettingsDep, rid: RequestIdDep, recipe: RecipeDep,
    role_id: _RoleForm, roi_id: _RoiForm,
    archive: Annotated[UploadFile, File(description="A file from /export_model.")],
    recipe_id: _RecipeForm = None,
) -> ImportReply:
    bind_model(role_id, roi_id)
    (upload,) = collect_images(settings, [archive], max_count=1)
    data = UploadedImages([upload])[0]
    if not data:
        raise InvalidInput("the archive part is empty")
    res = engine.lifecycle.import_model(role_id, roi_id, data, recipe_id=first_recipe(recipe_id, recipe))
    return ImportReply(**res.model_dump(), request_id=rid)

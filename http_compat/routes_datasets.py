"""The GUI's dataset calls: sample store (upload, list, file, meta, delete, clear) and the two
server-side passes over it (/calibrate_dataset, /infer_dataset)."""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, UploadFile
from fastapi.responses import Response

from engine.errors import InvalidInput
from http_compat.deps import EngineDep, RecipeDep, RequestIdDep, SettingsDep, bind_model, first_recipe
from http_compat.uploads import UploadedImages, collect_images, parse_json_part, part_filename
from http_compat.wire import (
    CalibrateDatasetRequest,
    CalibrationReply,
    DatasetClearReply,
    DatasetListingReply,
    DatasetSampleReply,
    InferDatasetReply,
    InferDatasetRequest,
    error_responses,
)

__all__ = ["router"]

router = APIRouter(responses=error_responses(400, 401, 413, 422, 500))

Label = Literal["ok", "ng"]
_RoleQuery = Annotated[str, Query()]
_RoiQuery = Annotated[str, Query()]
_LabelQuery = Annotated[Label, Query()]
_FilenameQuery = Annotated[str, Query(description="A name from /datasets/list.")]

_MEDIA_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
    ".tif": "image/tiff", ".tiff": "image/tiff",
}


@router.post("/datasets/{label}/upload", response_model=DatasetSampleReply,
             summary="Store one OK or NG sample (one image part and its metadata)")
def dataset_upload(
    engine: EngineDep, settings: SettingsDep, rid: RequestIdDep, recipe: RecipeDep,
    label: Annotated[Label, Path()],
    role_id: Annotated[str, Form()], roi_id: Annotated[str, Form()],
    images: Annotated[list[UploadFile] | None, File(description="Exactly one image part.")] = None,
    images_brackets: Annotated[list[UploadFile] | None, File(alias="images[]", description="Same as images.")] = None,
    image: Annotated[UploadFile | None, File(description="Same as images.")] = None,
    metas: Annotated[str | None, Form(description="Sample metadata as JSON text (application/json part): "
                                                  "label, filename, mm_per_px, shape_json, ...")] = None,
    recipe_id: Annotated[str | None, Form()] = None,
) -> DatasetSampleReply:
    bind_model(role_id, roi_id)
    files = collect_images(settings, images, images_brackets, [image] if image else None,
                           max_count=settings.max_fit_images)
    if len(files) != 1:
        raise InvalidInput(f"a dataset upload takes exactly one image part, got {len(files)}")
    meta = parse_json_part("metas", metas)
    named = meta.get("filename") if meta else None
    filename = named if isinstance(named, str) and named.strip() else part_filename(files[0])
    res = engine.dataset_upload(
        role_id, roi_id, label, UploadedImages(files)[0], filename, meta,
        recipe_id=first_recipe(recipe_id, recipe),
    )
    return DatasetSampleReply(**res.model_dump(), request_id=rid)


@router.get("/datasets/list", response_model=DatasetListingReply, summary="Stored samples per class")
def dataset_list(engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep,
                 role_id: _RoleQuery, roi_id: _RoiQuery) -> DatasetListingReply:
    bind_model(role_id, roi_id)
    return DatasetListingReply(**engine.dataset_list(role_id, roi_id, recipe_id=recipe).model_dump(), request_id=rid)


@router.get("/datasets/file", response_class=Response, responses={
    200: {"content": {t: {} for t in sorted(set(_MEDIA_TYPES.values()))}, "description": "The image bytes."},
    **error_responses(404)}, summary="The stored image of one sample")
def dataset_file(engine: EngineDep, recipe: RecipeDep, role_id: _RoleQuery, roi_id: _RoiQuery,
                 label: _LabelQuery, filename: _FilenameQuery) -> Response:
    bind_model(role_id, roi_id)
    data = engine.dataset_file(role_id, roi_id, label, filename, recipe_id=recipe)
    media = _MEDIA_TYPES.get(PurePath(filename).suffix.lower(), "application/octet-stream")
    return Response(data, media_type=media)


@router.delete("/datasets/file", response_model=DatasetClearReply, responses=error_responses(404),
               summary="Delete one sample (image and metadata)")
def dataset_delete(engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep, role_id: _RoleQuery,
                   roi_id: _RoiQuery, label: _LabelQuery, filename: _FilenameQuery) -> DatasetClearReply:
    bind_model(role_id, roi_id)
    res = engine.dataset_delete(role_id, roi_id, label, filename, recipe_id=recipe)
    return DatasetClearReply(**res.model_dump(), request_id=rid)


@router.get("/datasets/meta", response_model=dict[str, Any], responses=error_responses(404),
            summary="The metadata stored with one sample, verbatim (request id in the header only)")
def dataset_meta(engine: EngineDep, recipe: RecipeDep, role_id: _RoleQuery, roi_id: _RoiQuery,
                 label: _LabelQuery, filename: _FilenameQuery) -> dict[str, Any]:
    bind_model(role_id, roi_id)
    return engine.dataset_meta(role_id, roi_id, label, filename, recipe_id=recipe)


@router.delete("/datasets/clear", response_model=DatasetClearReply,
               summary="Delete every sample of a ROI, or of one class")
def dataset_clear(engine: EngineDep, rid: RequestIdDep, recipe: RecipeDep, role_id: _RoleQuery,
                  roi_id: _RoiQuery, label: Annotated[Label | None, Query()] = None) -> DatasetClearReply:
    bind_model(role_id, roi_id)
    res = engine.dataset_clear(role_id, roi_id, label, recipe_id=recipe)
    return DatasetClearReply(**res.model_dump(), request_id=rid)


@router.post("/calibrate_dataset", response_model=CalibrationReply, responses=error_responses(404, 409),
             summary="Score the stored OK/NG samples and set the threshold from them")
def calibrate_dataset(body: CalibrateDatasetRequest, engine: EngineDep, rid: RequestIdDep,
                      recipe: RecipeDep) -> CalibrationReply:
    bind_model(body.role_id, body.roi_id)
    res = engine.calibrate_dataset(
        body.role_id, body.roi_id, body.default_mm_per_px, body.score_percentile, body.area_mm2_thr,
        recipe_id=first_recipe(body.recipe_id, recipe),
    )
    return CalibrationReply(**res.model_dump(), model_key=res.roi_id, request_id=rid)


@router.post("/infer_dataset", response_model=InferDatasetReply, responses=error_responses(404, 409, 428),
             summary="Score every stored sample (per-sample failures are reported in items[].error)")
def infer_dataset(body: InferDatasetRequest, engine: EngineDep, rid: RequestIdDep,
                  recipe: RecipeDep) -> InferDatasetReply:
    bind_model(body.role_id, body.roi_id)
    res = engine.infer_dataset(
        body.role_id, body.roi_id, body.default_mm_per_px, body.include_heatmap,
        recipe_id=first_recipe(body.recipe_id, recipe),
    )
    return InferDatasetReply.of(res, rid)

"""JSON shapes of the REST shim: request bodies and replies, as the GUI and the brief name them.

Replies mirror the engine's result models field for field and add ``request_id`` (and
``model_key``, which the GUI expects to equal ``roi_id``). Binary fields become base64 text:
``heatmap_png`` -> ``heatmap_png_base64``; a raw map -> ``{dtype, shape, data_base64}``.
Every reply fits the type the GUI reads it into (shared GUI_CLIENT.md): no null where the GUI
has a non-nullable number, JSON integers where it has ``int``. Percentile units: docs/engine.md,
"Percentile units".
"""

from __future__ import annotations

import base64
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.schemas import (
    ActivateResult,
    AddOkResult,
    BatchError,
    CalibrationResult,
    DatasetClearResult,
    DatasetItemResult,
    DatasetListing,
    DatasetSample,
    DeleteResult,
    DriftResult,
    FitResult,
    HealthResult,
    HistoryEntry,
    HistoryResult,
    ImportResult,
    InferBatchResult,
    InferDatasetResult,
    InferResult,
    MarkResult,
    ModelSummary,
    RawArray,
    Region,
    StateResult,
    VersionsResult,
)

__all__ = [
    "ActivateReply",
    "ActivateRequest",
    "AddOkReply",
    "CalibrateDatasetReply",
    "CalibrateDatasetRequest",
    "CalibrateNgRequest",
    "CalibrationReply",
    "DatasetClearReply",
    "DatasetItemReply",
    "DatasetListingReply",
    "DatasetSampleReply",
    "DeleteReply",
    "DriftReply",
    "ErrorReply",
    "FitReply",
    "HealthReply",
    "HistoryEntryReply",
    "HistoryReply",
    "ImportReply",
    "InferBatchReply",
    "InferDatasetReply",
    "InferDatasetRequest",
    "InferReply",
    "MarkReply",
    "ModelsReply",
    "RawArrayReply",
    "StateReply",
    "ValidationIssue",
    "VersionsReply",
    "b64",
    "error_responses",
    "percent",
]


def percent(fraction: float) -> float:
    """A percentile fraction as a percent, without the float noise of the product (0.99 -> 99.0)."""
    return round(fraction * 100.0, 9)


def b64(data: bytes | None) -> str | None:
    """Standard base64 text of ``data`` (None stays None)."""
    return None if data is None else base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------- requests (JSON bodies)

class _Request(BaseModel):
    # Types only: value rules (mm_per_px > 0, ...) are the engine's, so both doors answer alike.
    # The GUI sends a few fields the engine does not need (model_key); unknown keys are ignored
    # rather than rejected so a newer client keeps working against this shim.
    model_config = ConfigDict(extra="ignore")

    role_id: str
    roi_id: str
    model_key: str | None = Field(None, description="Accepted for the GUI; always equals roi_id.")
    recipe_id: str | None = Field(
        None, description="Product recipe; overrides the recipe_id query parameter and X-Recipe-Id."
    )


class CalibrateNgRequest(_Request):
    mm_per_px: float
    ok_scores: list[float]
    ng_scores: list[float] | None = None
    score_percentile: float | None = Field(
        None, description="Percentile for the OK-only rule: 99 (a percent) or 0.99 (a fraction)."
    )
    area_mm2_thr: float | None = None


class CalibrateDatasetRequest(_Request):
    default_mm_per_px: float | None = None
    score_percentile: float | None = None
    area_mm2_thr: float | None = None


class InferDatasetRequest(_Request):
    default_mm_per_px: float | None = None
    include_heatmap: bool = False


# ---------------------------------------------------------------- replies

class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorReply(BaseModel):
    """Every non-2xx reply: ``error`` is the human message, ``code`` the stable machine code."""

    error: str
    code: str
    request_id: str
    detail: list[ValidationIssue] | None = Field(
        None, description="Only for code validation_error.", exclude_if=lambda v: v is None
    )


_STATUS_MEANING = {
    400: "Bad input: ids, image, shape, JSON part, reserved recipe (code says which).",
    401: "X-API-Key missing or wrong (only when the server has an API key).",
    404: "No model (code model_not_found: run /fit_ok first), no such sample, or no such kept version "
         "(version_not_found). In the GUI's error dialect (docs/curl_examples.md) model_not_found is answered "
         "with 400.",
    409: "mm_per_px differs from the one the model was trained with (mm_per_px_mismatch); a fit of the model "
         "is running (fit_in_progress: retry later); the model was refitted while a calibration was being "
         "computed on the previous version (model_changed: calibrate again).",
    413: "Request, image or image count over the configured limits.",
    422: "Schema error: a required field is missing or has the wrong type.",
    428: "The model has no calibration (code calibration_missing); 400 in the GUI's error dialect.",
    500: "Internal or model-file error.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses, all with the ``ErrorReply`` body."""
    return {s: {"model": ErrorReply, "description": _STATUS_MEANING[s]} for s in statuses}


class _Reply(BaseModel):
    # Built from the engine's results; a field the engine adds later is dropped here rather than
    # failing every request (tests/test_http_wire.py trips when the two drift apart).
    model_config = ConfigDict(frozen=True, extra="ignore")


class HealthReply(HealthResult):
    request_id: str
    recipe_id: str | None = None


class FitReply(FitResult):
    status: str = "ok"
    model_key: str
    request_id: str


class CalibrationReply(CalibrationResult):
    """/calibrate_ng: ``ng_mean`` is 0.0 when no NG score was given (``n_ng`` 0 says so);
    ``score_percentile`` is in the unit the request used (a fraction when it sent one <= 1, else a
    percent, also when it sent none)."""

    ng_mean: float
    score_percentile: float
    status: str = "ok"
    model_key: str
    request_id: str

    @classmethod
    def of(cls, res: CalibrationResult, request_id: str, sent: float | None) -> CalibrationReply:
        unit = res.score_percentile if sent is not None and sent <= 1 else percent(res.score_percentile)
        data = {**res.model_dump(), "ng_mean": res.ng_mean or 0.0, "score_percentile": unit}
        return cls(**data, model_key=res.roi_id, request_id=request_id)


class CalibrateDatasetReply(CalibrationReply):
    """/calibrate_dataset: ``score_percentile`` is the integer percent the GUI reads (its type is
    ``int``): the exact percent rounded down (99.5 -> 99); ``score_percentile_exact`` is the exact one."""

    score_percentile: int
    score_percentile_exact: float

    @classmethod
    def of(cls, res: CalibrationResult, request_id: str, sent: float | None = None) -> CalibrateDatasetReply:
        exact = percent(res.score_percentile)
        data = {**res.model_dump(), "ng_mean": res.ng_mean or 0.0, "score_percentile": math.floor(exact)}
        return cls(**data, score_percentile_exact=exact, model_key=res.roi_id, request_id=request_id)


class StateReply(StateResult):
    model_key: str
    request_id: str


class RawArrayReply(_Reply):
    dtype: Literal["uint8", "float32"]
    shape: tuple[int, ...]
    data_base64: str

    @classmethod
    def of(cls, raw: RawArray) -> RawArrayReply:
        return cls(dtype=raw.dtype, shape=raw.shape, data_base64=base64.b64encode(raw.data).decode("ascii"))


class InferReply(_Reply):
    role_id: str
    roi_id: str
    model_key: str
    recipe_id: str | None
    score: float
    threshold: float | None = Field(description="null for raw (uncalibrated) scoring.")
    decision: Literal["ok", "ng"] | None = Field(description="null for raw (uncalibrated) scoring.")
    area_mm2_thr: float | None
    regions: tuple[Region, ...]
    heatmap_png_base64: str | None = Field(description="8-bit grey PNG of the map; grey 128 = threshold.")
    heatmap_raw: RawArrayReply | None = Field(
        None, description="Only when asked for with heatmap=uint8|float32.", exclude_if=lambda v: v is None
    )
    heatmap_scale: float
    token_shape: tuple[int, int]
    image_shape: tuple[int, int]
    model_version: int
    mm_per_px: float
    timings_ms: dict[str, float]
    request_id: str

    @classmethod
    def of(cls, res: InferResult, request_id: str) -> InferReply:
        data: dict[str, Any] = res.model_dump(exclude={"heatmap_png", "heatmap_raw"})
        raw = None if res.heatmap_raw is None else RawArrayReply.of(res.heatmap_raw)
        return cls(**data, model_key=res.roi_id, heatmap_png_base64=b64(res.heatmap_png),
                   heatmap_raw=raw, request_id=request_id)


class BatchItemReply(BaseModel):
    roi_id: str
    result: InferReply | None
    error: BatchError | None


class InferBatchReply(_Reply):
    role_id: str
    recipe_id: str | None
    n_total: int
    n_errors: int
    items: tuple[BatchItemReply, ...]
    timings_ms: dict[str, float]
    request_id: str

    @classmethod
    def of(cls, res: InferBatchResult, request_id: str) -> InferBatchReply:
        items = tuple(
            BatchItemReply(roi_id=item.roi_id, error=item.error,
                           result=None if item.result is None else InferReply.of(item.result, request_id))
            for item in res.items)
        return cls(role_id=res.role_id, recipe_id=res.recipe_id, n_total=res.n_total, n_errors=res.n_errors,
                   items=items, timings_ms=res.timings_ms, request_id=request_id)


class DatasetSampleReply(DatasetSample):
    status: str = "ok"
    request_id: str


class DatasetListingReply(DatasetListing):
    request_id: str


class DatasetClearReply(DatasetClearResult):
    status: str = "ok"
    request_id: str


class DatasetItemReply(_Reply):
    label: Literal["ok", "ng"]
    filename: str
    mm_per_px: float | None
    score: float | None
    threshold: float | None
    decision: Literal["ok", "ng"] | None
    regions: tuple[Region, ...]
    n_regions: int
    heatmap_png_base64: str | None
    error: str | None

    @classmethod
    def of(cls, item: DatasetItemResult) -> DatasetItemReply:
        return cls(**item.model_dump(exclude={"heatmap_png"}), heatmap_png_base64=b64(item.heatmap_png))


class InferDatasetReply(_Reply):
    status: str
    role_id: str
    roi_id: str
    model_key: str
    recipe_id: str | None
    n_total: int
    n_errors: int
    items: tuple[DatasetItemReply, ...]
    request_id: str

    @classmethod
    def of(cls, res: InferDatasetResult, request_id: str) -> InferDatasetReply:
        data = res.model_dump(exclude={"items"})
        items = tuple(DatasetItemReply.of(item) for item in res.items)
        return cls(**data, items=items, model_key=res.roi_id, request_id=request_id)


class ModelsReply(_Reply):
    models: tuple[ModelSummary, ...]
    request_id: str


class DeleteReply(DeleteResult):
    status: str = "ok"
    request_id: str


class HistoryEntryReply(_Reply):
    """One recorded inspection; the thumbnails (base64 JPEG and PNG) only when asked for."""

    id: int
    time: float
    model_version: int
    score: float
    threshold: float | None
    decision: Literal["ok", "ng"] | None
    n_regions: int
    area_mm2: float
    max_area_mm2: float
    boxes: tuple[tuple[int, int, int, int], ...]
    image_shape: tuple[int, int]
    request_id: str | None
    operator_id: str | None
    thumbnail_jpeg_base64: str | None = Field(None, exclude_if=lambda v: v is None)
    heatmap_png_base64: str | None = Field(None, exclude_if=lambda v: v is None)

    @classmethod
    def of(cls, entry: HistoryEntry) -> HistoryEntryReply:
        data = entry.model_dump(exclude={"thumbnail_jpeg", "heatmap_png"})
        return cls(**data, thumbnail_jpeg_base64=b64(entry.thumbnail_jpeg), heatmap_png_base64=b64(entry.heatmap_png))


class HistoryReply(_Reply):
    role_id: str
    roi_id: str
    recipe_id: str | None
    n: int
    items: tuple[HistoryEntryReply, ...]
    dropped: int
    enabled: bool
    request_id: str

    @classmethod
    def of(cls, res: HistoryResult, request_id: str) -> HistoryReply:
        items = tuple(HistoryEntryReply.of(item) for item in res.items)
        return cls(**res.model_dump(exclude={"items"}), items=items, request_id=request_id)


class DriftReply(DriftResult):
    request_id: str
# ---------------------------------------------------------------- model lifecycle (docs/lifecycle.md)

class VersionsReply(VersionsResult):
    request_id: str


class ActivateReply(ActivateResult):
    request_id: str


class AddOkReply(AddOkResult):
    request_id: str


class MarkReply(MarkResult):
    request_id: str


class ImportReply(ImportResult):
    request_id: str


class ActivateRequest(_Request):
    version: int = Field(description="A kept version number (GET /versions).")

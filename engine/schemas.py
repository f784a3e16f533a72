"""Typed requests and results shared by the engine facade and both doors.

Results are immutable pydantic models; binary payloads (PNG heatmaps, raw maps) are ``bytes``,
which the ZeroMQ door sends as they are and the REST shim encodes as base64.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ActivateResult",
    "AddOkResult",
    "AnnulusShape",
    "AutoRecipeReport",
    "BatchError",
    "CalibrationResult",
    "CircleShape",
    "DatasetClass",
    "DatasetClearResult",
    "DatasetItemResult",
    "DatasetListing",
    "DatasetSample",
    "DeleteResult",
    "DriftResult",
    "ExplainPatchResult",
    "ExportResult",
    "FitResult",
    "HealthResult",
    "HeatmapFormat",
    "HistoryEntry",
    "HistoryResult",
    "ImportResult",
    "InferBatchItem",
    "InferBatchResult",
    "InferDatasetResult",
    "InferResult",
    "MarkResult",
    "ModelSummary",
    "OkScoreStats",
    "RawArray",
    "RecipeInfo",
    "RecipeTrial",
    "RectShape",
    "RefitCalibration",
    "Region",
    "RegionExplanation",
    "Shape",
    "StateResult",
    "VersionInfo",
    "VersionsResult",
]

HeatmapFormat = Literal["png", "uint8", "float32", "none"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RectShape(_Frozen):
    kind: Literal["rect"] = "rect"
    x: float
    y: float
    w: float = Field(gt=0)
    h: float = Field(gt=0)


class CircleShape(_Frozen):
    kind: Literal["circle"] = "circle"
    cx: float
    cy: float
    r: float = Field(gt=0)


class AnnulusShape(_Frozen):
    kind: Literal["annulus"] = "annulus"
    cx: float
    cy: float
    r: float = Field(gt=0)
    r_inner: float = Field(ge=0)


Shape = Annotated[RectShape | CircleShape | AnnulusShape, Field(discriminator="kind")]


class RawArray(_Frozen):
    """A dense array on the wire: C-order bytes of ``dtype`` with ``shape``."""

    dtype: Literal["uint8", "float32"]
    shape: tuple[int, ...]
    data: bytes


class RegionExplanation(_Frozen):
    """The nearest normal patch of a region's hottest patch (``infer(..., explain=True)``).

    ``source``: the stored OK sample's name when the fit used the dataset, else None;
    ``image_index``: the training image's index in the fit (None with ``known`` false: the model
    keeps no sources, e.g. fitted before they were kept). Boxes are x, y, w, h in pixels."""

    known: bool
    patch: tuple[int, int]                        # row, col of the hottest patch in the token grid
    box: tuple[int, int, int, int]                # that patch in the inspected ROI image
    distance: float                               # to its nearest normal patch (the patch's score)
    image_index: int | None = None
    source: str | None = None
    source_patch: tuple[int, int] | None = None   # row, col in the training image's token grid
    source_box: tuple[int, int, int, int] | None = None   # in the training image as it was sent


class Region(_Frozen):
    """One connected component of the thresholded map inside the mask (ROI pixel units)."""

    x: int
    y: int
    w: int
    h: int
    bbox: tuple[int, int, int, int]          # x, y, w, h
    area_px: int
    area_mm2: float                          # area_px * mm_per_px ** 2
    centroid: tuple[float, float]            # cx, cy
    max_score: float
    mean_score: float
    contour: tuple[tuple[int, int], ...]     # outer boundary polygon, (x, y) points
    explanation: RegionExplanation | None = Field(None, exclude_if=lambda v: v is None)   # when asked for


class OkScoreStats(_Frozen):
    n: int
    mean: float
    std: float
    p50: float
    p95: float
    p99: float
    max: float


class RefitCalibration(_Frozen):
    """How a refit of a calibrated model set the new model's threshold (docs/engine.md, "Refit")."""

    carried: bool                            # False: the new model is uncalibrated (428 until calibrated)
    rule: Literal["ok_ng_midpoint", "ok_percentile"] | None
    threshold: float | None
    previous_threshold: float
    previous_rule: str | None
    source: Literal["dataset", "scores"]     # where the last calibration's scores came from
    n_ok: int
    n_ng: int
    warning: str | None                      # set when the re-scored OK and NG scores overlap
    reason: str | None                       # why the rule differs from the last one's, or nothing was carried


class RecipeInfo(_Frozen):
    """The feature and scoring choices a model is fitted and scored with (engine.recipes)."""

    name: str
    side: int                                # square input side
    levels: tuple[int, ...]                  # strides of the backbone stages making the features
    aggregation: int                         # local mean side per level (1 = none)
    score_percentile: float                  # image score = this percentile of the masked map
    coreset_ratio: float


class RecipeTrial(_Frozen):
    """One recipe tried by the automatic choice, with its validation figures."""

    recipe: RecipeInfo
    image_auroc: float                       # held-out OK images vs synthetic (and stored NG) defects
    detection_rate: float                    # share of defective images scored above every OK image
    pixel_auroc: float | None                # on the synthetic defects' masks
    seconds: float                           # fit and scoring of this trial (shared by its percentiles)


class AutoRecipeReport(_Frozen):
    """What the automatic recipe choice tried at fit time and what it kept."""

    chosen: RecipeInfo
    trials: tuple[RecipeTrial, ...]
    skipped: tuple[str, ...]                 # candidates not started within the budget
    n_fit: int                               # OK images each trial fitted on
    n_ok: int                                # held-out OK images
    n_synthetic: int                         # synthetic defects drawn on them
    n_real_ng: int                           # stored NG samples that joined the validation
    seconds: float
    budget_s: float


class FitResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    mm_per_px: float
    n_images: int
    n_embeddings: int
    coreset_size: int
    token_shape: tuple[int, int]
    model_version: int
    backbone: str
    input_size: int
    distance: str
    memory_fit: bool
    timings_ms: dict[str, float]
    ok_scores: tuple[float, ...]             # 5-fold hold-out scores of (up to 64 of) the training images
    ok_score_stats: OkScoreStats | None     # None when fitted on a single image
    threshold_suggestion: float | None       # OK-only calibration rule applied to ok_scores
    calibration: RefitCalibration | None     # None when the model had no calibration to carry over
    recipe: RecipeInfo | None = None         # the recipe the model was fitted with
    auto_recipe: AutoRecipeReport | None = None  # set when the recipe was chosen automatically


class CalibrationResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    threshold: float
    method: Literal["ok_ng_midpoint", "ok_percentile"]
    source: Literal["scores", "dataset"]     # client-sent scores (calibrate_ng) or stored samples
    score_percentile: float                  # as a fraction, 0..1
    area_mm2_thr: float
    safety_factor: float | None
    ok_mean: float
    ng_mean: float | None
    ok_p99: float
    ng_p5: float | None
    n_ok: int
    n_ng: int
    warning: str | None                      # set when the OK and NG scores overlap
    model_version: int
    mm_per_px: float


class InferResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    score: float                             # percentile of the masked map; higher = more anomalous
    threshold: float | None                  # None only for raw (uncalibrated) scoring
    decision: Literal["ok", "ng"] | None     # ng iff a region survives the area filter
    area_mm2_thr: float | None
    regions: tuple[Region, ...]
    heatmap_png: bytes | None                # 8-bit grey PNG, threshold at grey 128
    heatmap_raw: RawArray | None             # uint8 (same scale) or float32 map, when asked
    heatmap_scale: float                     # map value that maps to grey 128
    token_shape: tuple[int, int]
    image_shape: tuple[int, int]             # H, W of the ROI as received
    model_version: int
    mm_per_px: float
    timings_ms: dict[str, float]


class BatchError(_Frozen):
    code: str
    status: int
    message: str


class InferBatchItem(_Frozen):
    roi_id: str
    result: InferResult | None
    error: BatchError | None


class InferBatchResult(_Frozen):
    role_id: str
    recipe_id: str | None
    n_total: int
    n_errors: int
    items: tuple[InferBatchItem, ...]
    timings_ms: dict[str, float]


class StateResult(_Frozen):
    status: str
    role_id: str
    roi_id: str
    recipe_id: str | None
    memory_fitted: bool
    calib_present: bool
    model_version: int | None
    threshold: float | None
    mm_per_px: float | None
    token_shape: tuple[int, int] | None
    coreset_size: int | None
    backbone: str | None
    active_version: int | None = None        # the model version served (engine.lifecycle)


class ModelSummary(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    model_version: int
    calibrated: bool
    coreset_size: int
    backbone: str
    created_at: str


class DeleteResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    deleted: bool


class HealthResult(_Frozen):
    status: str
    device: str
    model: str
    version: str
    uptime_s: float
    roles_loaded: tuple[str, ...]
    rois: tuple[str, ...]
    backbone: str
    weights_sha256: str
    input_size: int


class DatasetSample(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    label: Literal["ok", "ng"]
    filename: str
    bytes: int


class DatasetClass(_Frozen):
    count: int
    files: tuple[str, ...]
    meta: dict[str, bool]                    # filename -> has a metadata file


class DatasetListing(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    classes: dict[str, DatasetClass]         # "ok", "ng"


class DatasetClearResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    removed: int


class DatasetItemResult(_Frozen):
    label: Literal["ok", "ng"]
    filename: str
    mm_per_px: float | None
    score: float | None
    threshold: float | None
    decision: Literal["ok", "ng"] | None
    regions: tuple[Region, ...]
    n_regions: int
    heatmap_png: bytes | None
    error: str | None


class InferDatasetResult(_Frozen):
    status: str
    role_id: str
    roi_id: str
    recipe_id: str | None
    n_total: int
    n_errors: int
    items: tuple[DatasetItemResult, ...]


class HistoryEntry(_Frozen):
    """One recorded inspection (``time``: seconds since the epoch, UTC)."""

    id: int
    time: float
    model_version: int
    score: float
    threshold: float | None
    decision: Literal["ok", "ng"] | None
    n_regions: int
    area_mm2: float
    max_area_mm2: float
    boxes: tuple[tuple[int, int, int, int], ...]   # the regions' x, y, w, h in the ROI image
    image_shape: tuple[int, int]
    request_id: str | None
    operator_id: str | None
    thumbnail_jpeg: bytes | None = None            # 64-px image thumbnail (JPEG), only when asked for
    heatmap_png: bytes | None = None               # 64-px heatmap thumbnail (grey 128 = threshold)


class HistoryResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    n: int
    items: tuple[HistoryEntry, ...]          # newest first
    dropped: int                             # records lost since start (full disk, locked database)
    enabled: bool


class DriftResult(_Frozen):
    """Drift of a ROI's recent scores from its fit's OK scores (docs/observability.md)."""

    role_id: str
    roi_id: str
    recipe_id: str | None
    model_version: int
    state: Literal["ok", "watch", "alarm"]
    reason: str
    ks_d: float | None
    ks_p: float | None
    n_window: int
    window: int
    reference: Literal["fit", "baseline"]      # the fit's hold-out OK scores, or the first full window
    n_reference: int
    median_window: float | None
    median_reference: float | None
    ng_rate_window: float | None
    ng_rate_history: float | None
    changed_at: float | None                  # when the state last changed (epoch seconds)
    rule: dict[str, float]


class ExplainPatchResult(_Frozen):
    """A normal patch crop from a stored training sample (PNG) and where it lies in it."""

    role_id: str
    roi_id: str
    recipe_id: str | None
    model_version: int
    image_index: int
    source: str
    source_patch: tuple[int, int]
    source_box: tuple[int, int, int, int]
    crop_box: tuple[int, int, int, int]       # the crop: the patch with one patch of context around
    png: bytes
class VersionInfo(_Frozen):
    version: int
    active: bool
    created_at: str | None                   # when this version was made (None: stored before versions)
    created_by: str                          # fit | add_ok | calibration | import | unknown
    model_version: int                       # the memory's number (fit, add_ok and import make a new memory)
    n_images: int                            # training images of the memory
    coreset_size: int
    threshold: float | None


class VersionsResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    active_version: int | None
    kept_limit: int                          # BACKEND_MODEL_VERSIONS_KEPT
    versions: tuple[VersionInfo, ...]        # oldest first


class ActivateResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    active_version: int
    previous_version: int | None
    model_version: int
    threshold: float | None


class AddOkResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    version: int                             # the new version, served now
    model_version: int
    n_images: int                            # images added by this call
    n_images_total: int                      # training images of the memory now
    rows_added: int
    coreset_size: int
    covering_radius: float                   # the coverage rule's radius (engine.growth)
    ok_scores: tuple[float, ...]             # each added image scored against the memory before the call
    threshold: float | None
    calibration: RefitCalibration | None     # None when the model had no calibration to carry over
    timings_ms: dict[str, float]


class MarkResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    label: Literal["ok", "ng"]
    filename: str                            # the stored dataset sample
    score: float                             # what the image scored on the version it was marked against
    threshold: float | None
    decision: Literal["ok", "ng"] | None
    marked_version: int
    added: AddOkResult | None                # mark_ok: the add_ok of the image; mark_ng: None


class ExportResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    version: int
    filename: str
    sha256: str
    archive: bytes


class ImportResult(_Frozen):
    role_id: str
    roi_id: str
    recipe_id: str | None
    version: int                             # the new version, served now
    model_version: int
    threshold: float | None
    origin: dict[str, Any]                   # role, ROI, recipe and version the archive was made from


def model_dump_plain(model: BaseModel) -> dict[str, Any]:
    """A model as plain Python values (tuples as lists, bytes kept), for msgpack."""
    return model.model_dump(mode="python")

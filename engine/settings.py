"""The engine's one configuration object, and the base every settings object of the process uses.

Precedence, highest first: keyword arguments, environment variables, the YAML file named by
``BACKEND_CONFIG``, defaults. YAML keys may be the environment names (``PATCHCORE_DISTANCE``)
or the field names (``distance``). The doors (``ipc.settings``, ``http_compat.settings``) and the
service (``service.settings``) read their own settings the same way, from the same file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

if TYPE_CHECKING:
    from engine.coreset import CoresetRule

__all__ = ["EnvSettings", "Settings", "env_field"]


def env_field(default: Any, env_name: str, field_name: str, **constraints: Any) -> Any:
    """A settings field read from ``env_name`` (or ``field_name`` in YAML and keyword arguments)."""
    return Field(default, validation_alias=AliasChoices(env_name, field_name), **constraints)


class _YamlFileSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by ``BACKEND_CONFIG`` (absent variable: no values)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path:
            import yaml

            try:
                with open(path, encoding="utf-8") as fh:
                    loaded = yaml.safe_load(fh) or {}
            except OSError as exc:
                raise ValueError(f"BACKEND_CONFIG file {path!r} cannot be read: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ValueError(f"BACKEND_CONFIG file {path!r} must hold a mapping")
            # one file configures the engine and both doors: each settings class takes its own keys
            self._data = {key: value for key, value in loaded.items() if key in _names(settings_cls)}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _names(settings_cls: type[BaseSettings]) -> set[str]:
    """Every name a field of ``settings_cls`` answers to: field names and environment names."""
    names = set()
    for name, info in settings_cls.model_fields.items():
        names.add(name)
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
    return names


class EnvSettings(BaseSettings):
    """Base of every settings object of the process (the engine's, each door's, the service's).

    Precedence, highest first: keyword arguments, environment variables, the YAML file named by
    ``BACKEND_CONFIG``, defaults. Unknown keyword arguments are errors; a YAML file may hold the
    keys of every settings object.
    """

    model_config = SettingsConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any, info: ValidationInfo) -> Any:
        # an empty environment variable means "not set" for the fields whose default is None
        if value == "" and info.field_name is not None and cls.model_fields[info.field_name].default is None:
            return None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_source = _YamlFileSource(settings_cls, os.environ.get("BACKEND_CONFIG"))
        return init_settings, env_settings, yaml_source


def _default_data_root() -> Path:
    """``data`` under the working directory; in the frozen bundle ``<exe dir>/data`` when that is
    writable, else a per-user folder (``%LOCALAPPDATA%/inspection-engine`` on Windows,
    ``~/.local/share/inspection-engine`` elsewhere). ``BACKEND_DATA_ROOT`` overrides all of these."""
    if not getattr(sys, "frozen", False):
        return Path("data")
    bundled = Path(sys.executable).resolve().parent / "data"
    try:  # a real write probe: os.access ignores Windows ACLs (Program Files)
        bundled.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=bundled):
            pass
        return bundled
    except OSError:
        pass
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "inspection-engine"
    return Path.home() / ".local" / "share" / "inspection-engine"


class Settings(EnvSettings):
    """Every knob of the engine (the doors and the service have their own). Build one and pass it
    in; no singleton."""

    # storage
    data_root: Path = Field(
        default_factory=_default_data_root, validation_alias=AliasChoices("BACKEND_DATA_ROOT", "data_root")
    )

    # backbone and device
    backbone: Literal["auto", "dinov2_vits14", "efficientnet_lite0", "efficientnet_lite2"] = Field(
        "auto", validation_alias=AliasChoices("BACKEND_BACKBONE", "backbone")
    )
    weights: Path | None = Field(None, validation_alias=AliasChoices("BACKEND_WEIGHTS", "weights"))
    input_size: int | None = Field(
        None, ge=28, le=1792, validation_alias=AliasChoices("BACKEND_INPUT_SIZE", "input_size"),
        description="Square side every ROI is resized to; None = the backbone's default.",
    )
    dinov2_block: int | None = Field(
        None, ge=0, le=11, validation_alias=AliasChoices("BACKEND_DINOV2_BLOCK", "dinov2_block")
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", validation_alias=AliasChoices("BACKEND_DEVICE", "device")
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", validation_alias=AliasChoices("BACKEND_PRECISION", "precision"),
        description="auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.",
    )
    torch_threads: int | None = Field(
        None, ge=1, validation_alias=AliasChoices("BACKEND_TORCH_THREADS", "torch_threads"),
        description="Threads of torch, faiss and OpenCV (engine.threads); None = one per core. "
                    "BLAS always runs on one.",
    )

    # PatchCore
    coreset_ratio: float = Field(
        0.015, gt=0, le=1, validation_alias=AliasChoices("PATCHCORE_CORESET_RATIO", "coreset_ratio")
    )
    coreset_projection_dim: int = Field(
        192, ge=8, validation_alias=AliasChoices("PATCHCORE_PROJECTION_DIM", "coreset_projection_dim"),
        description="Principal axes the greedy coreset selects on; features with no more dimensions "
                    "than this are used as they are (see engine.coreset).",
    )
    coreset_exact_max_rows: int = Field(
        200_000, ge=1,
        validation_alias=AliasChoices("PATCHCORE_CORESET_EXACT_MAX_ROWS", "coreset_exact_max_rows"),
        description="Banks up to this many patch rows are thinned on coreset_projection_dim axes; larger "
                    "ones on at most coreset_large_projection_dim (engine.coreset.CoresetRule).",
    )
    coreset_large_projection_dim: int = Field(
        96, ge=8,
        validation_alias=AliasChoices("PATCHCORE_LARGE_PROJECTION_DIM", "coreset_large_projection_dim"),
        description="Principal axes the coreset of a bank above coreset_exact_max_rows is selected on.",
    )
    ivf_min_rows: int = Field(
        4_000, ge=1, validation_alias=AliasChoices("PATCHCORE_IVF_MIN_ROWS", "ivf_min_rows"),
        description="Memories with at least this many rows get a projected inverted-file index: an "
                    "approximate search refined to exact scores, decisions and regions (engine.search, "
                    "engine.refine); smaller ones, and memory_fit ones (nothing left out to tune on), a "
                    "flat one. At 320 px (1 600 patches per ROI) the refined search was faster from 4k rows "
                    "on (bench latency section, crossover).",
    )
    distance: Literal["l2", "cosine"] = Field(
        "l2", validation_alias=AliasChoices("PATCHCORE_DISTANCE", "distance")
    )
    batch_size: int | None = Field(
        None, ge=1, le=256, validation_alias=AliasChoices("PATCHCORE_BATCH_SIZE", "batch_size"),
        description="None = 1 on CPU (faster per image on few cores), 16 on CUDA.",
    )
    knn_k: int = Field(1, ge=1, le=64, validation_alias=AliasChoices("PATCHCORE_KNN_K", "knn_k"))
    score_percentile: float = Field(
        99.0, gt=0, le=100,
        validation_alias=AliasChoices("PATCHCORE_SCORE_PERCENTILE", "score_percentile"),
        description="Image score = this percentile of the anomaly map inside the mask.",
    )
    aggregation: int | None = Field(
        None, ge=1, le=9, validation_alias=AliasChoices("PATCHCORE_AGGREGATION", "aggregation"),
        description="Side of the square mean around each patch, per feature level (1 = none, odd); "
                    "None = the backbone's own (Lite 3, DINOv2 1).",
    )
    feature_levels: tuple[int, ...] | None = Field(
        None, validation_alias=AliasChoices("PATCHCORE_LEVELS", "feature_levels"),
        description="Strides of the backbone stages whose outputs make patch features, e.g. 4,8,16 "
                    "(EfficientNet-Lite: 4, 8, 16); None = the backbone's own (Lite 8,16; DINOv2 14).",
    )
    gaussian_sigma: float = Field(
        4.0, ge=0, validation_alias=AliasChoices("PATCHCORE_SIGMA", "gaussian_sigma")
    )
    seed: int = Field(0, validation_alias=AliasChoices("PATCHCORE_SEED", "seed"))

    # automatic recipe choice at fit time (engine.autorecipe)
    auto_recipe: Literal["on", "off"] = Field(
        "off", validation_alias=AliasChoices("BACKEND_AUTO_RECIPE", "auto_recipe"),
        description="on: each fit of at least 8 images tries a few recipes on its own OK images against "
                    "synthetic defects (and the ROI's stored NG samples) and keeps the best (engine.autorecipe).",
    )
    auto_recipe_budget_s: float = Field(
        120.0, gt=0, validation_alias=AliasChoices("BACKEND_AUTO_RECIPE_BUDGET_S", "auto_recipe_budget_s"),
        description="Seconds the recipe trials may add to a fit: a trial is started only when its "
                    "estimated end is within the budget (the settings' recipe is always tried).",
    )

    # calibration
    calibration_percentile: float = Field(
        0.995, gt=0, le=100,
        validation_alias=AliasChoices("CALIB_SCORE_PERCENTILE", "calibration_percentile"),
    )
    calibration_safety_factor: float = Field(
        1.1, gt=0, validation_alias=AliasChoices("CALIB_SAFETY_FACTOR", "calibration_safety_factor")
    )
    default_area_mm2_thr: float = Field(
        1.0, ge=0, validation_alias=AliasChoices("CALIB_AREA_MM2_THR", "default_area_mm2_thr")
    )
    allow_refit_recalibration: bool = Field(
        True, validation_alias=AliasChoices("CALIB_REFIT_RECALIBRATION", "allow_refit_recalibration"),
        description="A refit of a calibrated model re-derives its threshold on the new memory with the "
                    "last calibration's rule (false: the refitted model answers 428 until calibrated).",
    )
    mm_per_px_rtol: float = Field(
        1e-3, ge=0, validation_alias=AliasChoices("BACKEND_MM_PER_PX_RTOL", "mm_per_px_rtol")
    )

    # limits
    model_cache_size: int = Field(
        16, ge=1, validation_alias=AliasChoices("BACKEND_MODEL_CACHE", "model_cache_size")
    )
    model_versions_kept: int = env_field(
        5, "BACKEND_MODEL_VERSIONS_KEPT", "model_versions_kept", ge=1, le=1000,
        description="Versions of each model kept for activate/export (the served one is always kept).",
    )
    max_image_pixels: int = Field(
        64_000_000, ge=1, validation_alias=AliasChoices("BACKEND_MAX_IMAGE_PIXELS", "max_image_pixels")
    )
    max_image_bytes: int = Field(
        64 * 1024 * 1024, ge=1, validation_alias=AliasChoices("BACKEND_MAX_IMAGE_BYTES", "max_image_bytes")
    )
    max_fit_images: int = Field(
        2000, ge=1, validation_alias=AliasChoices("BACKEND_MAX_FIT_IMAGES", "max_fit_images")
    )
    max_batch_items: int = env_field(
        256, "BACKEND_MAX_BATCH_ITEMS", "max_batch_items", ge=1, description="ROIs in one infer_batch."
    )
    max_scores: int = env_field(
        100_000, "BACKEND_MAX_SCORES", "max_scores", ge=1,
        description="Scores in each list of calibrate_ng (ok_scores, ng_scores).",
    )
    max_json_depth: int = env_field(
        32, "BACKEND_MAX_JSON_DEPTH", "max_json_depth", ge=2, le=512,
        description="Nesting levels of JSON text and metadata (shape, metas, items, meta).",
    )
    max_json_items: int = env_field(
        250_000, "BACKEND_MAX_JSON_ITEMS", "max_json_items", ge=100,
        description="Containers and items in one JSON text (shape, metas, items).",
    )
    max_meta_bytes: int = env_field(
        64 * 1024, "BACKEND_MAX_META_BYTES", "max_meta_bytes", ge=256,
        description="A dataset sample's metadata, as JSON.",
    )
    max_decoded_image_bytes: int = env_field(
        256 * 1024 * 1024, "BACKEND_MAX_DECODED_IMAGE_BYTES", "max_decoded_image_bytes", ge=1024,
        description="Width x height x channels x bytes per sample of one image, read from its header "
                    "before decoding (an 8000x8000 16-bit RGBA PNG is 512 MiB however small the file).",
    )
    memory_budget_bytes: int = env_field(
        2 * 1024**3, "BACKEND_MEMORY_BUDGET", "memory_budget_bytes", ge=16 * 1024 * 1024,
        description="Process-wide working memory for images being decoded and scored; a request that "
                    "does not fit waits up to memory_wait_s, then gets 503 server_busy.",
    )
    memory_wait_s: float = env_field(10.0, "BACKEND_MEMORY_WAIT_S", "memory_wait_s", ge=0, le=600)

    # observability (docs/observability.md)
    history_enabled: bool = env_field(
        True, "BACKEND_HISTORY", "history_enabled",
        description="Record every inspection (infer, infer_batch items) in <data_root>/history.sqlite and "
                    "watch each ROI for drift.",
    )
    history_max_per_roi: int = env_field(
        10_000, "BACKEND_HISTORY_MAX_PER_ROI", "history_max_per_roi", ge=1,
        description="Inspections kept per ROI; older ones are removed as new ones are written.",
    )
    history_flush_interval_s: float = env_field(
        1.0, "BACKEND_HISTORY_FLUSH_S", "history_flush_interval_s", gt=0, le=60,
        description="The history is written at most this often: a killed process loses at most this much.",
    )
    history_thumbnails: bool = env_field(
        True, "BACKEND_HISTORY_THUMBNAILS", "history_thumbnails",
        description="Keep a 64-pixel thumbnail of each inspected image and its heatmap (about 4 KB a record).",
    )
    drift_window: int = env_field(
        200, "BACKEND_DRIFT_WINDOW", "drift_window", ge=30, le=100_000,
        description="Recent scores of a ROI compared with its fit's OK scores.",
    )

    @field_validator("aggregation")
    @classmethod
    def _odd_side(cls, value: int | None) -> int | None:
        if value is not None and value % 2 == 0:
            raise ValueError(f"aggregation must be odd (1, 3, 5, ...), got {value}")
        return value

    @field_validator("feature_levels", mode="before")
    @classmethod
    def _levels_text(cls, value: Any) -> Any:
        # PATCHCORE_LEVELS=4,8,16 in the environment; a list in YAML or keyword arguments
        if isinstance(value, str):
            return tuple(int(part) for part in value.replace(" ", "").split(",") if part) or None
        return value

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size or (16 if self.resolved_device == "cuda" else 1)

    @property
    def fit_workers(self) -> int:
        """Threads that extract a fit's images side by side (CPU; one on CUDA): BACKEND_TORCH_THREADS,
        else one per usable core (engine.features.FeatureExtractor.stream)."""
        if self.resolved_device != "cpu":
            return 1
        from engine.threads import usable_cores

        return self.torch_threads or usable_cores()

    @property
    def coreset_rule(self) -> CoresetRule:
        from engine.coreset import CoresetRule  # torch and faiss: imported when a fit needs them

        return CoresetRule(self.coreset_projection_dim, self.coreset_exact_max_rows, self.coreset_large_projection_dim)

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

"""Operations on the OK/NG samples the GUI stores per ROI: upload, list, read, delete, and scoring
every stored sample against the ROI's model.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import structlog

from engine.datasets import StoredSamples
from engine.errors import EngineError, InvalidImage, InvalidInput
from engine.models import LoadedModel, ModelKey, ModelRegistry
from engine.schemas import (
    DatasetClass,
    DatasetClearResult,
    DatasetItemResult,
    DatasetListing,
    DatasetSample,
    InferDatasetResult,
    InferResult,
)
from engine.scoring import Scorer
from engine.settings import Settings
from engine.validate import LABELS, label as check_label, mm_per_px as check_mm_per_px, sample_metadata

__all__ = ["Samples", "sample_extension"]

ProgressFn = Callable[[str, int, int], None]
log = structlog.get_logger("engine.samples")


def sample_extension(image: bytes) -> str:
    """File name ending for encoded image bytes, from their signature."""
    if image[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return {b"\xff\xd8": ".jpg", b"BM": ".bmp"}.get(image[:2], ".tif")


class Samples:
    """The dataset store of every recipe, seen per ROI key."""

    def __init__(self, models: ModelRegistry, scorer: Scorer, settings: Settings) -> None:
        self._models = models
        self._scorer = scorer
        self._settings = settings

    def upload(self, key: ModelKey, label: object, image: object, filename: str | None,
               meta: object) -> DatasetSample:
        label = check_label(label)
        if not isinstance(image, bytes | bytearray | memoryview):
            raise InvalidImage("a dataset sample must be an encoded image file (PNG, JPEG, BMP, TIFF)")
        meta = sample_metadata(meta, max_depth=self._settings.max_json_depth, max_bytes=self._settings.max_meta_bytes)
        data = bytes(image)
        self._scorer.decode_held(data)  # store only what the engine can read back
        store = self._models.datasets(key.recipe)
        name, size = store.add(key.role_id, key.roi_id, label, data, filename, meta, sample_extension(data))
        return DatasetSample(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, label=label,
                             filename=name, bytes=size)

    def listing(self, key: ModelKey) -> DatasetListing:
        store = self._models.datasets(key.recipe)
        classes = {}
        for label in LABELS:
            files = store.files(key.role_id, key.roi_id, label)
            classes[label] = DatasetClass(
                count=len(files), files=tuple(files),
                meta={name: store.has_meta(key.role_id, key.roi_id, label, name) for name in files},
            )
        return DatasetListing(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, classes=classes)

    def read(self, key: ModelKey, label: str, filename: str) -> bytes:
        return self._models.datasets(key.recipe).read(key.role_id, key.roi_id, label, filename)

    def meta(self, key: ModelKey, label: str, filename: str) -> dict[str, Any]:
        return self._models.datasets(key.recipe).meta(key.role_id, key.roi_id, label, filename)

    def delete(self, key: ModelKey, label: str, filename: str) -> DatasetClearResult:
        removed = self._models.datasets(key.recipe).delete(key.role_id, key.roi_id, label, filename)
        return DatasetClearResult(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, removed=removed)

    def clear(self, key: ModelKey, label: str | None) -> DatasetClearResult:
        removed = self._models.datasets(key.recipe).clear(key.role_id, key.roi_id, label)
        return DatasetClearResult(role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe, removed=removed)

    def ok_images(self, key: ModelKey) -> StoredSamples:
        """The stored OK samples as a lazily read sequence (a fit's input).

        Raises:
            InvalidInput: no OK sample is stored.
        """
        store = self._models.datasets(key.recipe)
        names = store.files(key.role_id, key.roi_id, "ok")
        if not names:
            raise InvalidInput(f"no stored OK samples for {key.where}: upload some first")
        return StoredSamples(store, key.role_id, key.roi_id, "ok", names)

    def items(self, key: ModelKey) -> list[tuple[str, str]]:
        """(label, filename) of every stored sample, OK first."""
        store = self._models.datasets(key.recipe)
        return [(label, name) for label in LABELS for name in store.files(key.role_id, key.roi_id, label)]

    def score_stored(self, key: ModelKey, model: LoadedModel, labels: Collection[str], skip: Collection[str],
                     report: ProgressFn, stage: str, default_mm_per_px: float | None = None) -> dict[str, list[float]]:
        """Scores of the stored samples of ``labels`` against ``model``, by label; OK samples named in
        ``skip`` (those that trained the model) are left out, and so is a sample that cannot be
        scored (logged), e.g. one recorded at another mm_per_px than the model's."""
        items = [(lb, name) for lb, name in self.items(key) if lb in labels and not (lb == "ok" and name in skip)]
        out: dict[str, list[float]] = {lb: [] for lb in labels}
        for done, (lb, name) in enumerate(items, start=1):
            result = self.try_score(key, model, lb, name, False, default_mm_per_px)
            if isinstance(result, EngineError):
                log.warning("sample_not_scored", role_id=key.role_id, roi_id=key.roi_id, filename=name,
                            error=result.code, stage=stage)
            else:
                out[lb].append(result.score)
            report(stage, done, len(items))
        return out

    def score(self, key: ModelKey, model: LoadedModel, label: str, name: str, include_heatmap: bool,
              default_mm_per_px: float | None = None) -> InferResult:
        """A stored sample scored like ``infer``: its metadata's mm_per_px (else the default, else the
        model's), checked against the model (409), and its shape as the mask.

        Raises:
            EngineError: this sample cannot be scored (metadata of an older version included).
        """
        meta = self._models.datasets(key.recipe).meta(key.role_id, key.roi_id, label, name, strict=True)
        mm = meta.get("mm_per_px") or default_mm_per_px or model.manifest["mm_per_px"]
        image = self.read(key, label, name)
        return self._scorer.score_image(key, mm, image, meta.get("shape_json") or meta.get("shape"),
                                        "png" if include_heatmap else "none", model=model)[1]

    def try_score(self, key: ModelKey, model: LoadedModel, label: str, name: str, include_heatmap: bool,
                  default_mm_per_px: float | None) -> InferResult | EngineError:
        """``score``, or the error that stops this one sample: a bad sample is one failed item, never
        a failed pass over the ROI."""
        try:
            return self.score(key, model, label, name, include_heatmap, default_mm_per_px)
        except EngineError as exc:
            return exc
        except Exception as exc:   # a value stored by an older version that no check foresaw
            log.exception("sample_unscorable", role_id=key.role_id, roi_id=key.roi_id, label=label, filename=name)
            return EngineError(f"sample {label}/{name} cannot be scored ({type(exc).__name__})")

    def infer_all(self, key: ModelKey, default_mm_per_px: float | None, include_heatmap: bool,
                  report: ProgressFn) -> InferDatasetResult:
        """Score every stored sample (raw scores when the model is not calibrated yet)."""
        if default_mm_per_px is not None:
            check_mm_per_px(default_mm_per_px, "default_mm_per_px")
        model = self._models.load(key)
        items = self.items(key)
        out = []
        for done, (label, name) in enumerate(items, start=1):
            r = self.try_score(key, model, label, name, include_heatmap, default_mm_per_px)
            if isinstance(r, EngineError):
                out.append(DatasetItemResult(
                    label=label, filename=name, mm_per_px=None, score=None, threshold=None, decision=None,
                    regions=(), n_regions=0, heatmap_png=None, error=f"{r.code}: {r.message}"))
            else:
                out.append(DatasetItemResult(
                    label=label, filename=name, mm_per_px=r.mm_per_px, score=r.score, threshold=r.threshold,
                    decision=r.decision, regions=r.regions, n_regions=len(r.regions), heatmap_png=r.heatmap_png,
                    error=None))
            report("infer_samples", done, len(items))
        n_errors = sum(1 for item in out if item.error)
        return InferDatasetResult(status="ok", role_id=key.role_id, roi_id=key.roi_id, recipe_id=key.recipe,
                                  n_total=len(out), n_errors=n_errors, items=tuple(out))

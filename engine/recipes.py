"""Model recipes: the feature and scoring choices one ROI model is fitted and scored with.

A recipe is recorded in the model's manifest (``input.side``, ``features``, ``score.percentile``,
``coreset.ratio``), so a model always replays with its own recipe whatever the settings say
later. Manifests written before layouts were recorded have no ``features`` section: their models
are scored with the backbone's own layout (``Backbone.layout``), which is what fitted them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from engine.backbones import Backbone, FeatureLayout
from engine.schemas import RecipeInfo
from engine.settings import Settings

__all__ = ["ModelRecipe", "candidate_recipes", "manifest_layout", "manifest_recipe", "settings_recipe"]


@dataclass(frozen=True)
class ModelRecipe:
    """Input side, feature layout, image-score percentile and coreset share of one model."""

    side: int
    layout: FeatureLayout
    score_percentile: float
    coreset_ratio: float

    @property
    def name(self) -> str:
        """Short readable label, e.g. ``224px L8+16 a1 p99 c0.1``."""
        levels = "+".join(str(level) for level in self.layout.levels)
        return (f"{self.side}px L{levels} a{self.layout.aggregation} p{self.score_percentile:g} "
                f"c{self.coreset_ratio:g}")

    def info(self) -> RecipeInfo:
        return RecipeInfo(name=self.name, side=self.side, levels=self.layout.levels,
                          aggregation=self.layout.aggregation, score_percentile=self.score_percentile,
                          coreset_ratio=self.coreset_ratio)


def settings_recipe(settings: Settings, backbone: Backbone) -> ModelRecipe:
    """The recipe the settings describe for this backbone (levels or aggregation None: the backbone's own)."""
    levels = tuple(settings.feature_levels) if settings.feature_levels else backbone.layout.levels
    aggregation = backbone.layout.aggregation if settings.aggregation is None else settings.aggregation
    layout = FeatureLayout(levels=levels, aggregation=aggregation)
    backbone.check_layout(layout)
    return ModelRecipe(side=backbone.info.input_size, layout=layout, score_percentile=settings.score_percentile,
                       coreset_ratio=settings.coreset_ratio)


def manifest_layout(manifest: dict[str, Any]) -> FeatureLayout | None:
    """The layout a model was fitted with; None for manifests that predate recorded layouts."""
    features = manifest.get("features")
    if not features:
        return None
    return FeatureLayout(levels=tuple(int(v) for v in features["levels"]), aggregation=int(features["aggregation"]))


def manifest_recipe(manifest: dict[str, Any], backbone: Backbone) -> ModelRecipe:
    """The recipe a stored model was fitted with: what ``add_ok`` extracts new images with."""
    return ModelRecipe(side=int(manifest["input"]["side"]), layout=manifest_layout(manifest) or backbone.layout,
                       score_percentile=float(manifest["score"]["percentile"]),
                       coreset_ratio=float(manifest["coreset"]["ratio"]))


def _side(side: float, stride: int) -> int:
    return max(stride, int(round(side / stride)) * stride)


def candidate_recipes(base: ModelRecipe, backbone: Backbone) -> list[ModelRecipe]:
    """The small set the automatic choice tries, the settings' recipe first (it wins ties).

    Each differs from ``base`` in one lever: the local aggregation (1 <-> 3), the stride-4 level
    (added or dropped, where the backbone has it), and a larger input side whose coreset share
    shrinks so the memory and the search cost stay about the same (side 1.43x, rows 2x).
    """
    out = [base]
    other_aggregation = 3 if base.layout.aggregation == 1 else 1
    out.append(replace(base, layout=FeatureLayout(base.layout.levels, other_aggregation)))
    detail = tuple(sorted(set(base.layout.levels) ^ {4}))
    try:
        backbone.check_layout(FeatureLayout(detail, base.layout.aggregation))
        out.append(replace(base, layout=FeatureLayout(detail, base.layout.aggregation)))
    except ValueError:
        pass   # no stride-4 level on this backbone
    stride = backbone.info.stride
    out.append(replace(base, side=_side(base.side * 1.43, stride), coreset_ratio=base.coreset_ratio / 2))
    return out

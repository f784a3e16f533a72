"""What every backbone offers: RGB uint8 images in, patch features (B, h, w, C) out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from engine.errors import WeightsError

__all__ = ["Backbone", "BackboneInfo", "FeatureLayout", "file_sha256", "load_weights_file"]


@dataclass(frozen=True)
class BackboneInfo:
    """Metadata recorded in every model manifest, so a model is only replayed with its backbone.

    ``mean`` and ``std`` are on the 0..255 scale: ``x_norm = (x - mean) / std``.
    """

    name: str
    weights_sha256: str
    stride: int
    input_size: int
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def token_shape(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) for an input of (height, width) pixels."""
        return height // self.stride, width // self.stride


@dataclass(frozen=True)
class FeatureLayout:
    """Which trunk outputs make a patch feature, and over what neighbourhood each is averaged.

    ``levels``: strides of the trunk stages whose outputs are concatenated (EfficientNet-Lite:
    4, 8, 16; DINOv2: its one token grid, 14). ``aggregation``: side of the square mean taken
    around each patch at its own level before the levels are brought to one grid (1 = none).
    """

    levels: tuple[int, ...]
    aggregation: int

    def __post_init__(self) -> None:
        if not self.levels or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels must be distinct strides in increasing order, got {list(self.levels)}")
        if self.aggregation < 1 or self.aggregation % 2 == 0:
            raise ValueError(f"aggregation must be an odd side >= 1, got {self.aggregation}")

    def as_dict(self) -> dict[str, list[int] | int]:
        return {"levels": list(self.levels), "aggregation": self.aggregation}


class Backbone(nn.Module):
    """A frozen feature extractor. Subclasses set ``info`` and ``layout`` (what ``forward`` gives
    without a layout) and implement ``patch_features``."""

    info: BackboneInfo
    layout: FeatureLayout

    def check_layout(self, layout: FeatureLayout) -> None:
        """Raises ValueError when this backbone cannot make features with ``layout``."""
        raise NotImplementedError

    def feature_dim(self, layout: FeatureLayout) -> int:
        """Channels of a patch feature made with ``layout``."""
        raise NotImplementedError

    def normalize(self, images: Tensor) -> Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float, normalized for these weights."""
        x = images.permute(0, 3, 1, 2).float()  # B 3 H W
        mean = torch.tensor(self.info.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.info.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def patch_features(self, x: Tensor, layout: FeatureLayout | None = None) -> Tensor:
        """(B, 3, H, W) normalized -> (B, h, w, C) patch features made with ``layout`` (``self.layout`` when None)."""
        raise NotImplementedError

    def fold_batch_norms(self) -> None:
        """Fold normalisation layers into the layers before them, for inference; by default there
        are none to fold. Call after the weights are loaded (the state dict changes)."""

    def forward(self, images: Tensor, layout: FeatureLayout | None = None) -> Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, h, w, C) patch features (``self.layout`` when None)."""
        x = self.normalize(images)
        return self.patch_features(x.to(self._compute_dtype()), layout or self.layout)

    def _compute_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights_file(path: Path, expected_sha256: str | None = None) -> dict[str, Tensor]:
    """Load a weights file (``.pth``/``.pt`` or ``.safetensors``) without pickle.

    Raises:
        WeightsError: the file is missing, unreadable, truncated, or its sha256 differs.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise WeightsError(
                f"weights file {path} has sha256 {actual}, expected {expected_sha256} "
                "(truncated or a different file)"
            )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a damaged file
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a flat state_dict of tensors")
    return state

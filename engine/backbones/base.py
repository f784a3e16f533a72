"""What every backbone offers: RGB uint8 images in, patch features (B, h, w, C) out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from engine.errors import WeightsError

__all__ = ["Backbone", "BackboneInfo", "file_sha256", "load_weights_file"]


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


class Backbone(nn.Module):
    """A frozen feature extractor. Subclasses set ``info`` and implement ``patch_features``."""

    info: BackboneInfo

    def normalize(self, images: Tensor) -> Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float, normalized for these weights."""
        x = images.permute(0, 3, 1, 2).float()  # B 3 H W
        mean = torch.tensor(self.info.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.info.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def patch_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalized -> (B, h, w, C) patch features."""
        raise NotImplementedError

    def fold_batch_norms(self) -> None:
        """Fold normalisation layers into the layers before them, for inference; by default there
        are none to fold. Call after the weights are loaded (the state dict changes)."""

    def forward(self, images: Tensor) -> Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, h, w, C) patch features."""
        x = self.normalize(images)
        return self.patch_features(x.to(self._compute_dtype()))

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

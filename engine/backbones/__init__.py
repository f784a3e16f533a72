"""Frozen patch-feature backbones and the rule that picks one from the settings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from engine.backbones.base import Backbone, BackboneInfo, FeatureLayout, file_sha256, load_weights_file

__all__ = [
    "Backbone",
    "BackboneInfo",
    "DEFAULT_INPUT_SIZE",
    "FeatureLayout",
    "build_backbone",
    "file_sha256",
    "find_dinov2_weights",
    "load_weights_file",
    "resolve_backbone",
]

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = {"dinov2_vits14": 448, "efficientnet_lite0": 416, "efficientnet_lite2": 224}
_DINOV2_FILENAMES = ("dinov2_vits14_pretrain.pth", "dinov2_vits14.pth", "dinov2-small.safetensors",
                     "model.safetensors")


def find_dinov2_weights(data_root: Path) -> Path | None:
    """A DINOv2 ViT-S/14 file in ``<data_root>/weights/`` or torch hub's checkpoint cache."""
    import torch.hub  # get_dir() only reads TORCH_HOME / the default cache path; never downloads

    folders = [Path(data_root) / "weights", Path(torch.hub.get_dir()) / "checkpoints"]
    for folder in folders:
        for name in _DINOV2_FILENAMES:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def resolve_backbone(name: str, weights: Path | None, data_root: Path) -> tuple[str, Path | None, str]:
    """(backbone name, weights path or None for the embedded file, reason) for ``auto`` and others."""
    if name != "auto":
        return name, weights, f"BACKEND_BACKBONE={name}"
    if weights is not None:
        return "dinov2_vits14", weights, f"auto: BACKEND_WEIGHTS={weights}"
    found = find_dinov2_weights(data_root)
    if found is not None:
        return "dinov2_vits14", found, f"auto: DINOv2 weights found at {found}"
    return "efficientnet_lite0", None, "auto: no DINOv2 weights configured or found; embedded EfficientNet-Lite0"


def _dinov2(weights: Path | None, input_size: int, block: int | None) -> Backbone:
    from engine.backbones.dinov2 import load_dinov2
    from engine.errors import WeightsError

    if weights is None:
        raise WeightsError(
            "dinov2_vits14 needs a local weights file: set BACKEND_WEIGHTS to "
            "dinov2_vits14_pretrain.pth (Meta layout) or the facebook/dinov2-small model.safetensors"
        )
    return load_dinov2(weights, input_size=input_size, block=block)


def _lite(name: str) -> Callable[[Path | None, int, int | None], Backbone]:
    def build(weights: Path | None, input_size: int, block: int | None) -> Backbone:
        from engine.backbones.efficientnet_lite import load_efficientnet_lite

        return load_efficientnet_lite(name, input_size=input_size, weights_path=weights)

    return build


_BUILDERS: dict[str, Callable[[Path | None, int, int | None], Backbone]] = {
    "dinov2_vits14": _dinov2,
    "efficientnet_lite0": _lite("efficientnet_lite0"),
    "efficientnet_lite2": _lite("efficientnet_lite2"),
}


def build_backbone(
    name: str, weights: Path | None, data_root: Path, input_size: int | None = None,
    dinov2_block: int | None = None,
) -> tuple[Backbone, str]:
    """The backbone the settings ask for (``auto`` resolved), frozen on the CPU, and why it was chosen.

    Raises:
        WeightsError: the weights file is missing, truncated or not the expected one.
    """
    resolved, path, reason = resolve_backbone(name, weights, data_root)
    side = input_size or DEFAULT_INPUT_SIZE[resolved]
    model = _BUILDERS[resolved](path, side, dinov2_block)
    logger.info("backbone %s (%s), input %d px", resolved, reason, side)
    return model, reason

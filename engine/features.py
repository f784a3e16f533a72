"""Batched patch-feature extraction on the configured device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.backbones import Backbone

__all__ = ["FeatureExtractor"]


class FeatureExtractor:
    """Runs a frozen backbone on lists of (S, S, 3) uint8 images, ``batch_size`` at a time."""

    def __init__(self, backbone: Backbone, device: str, precision: str, batch_size: int) -> None:
        self.device = torch.device(device)
        self.dtype = _dtype(precision, self.device)
        backbone.fold_batch_norms()
        self.backbone = backbone.to(self.device)
        if self.dtype != torch.float32:
            self.backbone = self.backbone.to(self.dtype)
        if self.device.type == "cpu":
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
            # denormal activations made EfficientNet-Lite0 forwards 10-100x slower on x86
            # (1 s instead of 11 ms at 224 px, measured here); flushing them to zero fixes it
            torch.set_flush_denormal(True)
        self.batch_size = batch_size

    @property
    def precision(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N images (S, S, 3) uint8 -> (N, h, w, C) float32 features."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = np.stack(images[start : start + self.batch_size])        # B S S 3
                x = torch.from_numpy(batch).to(self.device, non_blocking=True)
                out.append(self.backbone(x).float().cpu().numpy())
        return np.concatenate(out, axis=0)


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type == "cuda" or _cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16, AMX), where oneDNN runs bf16 natively.

    Measured on such a CPU (AMD EPYC, 2 cores): EfficientNet-Lite0 forward 10.5 -> 4.7 ms at
    224 px and 34.8 -> 12.3 ms at 448 px, bottle AUROC unchanged (1.000 / 0.9816 -> 0.9818).
    Elsewhere bf16 would be emulated and slower, so fp32 stays.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private oneDNN probe: absent in some builds
        return False

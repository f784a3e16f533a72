"""Anomaly maps as 8-bit images on a fixed scale, so heatmaps compare across images.

Grey level = round(value / scale * THRESHOLD_GREY), clipped to 0..255, where ``scale`` is the
model's decision threshold: grey 128 is exactly the threshold, 255 is twice it or more.
"""

from __future__ import annotations

import cv2
import numpy as np

from engine.schemas import HeatmapFormat, RawArray

__all__ = ["THRESHOLD_GREY", "encode", "encode_png", "to_uint8"]

THRESHOLD_GREY = 128


# zlib level 1, run-length matching and the "up" row filter: a 900 x 900 heatmap encodes in
# ~5 ms (~80 KiB) where level 1 with libpng's adaptive filters took ~14 ms (~110 KiB); the
# pixels read back are the same (PNG is lossless whatever the settings)
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
               cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


def to_uint8(amap: np.ndarray, scale: float) -> np.ndarray:
    """(H, W) float map -> (H, W) uint8 with ``scale`` at grey THRESHOLD_GREY.

    round(value * THRESHOLD_GREY / scale) to the nearest even on ties, saturated to 0..255 (a
    negative value gives 0), in two OpenCV passes: ~0.5 ms for 900 x 900 against ~8 ms for the
    same arithmetic in numpy.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    _, positive = cv2.threshold(np.asarray(amap, dtype=np.float32), 0.0, 0.0, cv2.THRESH_TOZERO)
    return cv2.convertScaleAbs(positive, alpha=THRESHOLD_GREY / scale)


def encode_png(grey: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", grey, _PNG_PARAMS)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode(amap: np.ndarray, scale: float, fmt: HeatmapFormat) -> tuple[bytes | None, RawArray | None]:
    """(H, W) float map -> (PNG bytes, raw array) in the asked format; the other one is None.

    png: 8-bit grey PNG; uint8: the same grey levels as a raw array; float32: the map itself;
    none: neither.
    """
    if fmt == "png":
        return encode_png(to_uint8(amap, scale)), None
    if fmt == "uint8":
        grey = to_uint8(amap, scale)
        return None, RawArray(dtype="uint8", shape=grey.shape, data=grey.tobytes())
    if fmt == "float32":
        raw = np.ascontiguousarray(amap, np.float32)
        return None, RawArray(dtype="float32", shape=raw.shape, data=raw.tobytes())
    return None, None

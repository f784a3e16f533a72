"""ROI shapes (rect, circle, annulus) turned into boolean pixel masks.

Coordinates are continuous ROI pixel coordinates: pixel (i, j) covers [j, j+1) x [i, i+1) and
belongs to the shape when its centre (j + 0.5, i + 0.5) does.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from engine.errors import InvalidShape
from engine.schemas import AnnulusShape, CircleShape, RectShape, Shape

__all__ = ["BOUNDS_TOLERANCE_PX", "parse_shape", "shape_mask"]

BOUNDS_TOLERANCE_PX = 1.0  # rounding slack for shapes drawn by a GUI on the ROI's edge
_SHAPE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Shape)


def parse_shape(shape: Shape | dict[str, Any] | str | bytes | None) -> Shape | None:
    """A shape model from a model, a dict or JSON text; None or empty text means the whole image.

    Raises:
        InvalidShape: invalid JSON, unknown kind, missing or non-numeric fields.
    """
    if shape is None or isinstance(shape, RectShape | CircleShape | AnnulusShape):
        return shape
    if isinstance(shape, bytes | str):
        text = shape.decode("utf-8", "replace") if isinstance(shape, bytes) else shape
        if not text.strip() or text.strip() == "null":
            return None
        try:
            shape = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidShape(f"shape is not valid JSON: {exc.msg}") from exc
    if not isinstance(shape, dict):
        raise InvalidShape("shape must be a JSON object with a 'kind' of rect, circle or annulus")
    try:
        return _SHAPE_ADAPTER.validate_python(shape)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidShape(f"invalid shape ({where}: {first['msg']})") from exc


def shape_mask(shape: Shape | None, height: int, width: int) -> np.ndarray | None:
    """(height, width) bool mask of the shape; None for the whole image.

    Raises:
        InvalidShape: non-finite values, out of the image bounds, r_inner >= r, or no pixel covered.
    """
    if shape is None:
        return None
    values = [v for v in shape.model_dump().values() if isinstance(v, float | int)]
    if not all(np.isfinite(values)):
        raise InvalidShape("shape values must be finite numbers")
    tol = BOUNDS_TOLERANCE_PX
    if isinstance(shape, RectShape):
        if shape.x < -tol or shape.y < -tol or shape.x + shape.w > width + tol or shape.y + shape.h > height + tol:
            raise InvalidShape(
                f"rect x={shape.x}, y={shape.y}, w={shape.w}, h={shape.h} exceeds the image ({width}x{height})"
            )
        xs = np.arange(width) + 0.5
        ys = np.arange(height) + 0.5
        rows = (ys >= shape.y) & (ys < shape.y + shape.h)
        cols = (xs >= shape.x) & (xs < shape.x + shape.w)
        mask = rows[:, None] & cols[None, :]
    else:
        if isinstance(shape, AnnulusShape) and shape.r_inner >= shape.r:
            raise InvalidShape(f"annulus r_inner={shape.r_inner} must be smaller than r={shape.r}")
        if (shape.cx - shape.r < -tol or shape.cy - shape.r < -tol
                or shape.cx + shape.r > width + tol or shape.cy + shape.r > height + tol):
            raise InvalidShape(
                f"{shape.kind} cx={shape.cx}, cy={shape.cy}, r={shape.r} exceeds the image ({width}x{height})"
            )
        ys, xs = np.ogrid[:height, :width]
        d2 = (xs + 0.5 - shape.cx) ** 2 + (ys + 0.5 - shape.cy) ** 2
        mask = d2 <= shape.r**2
        if isinstance(shape, AnnulusShape):
            mask &= d2 > shape.r_inner**2
    if not mask.any():
        raise InvalidShape(f"{shape.kind} covers no pixel of the {width}x{height} image")
    return mask

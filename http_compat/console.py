"""The read-only console page (``GET /console``): every model of a recipe with its active version,
its OK-score histogram and threshold, its drift state and score chart, and its last inspections
as heatmap overlays with their region boxes.

Server-rendered HTML with inline SVG and ``data:`` PNGs: no script, no stylesheet or font from
anywhere, so the page works offline and loads nothing but itself.
"""

from __future__ import annotations

import base64
import html
import time
from typing import Any

import cv2
import numpy as np

from engine.api import Engine
from engine.errors import EngineError
from engine.schemas import HistoryEntry, ModelSummary

__all__ = ["render_console"]

_CHART_W, _CHART_H = 360, 120
_LAST = 8            # inspections shown per model
_SERIES = 200        # scores in the drift chart
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem;background:#f6f7f9;color:#222}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8rem;margin-bottom:1rem}
h2{margin:.2rem 0 .6rem;font-size:1.1rem}.row{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.state{padding:.1rem .5rem;border-radius:4px;font-weight:600}.ok{background:#d8f5dc}.watch{background:#fff2c2}
.alarm{background:#ffd0d0}figure{margin:0;font-size:.75rem;text-align:center}
.shot{position:relative;display:inline-block}.shot svg{position:absolute;left:0;top:0}
svg text{font-size:10px}table{border-collapse:collapse;font-size:.85rem}td,th{padding:.1rem .5rem;text-align:left}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _data_png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _overlay(entry: HistoryEntry) -> bytes | None:
    """The image thumbnail with its heatmap blended over it (jet colours), as PNG bytes."""
    if entry.thumbnail_jpeg is None or entry.heatmap_png is None:
        return None
    image = cv2.imdecode(np.frombuffer(entry.thumbnail_jpeg, np.uint8), cv2.IMREAD_COLOR)
    heat = cv2.imdecode(np.frombuffer(entry.heatmap_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None or heat is None or image.shape[:2] != heat.shape[:2]:
        return None
    blended = cv2.addWeighted(image, 0.55, cv2.applyColorMap(heat, cv2.COLORMAP_JET), 0.45, 0.0)
    ok, png = cv2.imencode(".png", blended)
    return png.tobytes() if ok else None


def _histogram(values: list[float], threshold: float | None) -> str:
    """SVG histogram of the fit's hold-out OK scores, the threshold as a red line."""
    if not values:
        return "<p>No hold-out OK scores (fitted on one image).</p>"
    top = max([*values, threshold or 0.0]) * 1.1 or 1.0
    counts, edges = np.histogram(values, bins=20, range=(0.0, top))
    bar_w, peak = _CHART_W / len(counts), max(int(counts.max()), 1)
    bars = "".join(
        f'<rect x="{i * bar_w:.1f}" y="{_CHART_H - 14 - c / peak * (_CHART_H - 24):.1f}" width="{bar_w - 1:.1f}" '
        f'height="{c / peak * (_CHART_H - 24):.1f}" fill="#4a7bd0"/>' for i, c in enumerate(counts))
    line = ""
    if threshold is not None:
        x = threshold / top * _CHART_W
        line = (f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{_CHART_H - 14}" stroke="#d00" stroke-width="2"/>'
                f'<text x="{min(x + 3, _CHART_W - 70):.1f}" y="10" fill="#d00">threshold {threshold:.3g}</text>')
    return (f'<svg class="histogram" width="{_CHART_W}" height="{_CHART_H}" role="img" '
            f'aria-label="OK-score histogram">{bars}{line}'
            f'<text x="0" y="{_CHART_H - 2}">0</text><text x="{_CHART_W - 30}" y="{_CHART_H - 2}">'
            f'{edges[-1]:.3g}</text></svg>')


def _drift_chart(scores: list[float], reference: float | None, threshold: float | None) -> str:
    """SVG line of the last scores (oldest left) with the reference median and the threshold."""
    if not scores:
        return "<p>No inspections recorded yet.</p>"
    top = max([*scores, reference or 0.0, threshold or 0.0]) * 1.1 or 1.0
    step = _CHART_W / max(len(scores) - 1, 1)
    points = " ".join(f"{i * step:.1f},{_CHART_H - s / top * _CHART_H:.1f}" for i, s in enumerate(scores))
    lines = ""
    for value, colour, label in ((reference, "#2a2", "reference median"), (threshold, "#d00", "threshold")):
        if value is not None:
            y = _CHART_H - value / top * _CHART_H
            lines += (f'<line x1="0" x2="{_CHART_W}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" '
                      f'stroke-dasharray="4 3"/><text x="2" y="{max(y - 2, 10):.1f}" fill="{colour}">{label}</text>')
    return (f'<svg class="drift-chart" width="{_CHART_W}" height="{_CHART_H}" role="img" aria-label="recent scores">'
            f'{lines}<polyline points="{points}" fill="none" stroke="#335" stroke-width="1.5"/></svg>')


def _shot(entry: HistoryEntry, roi_id: str) -> str:
    png = _overlay(entry)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.time))
    caption = f"{entry.decision or 'raw'} · {entry.score:.3g}<br>{stamp} UTC"
    if png is None:
        return f"<figure><div>no thumbnail</div><figcaption>{caption}</figcaption></figure>"
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    th, tw = image.shape[:2]
    sy, sx = th / max(entry.image_shape[0], 1), tw / max(entry.image_shape[1], 1)
    boxes = "".join(f'<rect class="region" x="{x * sx:.1f}" y="{y * sy:.1f}" width="{w * sx:.1f}" '
                    f'height="{h * sy:.1f}" fill="none" stroke="#fff" stroke-width="1.5"/>'
                    for x, y, w, h in entry.boxes)
    return (f'<figure><div class="shot"><img class="heatmap" width="{tw * 2}" height="{th * 2}" '
            f'alt="heatmap of {_e(roi_id)} inspection {entry.id}" src="{_data_png(png)}">'
            f'<svg width="{tw * 2}" height="{th * 2}" viewBox="0 0 {tw} {th}">{boxes}</svg></div>'
            f"<figcaption>{caption}</figcaption></figure>")


def _model_section(engine: Engine, model: ModelSummary) -> str:
    role, roi, recipe = model.role_id, model.roi_id, model.recipe_id
    try:
        manifest: dict[str, Any] = engine.manifest(role, roi, recipe_id=recipe)
        drift = engine.monitor.drift(role, roi, recipe_id=recipe)
        recent = engine.monitor.history(role, roi, limit=_SERIES, recipe_id=recipe)
        shots = engine.monitor.history(role, roi, limit=_LAST, thumbnails=True, recipe_id=recipe)
    except EngineError as exc:
        return f'<section data-roi="{_e(roi)}"><h2>{_e(role)} / {_e(roi)}</h2><p>{_e(exc.message)}</p></section>'
    threshold = manifest.get("threshold")
    values = [float(v) for v in (manifest.get("ok_scores") or {}).get("values") or []]
    scores = [item.score for item in reversed(recent.items) if item.model_version == model.model_version]
    figures = "".join(_shot(item, roi) for item in shots.items) or "<p>No inspections recorded yet.</p>"
    ks = "" if drift.ks_d is None else f" · KS D {drift.ks_d:.3f}, p {drift.ks_p:.2g}"
    return (
        f'<section class="model" data-role="{_e(role)}" data-roi="{_e(roi)}">'
        f"<h2>{_e(role)} / {_e(roi)} · version {model.model_version}</h2>"
        f"<table><tr><th>calibrated</th><td>{'yes' if model.calibrated else 'no'}</td><th>threshold</th>"
        f"<td>{_e('—' if threshold is None else f'{threshold:.4g}')}</td><th>memory rows</th>"
        f"<td>{model.coreset_size}</td><th>fitted</th><td>{_e(model.created_at)}</td></tr></table>"
        f'<div class="row"><div><h3>OK scores of the fit</h3>{_histogram(values, threshold)}</div>'
        f'<div><h3>Drift <span class="state {drift.state}">{drift.state}</span></h3>'
        f"{_drift_chart(scores, drift.median_reference, threshold)}"
        f"<p>{_e(drift.reason)} · {drift.n_window}/{drift.window} scores vs {drift.reference}{_e(ks)}</p></div></div>"
        f'<h3>Last inspections</h3><div class="row">{figures}</div></section>'
    )


def render_console(engine: Engine, recipe: str | None) -> str:
    """The whole page for ``recipe`` (None: the default recipe)."""
    models = engine.list_models(recipe_id=recipe)
    sections = "".join(_model_section(engine, model) for model in models) or "<p>No fitted model yet.</p>"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    title = "Inspection console" + (f" · recipe {recipe}" if recipe else "")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1><p>{len(models)} model(s) · {stamp} UTC "
            f"· read-only</p>{sections}</body></html>")

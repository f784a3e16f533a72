"""Quality: refined search against exact search, and bottle AUROC against coreset ratio.

* exact check: ``engine.evaluate.evaluate`` on the bottle category with the engine's defaults
  (all 209 train images; the 16k-row memory is above ``ivf_min_rows``, so it is searched
  approximately with exact refinement), then again with ``PATCHCORE_IVF_MIN_ROWS`` so high that
  the same memory is searched flat (exact). Image and pixel AUROC and every image score are
  compared; then both models are calibrated with one threshold (the exact fit's suggestion)
  and every test image is inferred on both: decisions and regions compared.
* sweep: for each coreset ratio x input size, a fit on ``max_train`` evenly spaced train images
  (a subset, stated in the report) and all 83 test images scored (pixel AUROC on maps and masks
  resized to 256 x 256). An error there is the combination's result (``error``).
"""

from __future__ import annotations

from typing import Any

from bench.suite.common import BOTTLE, run_child, say

FULL: dict[str, Any] = {"sizes": [224], "ratios": [0.01, 0.25], "max_train": 100, "exact_train": None,
                        "backbone": "efficientnet_lite0", "timeout_s": 900}
QUICK: dict[str, Any] = {**FULL, "sizes": [224], "ratios": [0.1], "max_train": 10, "exact_train": 24,
                         "timeout_s": 300}
SECTION = "quality"
PIXEL_SIDE = 256


def run(params: dict[str, Any]) -> dict[str, Any]:
    if not (BOTTLE / "train" / "good").is_dir():
        return {"error": f"bottle data not found at {BOTTLE}"}
    say(SECTION, "refined against exact search on the engine's default model")
    exact = run_child("quality:exact_check", params, timeout=params["timeout_s"])
    if "error" in exact:
        say(SECTION, f"exact check failed: {exact['error']}")
    rows = []
    for side in params["sizes"]:
        for ratio in params["ratios"]:
            say(SECTION, f"{params['backbone']} @ {side}, coreset {ratio:g}, {params['max_train']} train images")
            out = run_child("quality:one_eval", {**params, "side": side, "ratio": ratio}, timeout=params["timeout_s"])
            out.update(side=side, ratio=ratio)
            if "error" in out:
                say(SECTION, f"{side}/{ratio:g} failed: {out['error']}")
            else:
                say(SECTION, f"{side}/{ratio:g}: image AUROC {out['image_auroc']:.4f}, pixel AUROC "
                             f"{out['pixel_auroc']:.4f}, fit {out['fit_s']:.1f} s, infer {out['infer_ms_p50']:.1f} ms")
            rows.append(out)
    return {"backbone": params["backbone"], "max_train": params["max_train"], "dataset": "MVTec AD bottle",
            "rows": rows, "exact_check": exact}


def one_eval(params: dict[str, Any]) -> dict[str, Any]:
    from engine.evaluate import evaluate

    report = evaluate(BOTTLE, max_train=int(params["max_train"]), input_size=int(params["side"]),
                      coreset_ratio=float(params["ratio"]), backbone=params["backbone"], pixel_side=PIXEL_SIDE)
    fit_s = dict(report.fit_s)
    return {
        "method": "engine.evaluate.evaluate", "image_auroc": report.image_auroc, "pixel_auroc": report.pixel_auroc,
        "n_train": report.n_train, "n_test": report.n_test, "coreset_size": report.coreset_size,
        "n_embeddings": report.n_embeddings, "fit_s": fit_s.get("total", sum(fit_s.values())),
        "fit_stages_s": fit_s, "infer_ms_p50": report.infer_ms.get("total"), "infer_stages_ms_p50": report.infer_ms,
        "wall_s": report.wall_s,
    }


def exact_check(params: dict[str, Any]) -> dict[str, Any]:
    """Refined (default) and flat (exact) search on the same bottle fit: AUROCs, scores, decisions."""
    import os
    import tempfile
    from pathlib import Path

    from engine.evaluate import evaluate

    train = params.get("exact_train")
    reports, roots = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-exact-") as tmp:
        for name, min_rows in (("refined", None), ("exact", str(10**9))):
            if min_rows is not None:
                os.environ["PATCHCORE_IVF_MIN_ROWS"] = min_rows
            roots[name] = Path(tmp) / name
            reports[name] = evaluate(BOTTLE, max_train=train, data_root=roots[name], pixel_side=PIXEL_SIDE)
            say(SECTION, f"{name}: image AUROC {reports[name].image_auroc:.6f}, pixel AUROC "
                         f"{reports[name].pixel_auroc:.6f}, kNN {reports[name].infer_ms.get('knn', 0):.1f} ms")
        os.environ.pop("PATCHCORE_IVF_MIN_ROWS", None)
        decisions = _decisions(roots)
    refined, exact = reports["refined"], reports["exact"]
    pairs = list(zip(refined.scores, exact.scores, strict=True))
    rel = [abs(a.score - b.score) / max(1e-12, abs(b.score)) for a, b in pairs]
    return {
        "n_train": exact.n_train, "n_test": exact.n_test, "coreset_size": exact.coreset_size,
        "image_auroc": {"refined": refined.image_auroc, "exact": exact.image_auroc},
        "pixel_auroc": {"refined": refined.pixel_auroc, "exact": exact.pixel_auroc},
        "image_auroc_diff": round(abs(refined.image_auroc - exact.image_auroc), 6),
        "pixel_auroc_diff": round(abs((refined.pixel_auroc or 0) - (exact.pixel_auroc or 0)), 6),
        "max_score_rel_diff": max(rel), "infer_ms": {"refined": refined.infer_ms, "exact": exact.infer_ms},
        "fit_s": {"refined": refined.fit_s, "exact": exact.fit_s}, **decisions,
    }


def _decisions(roots: dict[str, Any]) -> dict[str, Any]:
    """Both evaluation models calibrated with one threshold; decisions and regions of every test image."""
    from engine.api import Engine
    from engine.evaluate import list_test
    from engine.settings import Settings

    role, roi, mm = "evaluate", "category", 1.0      # where engine.evaluate stores its model
    engines = {name: Engine(Settings(data_root=root)) for name, root in roots.items()}
    try:
        ok = engines["exact"].manifest(role, roi)["ok_scores"]["values"]
        threshold = min(e.calibrate_ng(role, roi, mm, ok, area_mm2_thr=0.0).threshold for e in engines.values())
        same_decisions = same_regions = same_pixels = ng = 0
        tests = list_test(BOTTLE)
        for item in tests:
            data = item.path.read_bytes()
            got = {name: e.infer(role, roi, mm, data, heatmap="float32") for name, e in engines.items()}
            a, b = got["refined"], got["exact"]
            same_decisions += a.decision == b.decision
            same_regions += [(r.bbox, r.area_px) for r in a.regions] == [(r.bbox, r.area_px) for r in b.regions]
            same_pixels += _same_region_pixels(a, b, threshold)
            ng += b.decision == "ng"
    finally:
        for engine in engines.values():
            engine.close()
    return {"threshold": threshold, "decisions_equal": same_decisions, "regions_equal": same_regions,
            "region_pixels_equal_beyond_rounding": same_pixels, "decisions_total": len(tests), "ng_by_exact": ng}


def _same_region_pixels(a: Any, b: Any, threshold: float) -> bool:
    """Both maps put the same pixels at or above the threshold, except pixels within 1e-5
    (relative) of it, where the flat search's float32 rounding (|q|^2 + |b|^2 - 2 q.b) alone
    can flip the comparison."""
    import numpy as np

    maps = [np.frombuffer(r.heatmap_raw.data, np.float32).reshape(r.heatmap_raw.shape) for r in (a, b)]
    differ = (maps[0] >= threshold) != (maps[1] >= threshold)
    return not np.any(differ & (np.abs(maps[1] - threshold) > 1e-5 * threshold))

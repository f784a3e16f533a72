"""Quality against speed: bottle image / pixel AUROC for each coreset ratio x input size.

One child process per combination. Fits on ``max_train`` evenly spaced bottle train images (a
subset, stated in the report) and scores all 83 test images, through ``engine.evaluate.evaluate``
(the project's evaluation: pixel AUROC on maps and masks resized to 256 x 256). When that module
is missing or its signature changed, the same protocol runs here (``method`` says which).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.suite.common import BOTTLE, MM, ROLE, image_files, run_child, say, scratch_dir, spread

FULL: dict[str, Any] = {"sizes": [224, 320], "ratios": [0.01, 0.1, 0.25], "max_train": 100,
                        "backbone": "efficientnet_lite0", "timeout_s": 600}
QUICK: dict[str, Any] = {**FULL, "sizes": [224], "ratios": [0.1], "max_train": 10, "timeout_s": 240}
SECTION = "quality"
PIXEL_SIDE = 256


def run(params: dict[str, Any]) -> dict[str, Any]:
    if not (BOTTLE / "train" / "good").is_dir():
        return {"error": f"bottle data not found at {BOTTLE}"}
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
            "rows": rows}


def one_eval(params: dict[str, Any]) -> dict[str, Any]:
    side, ratio, max_train = int(params["side"]), float(params["ratio"]), int(params["max_train"])
    try:
        from engine.evaluate import evaluate

        report = evaluate(BOTTLE, max_train=max_train, input_size=side, coreset_ratio=ratio,
                          backbone=params["backbone"], pixel_side=PIXEL_SIDE)
    except (ImportError, TypeError) as exc:
        out = _fallback(params)
        out["method"] = f"suite fallback (engine.evaluate unusable: {type(exc).__name__}: {exc})"
        return out
    fit_s = dict(report.fit_s)
    return {
        "method": "engine.evaluate.evaluate", "image_auroc": report.image_auroc, "pixel_auroc": report.pixel_auroc,
        "n_train": report.n_train, "n_test": report.n_test, "coreset_size": report.coreset_size,
        "n_embeddings": report.n_embeddings, "fit_s": fit_s.get("total", sum(fit_s.values())),
        "fit_stages_s": fit_s, "infer_ms_p50": report.infer_ms.get("total"), "infer_stages_ms_p50": report.infer_ms,
        "wall_s": report.wall_s,
    }


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC, ties counted as one half."""
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _fallback(params: dict[str, Any]) -> dict[str, Any]:
    import cv2

    from engine.api import Engine
    from engine.settings import Settings

    side, ratio = int(params["side"]), float(params["ratio"])
    train_all = image_files(BOTTLE / "train" / "good")
    train = [train_all[i] for i in spread(len(train_all), int(params["max_train"]))]
    tests = [(p, folder.name) for folder in sorted((BOTTLE / "test").iterdir()) if folder.is_dir()
             for p in image_files(folder)]
    start = time.perf_counter()
    with scratch_dir("bench-quality-") as tmp:
        engine = Engine(Settings(data_root=Path(tmp), backbone=params["backbone"], input_size=side,
                                 coreset_ratio=ratio, device="cpu", torch_threads=params.get("threads")))
        fit = engine.fit_ok(ROLE, "quality", MM, [p.read_bytes() for p in train])
        scores, labels, maps, masks, timings = [], [], [], [], []
        for path, defect in tests:
            r = engine.infer(ROLE, "quality", MM, path.read_bytes(), allow_uncalibrated=True, heatmap="float32")
            assert r.heatmap_raw is not None
            amap = np.frombuffer(r.heatmap_raw.data, dtype=np.float32).reshape(r.heatmap_raw.shape)
            maps.append(cv2.resize(amap, (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_AREA))
            mask_path = BOTTLE / "ground_truth" / defect / f"{path.stem}_mask.png"
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) if defect != "good" else None
            masks.append(np.zeros((PIXEL_SIDE, PIXEL_SIDE), bool) if mask is None else
                         cv2.resize(mask, (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_NEAREST) > 0)
            scores.append(r.score)
            labels.append(defect != "good")
            timings.append(r.timings_ms)
        engine.close()
    return {
        "image_auroc": round(auroc(np.array(scores), np.array(labels)), 6),
        "pixel_auroc": round(auroc(np.stack(maps), np.stack(masks)), 6),
        "n_train": len(train), "n_test": len(tests), "coreset_size": fit.coreset_size,
        "n_embeddings": fit.n_embeddings, "fit_s": round(sum(fit.timings_ms.values()) / 1000, 3),
        "fit_stages_s": {k: round(v / 1000, 3) for k, v in fit.timings_ms.items()},
        "infer_ms_p50": round(statistics.median(t["total"] for t in timings), 3),
        "infer_stages_ms_p50": {k: round(statistics.median(t[k] for t in timings if k in t), 3)
                                for k in dict.fromkeys(k for t in timings for k in t)},
        "wall_s": round(time.perf_counter() - start, 3),
    }

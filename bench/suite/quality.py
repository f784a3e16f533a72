"""Quality against speed: bottle image / pixel AUROC for each coreset ratio x input size.

One child process per combination. Fits on ``max_train`` evenly spaced bottle train images (a
subset, stated in the report) and scores all 83 test images, through ``engine.evaluate.evaluate``
(the project's evaluation: pixel AUROC on maps and masks resized to 256 x 256). An error there
is the combination's result (``error``), never a different method.
"""

from __future__ import annotations

from typing import Any

from bench.suite.common import BOTTLE, run_child, say

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

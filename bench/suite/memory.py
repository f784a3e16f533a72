"""Resident memory of the engine process with 1, 10 and 100 ROI models loaded.

A first child fits ``max(levels)`` small models (``images_per_model`` bottle images each) into a
data root; a second, fresh child starts an Engine on it with ``model_cache_size`` >= 100, warms
the backbone with one forward, then infers once on models 1..L (which loads each into the model
cache) and reads its RSS (/proc/self/statm) at each level L. The engine keeps a faiss flat index
per loaded model: ~coreset_size x feature_dim x 4 bytes each.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from bench.suite.common import (
    MM,
    ROLE,
    AugmentedImages,
    backbone_kwargs,
    bottle_test,
    mib,
    peak_rss_bytes,
    read_rgb,
    rss_bytes,
    run_child,
    say,
    scratch_dir,
    synthetic_rgb,
)

FULL: dict[str, Any] = {"levels": [1, 10, 100], "images_per_model": 10, "backbone": "efficientnet_lite0",
                        "side": 224, "timeout_s": 600}
QUICK: dict[str, Any] = {**FULL, "levels": [1, 3, 10], "images_per_model": 2, "timeout_s": 240}
SECTION = "memory"


def run(params: dict[str, Any]) -> dict[str, Any]:
    with scratch_dir("bench-memory-") as tmp:
        common = {**params, "root": tmp}
        say(SECTION, f"fitting {max(params['levels'])} models of {params['images_per_model']} images")
        fitted = run_child("memory:fit_models", common, timeout=params["timeout_s"])
        if "error" in fitted:
            return {"error": f"fitting the models: {fitted['error']}"}
        say(SECTION, f"fitted in {fitted['seconds']:.0f} s; loading 1..{max(params['levels'])} in a fresh process")
        measured = run_child("memory:measure", common, timeout=params["timeout_s"])
    measured["fit"] = fitted
    return {**measured, "backbone": params["backbone"], "side": params["side"],
            "images_per_model": params["images_per_model"]}


def _settings(params: dict[str, Any], **extra: Any) -> Any:
    from engine.settings import Settings

    root = Path(params["root"])
    return Settings(data_root=root / "data", device="cpu", torch_threads=params.get("threads"),
                    **backbone_kwargs(params["backbone"], int(params["side"]), root), **extra)


def fit_models(params: dict[str, Any]) -> dict[str, Any]:
    from engine.api import Engine

    count, per = max(params["levels"]), int(params["images_per_model"])
    engine = Engine(_settings(params, model_cache_size=1))
    images = AugmentedImages(count * per, source_side=int(params["side"]))
    t0 = time.perf_counter()
    sizes = []
    for m in range(count):
        fit = engine.fit_ok(ROLE, f"m{m}", MM, [images[m * per + j] for j in range(per)])
        sizes.append(fit.coreset_size)
    seconds = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in (Path(params["root"]) / "data").rglob("*") if p.is_file())
    return {"models": count, "seconds": round(seconds, 2), "coreset_size_mean": round(sum(sizes) / len(sizes), 1),
            "feature_dim": engine.backbone_info.feature_dim, "disk_mib_total": mib(disk),
            "token_shape": list(fit.token_shape), "source": images.source}


def measure(params: dict[str, Any]) -> dict[str, Any]:
    from engine.api import Engine

    levels = sorted(int(v) for v in params["levels"])
    side = int(params["side"])
    rows = []
    process_start = rss_bytes()
    engine = Engine(_settings(params, model_cache_size=max(100, max(levels))))
    tests = bottle_test("good")
    rgb = read_rgb(tests[0], side) if tests else synthetic_rgb(side, 7)
    engine.extractor([rgb])
    gc.collect()
    baseline = rss_bytes()
    loaded = 0
    for level in levels:
        for m in range(loaded, level):
            engine.infer(ROLE, f"m{m}", MM, rgb, heatmap="none", allow_uncalibrated=True)
        loaded = level
        gc.collect()
        rss = rss_bytes()
        rows.append({"models": level, "rss_mib": mib(rss), "above_baseline_mib": mib(rss - baseline),
                     "per_model_mib": round((rss - baseline) / level / 2**20, 3),
                     "cached": len(engine.health().rois)})
        say(SECTION, f"{level} models loaded: RSS {mib(rss)} MiB (+{mib(rss - baseline)} MiB)")
    engine.close()
    return {"rss_before_engine_mib": mib(process_start), "baseline_rss_mib": mib(baseline),
            "baseline_note": "engine started, backbone loaded, one forward done, no ROI model loaded",
            "rows": rows, "process_peak_rss_mib": mib(peak_rss_bytes())}

"""GPU targets: DINOv2 ViT-S/14 at 448 on CUDA (``Settings(device="cuda")``).

* infer p50 in-process (target <= 5 ms): the ROI as a raw RGB array, no heatmap (engine compute:
  extract + kNN on the torch bank + map + regions); the PNG-in / PNG-heatmap call is reported too.
* fit of 200 images (target <= 3 s): wall time of ``Engine.fit_ok`` on 200 bottle images
  (RGB arrays at 448 px), after a warm-up fit of 16 images (CUDA context, cuDNN/cuBLAS set-up).

Without a CUDA device nothing runs and the report says "not measured: no CUDA device". DINOv2
runs on random-init weights (speed does not depend on the weights' values).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.suite.common import (
    MM,
    ROLE,
    AugmentedImages,
    backbone_kwargs,
    bottle_test,
    png_bytes,
    read_rgb,
    round_robin,
    say,
    scratch_dir,
    stats,
    synthetic_rgb,
)

FULL: dict[str, Any] = {"side": 448, "fit_images": 200, "warmup_fit_images": 16, "budget_s": 20.0, "n_min": 50,
                        "n_max": 500, "timeout_s": 600}
QUICK: dict[str, Any] = {**FULL, "budget_s": 3.0, "n_min": 20, "n_max": 100, "timeout_s": 300}
SECTION = "gpu"


def run(params: dict[str, Any]) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"measured": False, "status": "not measured: no CUDA device"}
    from engine.api import Engine
    from engine.settings import Settings

    side = int(params["side"])
    with scratch_dir("bench-gpu-") as tmp:
        settings = Settings(data_root=Path(tmp) / "data", device="cuda",
                            **backbone_kwargs("dinov2_vits14", side, Path(tmp)))
        engine = Engine(settings)
        images = AugmentedImages(int(params["fit_images"]), source_side=side)
        for i in range(len(images.order)):
            images[i]                                  # decode the originals outside the timing
        say(SECTION, f"warm-up fit of {params['warmup_fit_images']} images")
        engine.fit_ok(ROLE, "warmup", MM, [images[i] for i in range(int(params["warmup_fit_images"]))])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fit = engine.fit_ok(ROLE, "roi", MM, images)
        torch.cuda.synchronize()
        fit_wall = time.perf_counter() - t0
        engine.calibrate_ng(ROLE, "roi", MM, list(fit.ok_scores))
        say(SECTION, f"fit of {len(images)} images: {fit_wall:.2f} s")
        tests = bottle_test("broken_large")
        rgb = read_rgb(tests[0], side) if tests else synthetic_rgb(side, 3)
        png = png_bytes(rgb)

        def forward() -> Any:
            out = engine.extractor([rgb])
            return out

        calls = {
            "forward": forward,
            "in-process raw": lambda: engine.infer(ROLE, "roi", MM, rgb, heatmap="none"),
            "in-process": lambda: engine.infer(ROLE, "roi", MM, png, heatmap="png"),
        }
        times = round_robin(calls, params["budget_s"], params["n_min"], params["n_max"], warmup=5)
        engine.close()
    return {
        "measured": True, "device": torch.cuda.get_device_name(0), "precision": engine.extractor.precision,
        "side": side, "batch_size": engine.extractor.batch_size, "fit_images": len(images),
        "fit_wall_s": round(fit_wall, 3), "fit_timings_ms": dict(fit.timings_ms), "coreset_size": fit.coreset_size,
        "n_embeddings": fit.n_embeddings, "infer": {k: stats(v) for k, v in times.items()},
    }

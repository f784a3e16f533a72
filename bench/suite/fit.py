"""Fit time against the number of training images, by stage (``FitResult.timings_ms``: decode,
extract, coreset, index, ok_scores, save). 762 images at 224 px make ~600k patches (the size of
the fit target: <= 45 s on a 2-core CPU).

One child process per image count, so each count's peak RSS (ru_maxrss) is its own. Images are
bottle train images, augmented (flips, rotations, crops) beyond the 209 originals, passed to
``Engine.fit_ok`` as RGB arrays of ~380-448 px: the ``decode`` stage is then array checks and
the resize to the input side, not PNG decoding (a 900 x 900 PNG decode adds ~15-20 ms/image).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.suite.common import (
    MM,
    ROLE,
    AugmentedImages,
    RssSampler,
    backbone_kwargs,
    mib,
    peak_rss_bytes,
    rss_bytes,
    run_child,
    say,
    scratch_dir,
)

FULL: dict[str, Any] = {"counts": [10, 50, 209, 762], "backbone": "efficientnet_lite0", "side": 224,
                        "coreset_ratio": 0.1, "timeout_s": 600}
QUICK: dict[str, Any] = {**FULL, "counts": [10, 50], "timeout_s": 180}
SECTION = "fit"


def run(params: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for n in params["counts"]:
        say(SECTION, f"fit_ok on {n} images ({params['backbone']} @ {params['side']})")
        out = run_child("fit:one_fit", {**params, "n": n}, timeout=params["timeout_s"])
        out["n_images"] = n
        if "error" in out:
            say(SECTION, f"{n} images failed: {out['error']}")
        else:
            say(SECTION, f"{n} images: {out['wall_s']:.1f} s " +
                ", ".join(f"{k} {v / 1000:.1f}" for k, v in out["timings_ms"].items()))
        rows.append(out)
    return {"backbone": params["backbone"], "side": params["side"], "coreset_ratio": params["coreset_ratio"],
            "rows": rows}


def one_fit(params: dict[str, Any]) -> dict[str, Any]:
    from engine.api import Engine
    from engine.settings import Settings

    n = int(params["n"])
    with scratch_dir("bench-fit-") as tmp:
        settings = Settings(data_root=Path(tmp) / "data", coreset_ratio=params["coreset_ratio"], device="cpu",
                            torch_threads=params.get("threads"),
                            **backbone_kwargs(params["backbone"], int(params["side"]), Path(tmp)))
        engine = Engine(settings)
        images = AugmentedImages(n)
        for i in range(len(images.order)):       # load the originals now, outside the timed fit
            images[i]
        from engine.images import resize_square

        engine.extractor([resize_square(images[0], engine.backbone_info.input_size)])  # first-call set-up
        before = rss_bytes()
        t0 = time.perf_counter()
        with RssSampler(0.02) as sampler:
            fit = engine.fit_ok(ROLE, f"fit{n}", MM, images)
        wall = time.perf_counter() - t0
        index = engine.manifest(ROLE, f"fit{n}")["index"]
        engine.close()
        return {
            "index": index,
            "source": images.source, "wall_s": round(wall, 3), "timings_ms": dict(fit.timings_ms),
            "n_embeddings": fit.n_embeddings, "coreset_size": fit.coreset_size,
            "token_shape": list(fit.token_shape), "ok_scores": len(fit.ok_scores),
            "rss_before_mib": mib(before), "fit_peak_extra_rss_mib": mib(sampler.peak_delta),
            "process_peak_rss_mib": mib(peak_rss_bytes()),
        }

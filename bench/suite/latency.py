"""Infer latency per ROI: backbone forward alone, in-process, ZeroMQ and REST, and a multi-ROI part.

One child process per (backbone, input side). Each fits a small calibrated model on bottle
train images at the input side, then times the same ROI image (a bottle test image with a
defect, resized to the input side) through every path, called in turn:

* ``forward``: ``engine.extractor([rgb])`` - uint8 RGB in, patch features out (normalization
  included); what the backbone alone costs.
* ``in-process`` / ``ZeroMQ`` / ``REST``: ``infer`` with the ROI as PNG bytes and a PNG heatmap
  back (what the GUI sends and gets): ``Engine.infer``, ``ipc.EngineClient.infer`` over
  tcp://127.0.0.1, ``POST /infer`` multipart on a kept-alive httpx connection.
* ``in-process raw`` / ``ZeroMQ raw``: the ROI as a raw RGB array, no heatmap: the engine's
  compute (extract + kNN + map + regions) and the door's transport only.

Then a part with several ROIs (one model each): ``infer_batch`` (one call) against N single
``infer`` calls, in-process and through ZeroMQ.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.suite.common import (
    MM,
    ROLE,
    AugmentedImages,
    backbone_kwargs,
    bottle_test,
    png_bytes,
    read_rgb,
    round_robin,
    run_child,
    say,
    scratch_dir,
    stats,
    synthetic_rgb,
)

FULL: dict[str, Any] = {
    "configs": [["efficientnet_lite0", 224], ["efficientnet_lite0", 448], ["efficientnet_lite2", 224],
                ["efficientnet_lite2", 448], ["dinov2_vits14", 224], ["dinov2_vits14", 448]],
    "fit_images": 10, "budget_s": 25.0, "n_min": 10, "n_max": 200,
    "multi_rois": 4, "multi_fit_images": 2, "multi_budget_s": 12.0, "multi_n_min": 3, "multi_n_max": 60,
    "timeout_s": 420,
}
QUICK: dict[str, Any] = {
    **FULL, "configs": [["efficientnet_lite0", 224], ["efficientnet_lite0", 448], ["efficientnet_lite2", 224],
                        ["dinov2_vits14", 224]],
    "fit_images": 3, "budget_s": 2.0, "n_min": 3, "n_max": 20,
    "multi_rois": 3, "multi_budget_s": 1.0, "multi_n_min": 2, "multi_n_max": 5, "timeout_s": 180,
}
SECTION = "latency"


def run(params: dict[str, Any]) -> dict[str, Any]:
    results = []
    for backbone, side in params["configs"]:
        say(SECTION, f"{backbone} @ {side}")
        child = {k: v for k, v in params.items() if k != "configs"}
        out = run_child("latency:one_config", {**child, "backbone": backbone, "side": side},
                        timeout=params["timeout_s"])
        out.update(backbone=backbone, side=side)
        if "error" in out:
            say(SECTION, f"{backbone} @ {side} failed: {out['error']}")
        results.append(out)
    return {"configs": results}


def _probe_images(side: int, count: int) -> tuple[list[np.ndarray], str]:
    files = bottle_test("broken_large") + bottle_test("contamination") + bottle_test("broken_small")
    if files:
        return [read_rgb(files[i % len(files)], side) for i in range(count)], "MVTec AD bottle test (defective)"
    return [synthetic_rgb(side, 1000 + i) for i in range(count)], "synthetic"


def one_config(params: dict[str, Any]) -> dict[str, Any]:
    from engine.api import Engine
    from engine.settings import Settings

    backbone, side = params["backbone"], int(params["side"])
    rois = int(params["multi_rois"])
    with scratch_dir("bench-latency-") as tmp, contextlib.ExitStack() as stack:
        settings = Settings(
            data_root=Path(tmp) / "data", zmq_endpoint="tcp://127.0.0.1:*", zmq_events=None, http_host="127.0.0.1",
            http_port=0, api_key=None, model_cache_size=max(16, rois + 1), torch_threads=params.get("threads"),
            device="cpu", **backbone_kwargs(backbone, side, Path(tmp)),
        )
        t0 = time.perf_counter()
        engine = Engine(settings)
        stack.callback(engine.close)
        start_s = time.perf_counter() - t0
        info = engine.backbone_info

        train = AugmentedImages(int(params["fit_images"]) + rois * int(params["multi_fit_images"]), source_side=side)
        n_fit = int(params["fit_images"])
        t0 = time.perf_counter()
        fit = engine.fit_ok(ROLE, "roi", MM, [train[i] for i in range(n_fit)])
        fit_s = time.perf_counter() - t0
        engine.calibrate_ng(ROLE, "roi", MM, list(fit.ok_scores))
        probes, probe_source = _probe_images(side, max(1, rois))
        rgb = probes[0]
        png = png_bytes(rgb)
        say(SECTION, f"{backbone} @ {side}: engine {start_s:.1f} s, fit {n_fit} images {fit_s:.1f} s "
                     f"(coreset {fit.coreset_size}/{fit.n_embeddings})")

        stage_log: list[dict[str, float]] = []

        def in_process() -> Any:
            result = engine.infer(ROLE, "roi", MM, png, heatmap="png")
            stage_log.append(result.timings_ms)
            return result

        calls: dict[str, Any] = {
            "forward": lambda: engine.extractor([rgb]),
            "in-process": in_process,
        }
        notes: list[str] = []
        client = _zmq(stack, engine, settings, notes)
        if client is not None:
            calls["ZeroMQ"] = lambda: client.infer(ROLE, "roi", MM, png, heatmap="png")
        http = _rest(stack, engine, settings, notes)
        if http is not None:
            fields = {"role_id": ROLE, "roi_id": "roi", "mm_per_px": str(MM), "heatmap": "png"}

            def rest() -> Any:
                r = http.post("/infer", data=fields, files={"image": ("roi.png", png, "image/png")})
                r.raise_for_status()
                return r.json()

            calls["REST"] = rest
        calls["in-process raw"] = lambda: engine.infer(ROLE, "roi", MM, rgb, heatmap="none")
        if client is not None:
            calls["ZeroMQ raw"] = lambda: client.infer(ROLE, "roi", MM, rgb, heatmap="none")

        check = engine.infer(ROLE, "roi", MM, png, heatmap="png")
        times = round_robin(calls, params["budget_s"], params["n_min"], params["n_max"])
        stage_log = stage_log[-len(times["forward"]):]
        stages = {k: round(statistics.median(t[k] for t in stage_log if k in t), 3)
                  for k in dict.fromkeys(k for t in stage_log for k in t)}
        say(SECTION, f"{backbone} @ {side}: "
                     + ", ".join(f"{k} p50 {stats(v)['p50']:.1f} ms" for k, v in times.items()))

        multi = _multi_roi(engine, client, train, n_fit, probes, params) if rois > 1 else None
        return {
            "backbone_name": info.name, "input_size": info.input_size, "feature_dim": info.feature_dim,
            "token_shape": list(fit.token_shape), "random_init_weights": backbone == "dinov2_vits14",
            "engine_start_s": round(start_s, 3), "fit_images": n_fit, "fit_s": round(fit_s, 3),
            "coreset_size": fit.coreset_size, "n_embeddings": fit.n_embeddings, "probe_source": probe_source,
            "probe_png_kib": round(len(png) / 1024, 1), "probe_decision": check.decision,
            "probe_score": round(check.score, 5), "threshold": check.threshold,
            "doors": {name: stats(ms) for name, ms in times.items()},
            "in_process_stages_ms_p50": stages, "multi_roi": multi, "notes": notes,
        }


def _zmq(stack: contextlib.ExitStack, engine: Any, settings: Any, notes: list[str]) -> Any:
    try:
        from ipc.client import EngineClient
        from ipc.server import IpcServer
    except ImportError as exc:
        notes.append(f"ZeroMQ door not available: {exc}")
        return None
    server = IpcServer(engine, settings)
    server.start()
    stack.callback(server.stop)
    return stack.enter_context(EngineClient(server.endpoint, timeout=300, long_timeout=1800))


def _rest(stack: contextlib.ExitStack, engine: Any, settings: Any, notes: list[str]) -> Any:
    try:
        import httpx

        from http_compat.server import HttpServer
    except ImportError as exc:
        notes.append(f"REST door not available: {exc}")
        return None
    try:
        server = HttpServer(engine, settings)
        server.start()
    except Exception as exc:  # noqa: BLE001 - the shim may still be in progress
        notes.append(f"REST door failed to start: {type(exc).__name__}: {exc}")
        return None
    stack.callback(server.stop)
    return stack.enter_context(httpx.Client(base_url=server.url, timeout=300))


def _multi_roi(engine: Any, client: Any, train: AugmentedImages, first: int, probes: list[np.ndarray],
               params: dict[str, Any]) -> dict[str, Any]:
    """One part with R ROIs, each its own model: infer_batch vs R single infers."""
    rois, per = int(params["multi_rois"]), int(params["multi_fit_images"])
    for r in range(rois):
        images = [train[first + r * per + j] for j in range(per)]
        fit = engine.fit_ok(ROLE, f"part_{r}", MM, images)
        engine.calibrate_ng(ROLE, f"part_{r}", MM, list(fit.ok_scores) or [0.0])
    items = [{"roi_id": f"part_{r}", "image": png_bytes(probes[r % len(probes)]), "mm_per_px": MM}
             for r in range(rois)]
    check = engine.infer_batch(ROLE, items, heatmap="png")
    if check.n_errors:
        raise RuntimeError(f"infer_batch returned errors: {[i.error for i in check.items if i.error]}")

    def singles(call: Any) -> None:
        for item in items:
            call(ROLE, item["roi_id"], MM, item["image"], heatmap="png")

    calls: dict[str, Any] = {
        "batch in-process": lambda: engine.infer_batch(ROLE, items, heatmap="png"),
        "singles in-process": lambda: singles(engine.infer),
    }
    if client is not None:
        calls["batch ZeroMQ"] = lambda: client.infer_batch(ROLE, items, heatmap="png")
        calls["singles ZeroMQ"] = lambda: singles(client.infer)
    times = round_robin(calls, params["multi_budget_s"], params["multi_n_min"], params["multi_n_max"], warmup=1)
    out = {"rois": rois, "fit_images_per_roi": per, "per_part_ms": {k: stats(v) for k, v in times.items()}}
    out["per_roi_p50_ms"] = {k: round(v["p50"] / rois, 3) for k, v in out["per_part_ms"].items()}
    for door in ("in-process", "ZeroMQ"):
        b, s = out["per_part_ms"].get(f"batch {door}"), out["per_part_ms"].get(f"singles {door}")
        if b and s:
            out[f"batch_speedup_{door}"] = round(s["p50"] / b["p50"], 3)
    return out

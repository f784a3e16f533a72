"""ROI latency on production-sized models, by stage and door; thread counts; small-model figures.

* production: EfficientNet-Lite0 fitted on all 209 bottle train images (900 x 900 PNG files) at
  416 px with a 1.5 % coreset (the engine's defaults), 224 px with 10 % (the defaults before
  320 px / 2.5 %), 320 px with 1.5 % and 448 px with 10 % (a memory of >= 60k rows); and 762 images
  (the 209 and augmented copies) at 224 px with 10.1 % (~60k rows, 784 patches per ROI); each
  calibrated on its hold-out OK scores.
  Two 900 x 900 PNG ROIs (a defective and a good bottle test image, the files as they are) go
  through every path, called in turn so drift hits all alike:
  ``decode+resize`` (decode_image + resize_square), ``forward`` (extractor), ``in-process``
  (``Engine.infer``, PNG in, PNG heatmap out), ``ZeroMQ`` (the same through the ZeroMQ door on
  loopback) and ``ZeroMQ raw`` (RGB array in, no heatmap). Stages are the medians of the
  in-process ``timings_ms``; the ratio is ZeroMQ p50 / (decode+resize p50 + forward p50), all
  from one run. Then every bottle test image is scored in-process to count the patches the
  refinement re-scored exactly, and a few are checked against a flat (exact) search.
* threads: the first production model (the default side), loaded in a fresh process per
  ``BACKEND_TORCH_THREADS`` value, under 1, 2 and 4 clients sending PNG ROIs through the ZeroMQ
  door at once: ROIs per second and per-request p50; then one client pausing 0.2 s before each
  ROI (paced, as parts come one by one): per-request p50 and p90 when the cores were idle.
* crossover: kNN stage of flat against refined search on memories of increasing size (random
  subsets of bottle patch features at the default side): where the refined search starts to pay.
* small: 10-image models of other backbones (labelled as such), forward against infer.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.suite.common import (
    BOTTLE,
    MM,
    ROLE,
    AugmentedImages,
    backbone_kwargs,
    bottle_test,
    bottle_train,
    mib,
    png_bytes,
    read_rgb,
    round_robin,
    rss_bytes,
    run_child,
    say,
    scratch_dir,
    stats,
    synthetic_rgb,
)

FULL: dict[str, Any] = {
    # [side, images, coreset ratio]: the engine's default (416, 1.5 %), the first one (224, 10 %) and
    # 320 px at the default ratio side by side, and memories of >= 60k rows: 448 px (10 %), and 762
    # images at 224 px (597 408 patches: the size of a large texture set's fit; 10.1 %, as 10 % keeps
    # 59 741 rows)
    "production": [[416, 209, 0.015], [224, 209, 0.1], [320, 209, 0.015], [448, 209, 0.1], [224, 762, 0.101]],
    "budget_s": 40.0, "n_min": 15, "n_max": 150, "exact_checks": 8, "exact_all_max_rows": 20000,
    "thread_counts": [1, 2, 0], "clients": [1, 2, 4], "throughput_s": 8.0, "paced_n": 30, "paced_gap_s": 0.2,
    "crossover_rows": [2000, 4000, 8000, 16000, 32000, 64000],
    "small": [["efficientnet_lite0", 224], ["efficientnet_lite2", 224], ["dinov2_vits14", 224]],
    "small_fit_images": 10, "small_budget_s": 8.0, "timeout_s": 900,
}
QUICK: dict[str, Any] = {
    **FULL, "production": [[416, 24, 0.015]], "budget_s": 4.0, "n_min": 4, "n_max": 20, "exact_checks": 2,
    "thread_counts": [1, 0], "clients": [1, 2], "throughput_s": 2.0, "paced_n": 5, "crossover_rows": [2000, 16000],
    "small": [["efficientnet_lite0", 224]], "small_budget_s": 2.0, "timeout_s": 300,
}
SECTION = "latency"
PROBES = {"defective": ("broken_large", 0), "good": ("good", 0)}


def run(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"production": [], "threads": [], "small": []}
    with scratch_dir("bench-latency-") as root:
        for side, images, ratio in params["production"]:
            say(SECTION, f"production model: bottle {images} images @ {side}, coreset {ratio}")
            result = run_child("latency:one_production", {**params, "side": side, "images": images, "ratio": ratio,
                                                          "root": root}, timeout=params["timeout_s"])
            result.update(side=side, images=images, coreset_ratio=ratio)
            out["production"].append(result)
            if "error" in result:
                say(SECTION, f"{images} @ {side} failed: {result['error']}")
        first = params["production"][0]
        for threads in params["thread_counts"]:
            say(SECTION, f"threads {threads or 'default'}: {', '.join(map(str, params['clients']))} clients")
            result = run_child("latency:one_threads", {**params, "side": first[0], "images": first[1], "root": root,
                                                       "threads": threads or None}, timeout=params["timeout_s"])
            result["torch_threads"] = threads or "default"
            result["side"] = first[0]
            out["threads"].append(result)
    say(SECTION, "flat against refined search by memory size")
    out["crossover"] = run_child("latency:crossover", params, timeout=params["timeout_s"])
    for backbone, side in params["small"]:
        say(SECTION, f"10-image model: {backbone} @ {side}")
        result = run_child("latency:one_small", {**params, "backbone": backbone, "side": side},
                           timeout=params["timeout_s"])
        result.update(backbone=backbone, side=side)
        out["small"].append(result)
    return out


def _probe_files() -> dict[str, bytes]:
    """The probe ROIs as PNG files (900 x 900 bottle test images; synthetic without the data)."""
    out = {}
    for name, (folder, index) in PROBES.items():
        files = bottle_test(folder)
        out[name] = files[index].read_bytes() if files else png_bytes(synthetic_rgb(900, 7 + index))
    return out


def _train_files(count: int) -> list[Any]:
    files = bottle_train()
    if len(files) >= count:
        return [p.read_bytes() for p in files[:count]]
    images = AugmentedImages(count, source_side=900)
    return [png_bytes(images[i]) for i in range(count)]


def _engine(root: Path, side: int, threads: int | None, zmq_workers: int = 4,
            coreset_ratio: float | None = None) -> tuple[Any, Any]:
    from engine.api import Engine
    from service.serve import ServeConfig

    ratio = {} if coreset_ratio is None else {"coreset_ratio": coreset_ratio}
    config = ServeConfig.of(data_root=root, backbone="efficientnet_lite0", input_size=side, device="cpu", **ratio,
                            torch_threads=threads, zmq_endpoint="tcp://127.0.0.1:*", zmq_workers=zmq_workers,
                            zmq_events=None, log_level="WARNING")
    return Engine(config.engine), config


@contextlib.contextmanager
def _zmq_door(engine: Any, config: Any) -> Any:
    from ipc.client import EngineClient
    from ipc.server import IpcServer

    server = IpcServer(engine, config.ipc)
    server.start()
    try:
        yield server.endpoint, EngineClient
    finally:
        server.stop()


def one_production(params: dict[str, Any]) -> dict[str, Any]:
    side, images = int(params["side"]), int(params["images"])
    root = Path(params["root"]) / f"p{side}-{images}"
    engine, config = _engine(root, side, params.get("threads"), coreset_ratio=params.get("ratio"))
    try:
        t0 = time.perf_counter()
        fit = engine.fit_ok(ROLE, "roi", MM, _train_files(images))
        fit_s = time.perf_counter() - t0
        engine.calibrate_ng(ROLE, "roi", MM, list(fit.ok_scores))
        manifest = engine.manifest(ROLE, "roi")
        say(SECTION, f"{images} @ {side}: fit {fit_s:.1f} s, memory {fit.coreset_size} rows "
                     f"({manifest['index']['kind']}), threshold {manifest['threshold']:.3f}")
        with _zmq_door(engine, config) as (endpoint, client_class), \
                client_class(endpoint, timeout=300, long_timeout=1800) as client:
            timing = _time_paths(engine, client, side, params)
        before = rss_bytes()
        refinement = _refinement(engine, side, int(params["exact_checks"]), int(params["exact_all_max_rows"]))
        return {
            "fit_s": round(fit_s, 3), "fit_timings_ms": dict(fit.timings_ms), "coreset_size": fit.coreset_size,
            "n_embeddings": fit.n_embeddings, "token_shape": list(fit.token_shape), "index": manifest["index"],
            "threshold": manifest["threshold"], **timing, "refinement": refinement, "rss_mib": mib(before),
        }
    finally:
        engine.close()


def _time_paths(engine: Any, client: Any, side: int, params: dict[str, Any]) -> dict[str, Any]:
    from engine.images import decode_image, resize_square

    probes = _probe_files()
    rgbs = {name: decode_image(png, 10**9) for name, png in probes.items()}
    stage_log: dict[str, list[dict[str, float]]] = {name: [] for name in probes}
    calls: dict[str, Any] = {}
    for name, png in probes.items():
        resized = resize_square(rgbs[name], side)

        def in_process(name: str = name, png: bytes = png) -> None:
            stage_log[name].append(dict(engine.infer(ROLE, "roi", MM, png, heatmap="png").timings_ms))

        calls[f"decode+resize {name}"] = lambda png=png: resize_square(decode_image(png, 10**9), side)
        calls[f"forward {name}"] = lambda resized=resized: engine.extractor([resized])
        calls[f"in-process {name}"] = in_process
        calls[f"ZeroMQ {name}"] = lambda png=png: client.infer(ROLE, "roi", MM, png, heatmap="png")
        calls[f"ZeroMQ raw {name}"] = lambda rgb=rgbs[name]: client.infer(ROLE, "roi", MM, rgb, heatmap="none")
    times = round_robin(calls, params["budget_s"], params["n_min"], params["n_max"])
    doors = {key: stats(ms) for key, ms in times.items()}
    out: dict[str, Any] = {"doors": doors, "probes": {}}
    for name in probes:
        log = stage_log[name][-len(times[f"forward {name}"]):]
        names = dict.fromkeys(k for t in log for k in t)
        stages = {k: round(statistics.median(t[k] for t in log if k in t), 3) for k in names}
        base = doors[f"decode+resize {name}"]["p50"] + doors[f"forward {name}"]["p50"]
        zmq = doors[f"ZeroMQ {name}"]["p50"]
        result = engine.infer(ROLE, "roi", MM, probes[name], heatmap="png")
        out["probes"][name] = {
            "stages_ms_p50": stages, "decode_resize_forward_p50": round(base, 3),
            "zmq_ratio": round(zmq / base, 3), "zmq_raw_ratio": round(doors[f"ZeroMQ raw {name}"]["p50"] / base, 3),
            "knn_share_of_zmq": round(stages.get("knn", 0.0) / zmq, 4),
            "door_ms": round(zmq - doors[f"in-process {name}"]["p50"], 3),
            "decision": result.decision, "score": round(result.score, 5), "png_kib": round(len(probes[name]) / 1024, 1),
            "heatmap_kib": round(len(result.heatmap_png or b"") / 1024, 1),
        }
        say(SECTION, f"@ {side} {name}: ZeroMQ p50 {zmq:.1f} ms = {zmq / base:.2f}x (decode+resize + forward "
                     f"{base:.1f} ms); kNN {stages.get('knn', 0):.1f} ms")
    return out


def _refinement(engine: Any, side: int, exact_checks: int, exact_all_max_rows: int) -> dict[str, Any]:
    """Patches re-scored exactly over the bottle test set, and refined against flat (exact) search.

    Memories of at most ``exact_all_max_rows`` rows are checked on every test image: image and
    pixel AUROC (maps and masks at 256 px, as ``python -m engine evaluate``), every decision and
    every image score; larger ones on ``exact_checks`` images spread over the set.
    """
    import cv2

    from engine.anomaly_map import anomaly_map, masked_percentile
    from engine.evaluate import list_test, read_mask, resize_side
    from engine.images import decode_image, resize_square
    from engine.knn import build_index, knn_distances
    from engine.metrics import auroc
    from engine.patchcore import score_map
    from engine.regions import find_regions
    from engine.threads import run_inference

    model = engine.models.load(engine.models.key(ROLE, "roi"))
    manifest, threshold = model.manifest, float(model.calibration["threshold"])
    sigma, percentile = float(manifest["score"]["gaussian_sigma"]), float(manifest["score"]["percentile"])
    tests = list_test(BOTTLE) if BOTTLE.is_dir() else []
    bank = engine.models.store(None).load(ROLE, "roi").embeddings
    check_all = len(bank) <= exact_all_max_rows
    flat = build_index(bank, manifest["distance"]) if exact_checks or check_all else None
    every = 1 if check_all else max(1, len(tests) // max(1, exact_checks))
    rows, checks, truth_maps, refined_maps, masks, labels = [], [], [], [], [], []
    for i, item in enumerate(tests):
        rgb = decode_image(item.path.read_bytes(), 10**9)
        height, width = rgb.shape[:2]
        features = engine.extractor([resize_square(rgb, side)])[0]
        timings: dict[str, float] = {}
        # on the inference thread, as an inference runs (engine.threads)
        got = run_inference(lambda features=features, height=height, width=width, timings=timings: score_map(
            model.index, features, height, width, sigma, None, percentile, threshold, timings=timings))
        rows.append({"refined": got.refined, "rounds": got.rounds,
                     "patches": int(features.shape[0] * features.shape[1]),
                     "knn_ms": timings["knn"], "map_ms": timings["map"], "defective": item.label == 1})
        if flat is None or i % every or (not check_all and len(checks) >= exact_checks):
            continue
        patches = knn_distances(flat, features.reshape(-1, features.shape[-1]), manifest["distance"],
                                int(manifest["knn_k"])).reshape(features.shape[:2])
        truth = anomaly_map(patches, height, width, sigma)
        want = find_regions(truth, threshold, None, MM)
        have = find_regions(got.amap, threshold, None, MM)
        # pixels within 1e-5 of the threshold may flip on the flat search's float32 rounding alone
        differ = (truth >= threshold) != (got.amap >= threshold)
        exact_score = masked_percentile(truth, None, percentile)
        checks.append({"file": item.name, "label": item.label, "score": got.score, "exact_score": exact_score,
                       "score_rel_diff": abs(got.score - exact_score) / max(1e-12, exact_score),
                       "same_decision": bool(want) == bool(have),
                       "same_regions": not np.any(differ & (np.abs(truth - threshold) > 1e-5 * threshold)),
                       "same_boxes": [(r.bbox, r.area_px) for r in want] == [(r.bbox, r.area_px) for r in have]})
        if check_all:
            truth_maps.append(resize_side(truth, 256, cv2.INTER_AREA))
            refined_maps.append(resize_side(got.amap, 256, cv2.INTER_AREA))
            masks.append(read_mask(item, height, width, 256))
            labels.append(item.label)
    refined = np.array([r["refined"] for r in rows])
    out: dict[str, Any] = {
        "images": len(rows), "patches_per_image": rows[0]["patches"] if rows else 0,
        "refined_mean": round(float(refined.mean()), 1) if rows else 0, "refined_max": int(refined.max(initial=0)),
        "refined_mean_good": round(float(np.mean([r["refined"] for r in rows if not r["defective"]] or [0])), 1),
        "refined_mean_defective": round(float(np.mean([r["refined"] for r in rows if r["defective"]] or [0])), 1),
        "share_refined": round(float(np.mean(refined > 0)), 3) if rows else 0,
        "more_than_one_round": int(sum(r["rounds"] > 1 for r in rows)),
        "knn_ms_p50": round(float(np.median([r["knn_ms"] for r in rows])), 3) if rows else None,
        "exact_checked_images": len(checks),
        "exact_max_score_rel_diff": max((c["score_rel_diff"] for c in checks), default=None),
        "exact_same_decisions": all(c["same_decision"] for c in checks),
        "exact_same_regions": all(c["same_regions"] for c in checks),
        "exact_checks": [c for c in checks if not (c["same_decision"] and c["same_regions"] and c["same_boxes"])]
        or checks[:8],
    }
    if check_all and len(set(labels)) == 2:
        truth_stack, refined_stack, mask_stack = np.stack(truth_maps), np.stack(refined_maps), np.stack(masks)
        out["auroc"] = {
            "image_refined": round(auroc([c["score"] for c in checks], labels), 6),
            "image_exact": round(auroc([c["exact_score"] for c in checks], labels), 6),
            "pixel_refined": round(auroc(refined_stack, mask_stack), 6),
            "pixel_exact": round(auroc(truth_stack, mask_stack), 6),
        }
    return out


def one_threads(params: dict[str, Any]) -> dict[str, Any]:
    """ROIs per second through the ZeroMQ door with 1, 2, 4 clients, at one thread setting."""
    side = int(params["side"])
    root = Path(params["root"]) / f"p{side}-{int(params['images'])}"
    engine, config = _engine(root, side, params.get("threads"))
    png = _probe_files()["defective"]
    rows = []
    try:
        with _zmq_door(engine, config) as (endpoint, client_class):
            with client_class(endpoint, timeout=300) as warm:
                for _ in range(3):
                    warm.infer(ROLE, "roi", MM, png, heatmap="png")
            for clients in params["clients"]:
                rows.append(_throughput(endpoint, client_class, png, int(clients), float(params["throughput_s"])))
                say(SECTION, f"threads {params.get('threads') or 'default'}, {clients} clients: "
                             f"{rows[-1]['rois_per_s']:.1f} ROI/s, p50 {rows[-1]['latency_ms']['p50']:.1f} ms")
            paced = _paced(endpoint, client_class, png, int(params["paced_n"]), float(params["paced_gap_s"]))
            say(SECTION, f"threads {params.get('threads') or 'default'}, one ROI every {params['paced_gap_s']} s "
                         f"of idle: p50 {paced['p50']:.1f} ms, p90 {paced['p90']:.1f} ms")
    finally:
        engine.close()
    return {"rows": rows, "paced": {"gap_s": float(params["paced_gap_s"]), "latency_ms": paced}}


def _paced(endpoint: str, client_class: Any, png: bytes, count: int, gap_s: float) -> dict[str, Any]:
    """One client with an idle pause before each request, as a GUI inspecting part after part:
    the cores have gone idle when the ROI comes."""
    ms = []
    with client_class(endpoint, timeout=300) as client:
        for _ in range(count):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            client.infer(ROLE, "roi", MM, png, heatmap="png")
            ms.append((time.perf_counter() - t0) * 1000.0)
    return stats(ms)


def _throughput(endpoint: str, client_class: Any, png: bytes, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = threading.Event()

    def work(slot: int) -> None:
        with client_class(endpoint, timeout=300) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                client.infer(ROLE, "roi", MM, png, heatmap="png")
                latencies[slot].append((time.perf_counter() - t0) * 1000.0)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    done = [ms for slot in latencies for ms in slot]
    return {"clients": clients, "requests": len(done), "rois_per_s": round(len(done) / wall, 2),
            "latency_ms": stats(done)}


def crossover(params: dict[str, Any]) -> dict[str, Any]:
    """kNN stage (ms p50) of flat and refined search over memories of growing size."""
    from engine.backbones import build_backbone
    from engine.images import decode_image, resize_square
    from engine.knn import build_index
    from engine.patchcore import score_map
    from engine.search import MemorySearch, build_search_index
    from engine.threads import configure_threads, run_inference

    configure_threads(params.get("threads"))
    from engine.features import FeatureExtractor

    side = int(params["production"][0][0])      # the default model's side
    with scratch_dir("bench-crossover-") as tmp:
        backbone, _ = build_backbone("efficientnet_lite0", None, Path(tmp), side, None)
    extract = FeatureExtractor(backbone, "cpu", "auto", 1)
    train = AugmentedImages(96, source_side=448)
    rows_all = np.concatenate([extract([resize_square(train[i], side)]) for i in range(len(train))]).reshape(-1, 152)
    probes = {name: decode_image(png, 10**9) for name, png in _probe_files().items()}
    probe_features = {name: extract([resize_square(rgb, side)])[0] for name, rgb in probes.items()}
    rng = np.random.default_rng(0)
    out = []
    for m in params["crossover_rows"]:
        if m > len(rows_all):
            continue
        bank = np.ascontiguousarray(rows_all[np.sort(rng.choice(len(rows_all), m, replace=False))])
        held = rows_all[rng.choice(len(rows_all), 2000, replace=False)] + 0.01
        index, choice = build_search_index(bank, "l2", ivf_min_rows=1, probe_queries=held)
        searches = {"flat": MemorySearch(build_index(bank, "l2"), bank, "l2", 1),
                    "refined": MemorySearch(index, bank, "l2", 1, nprobe=choice.nprobe)}
        row: dict[str, Any] = {"rows": m, "nlist": choice.nlist, "nprobe": choice.nprobe}
        # one threshold per memory: 0.9 x the defective probe's exact score (regions on the defect)
        defective = probe_features["defective"]
        threshold = 0.9 * score_map(searches["flat"], defective, *probes["defective"].shape[:2], 4.0, None, 99.0,
                                    None).score
        for name, feats in probe_features.items():
            h, w = probes[name].shape[:2]
            for kind, search in searches.items():
                ms = []
                for _ in range(5):
                    timings: dict[str, float] = {}
                    run_inference(lambda search=search, feats=feats, h=h, w=w, level=threshold, timings=timings:
                                  score_map(search, feats, h, w, 4.0, None, 99.0, level, timings=timings))
                    ms.append(timings["knn"])
                row[f"{kind} {name}"] = round(float(np.median(ms)), 3)
        out.append(row)
        say(SECTION, f"crossover {m} rows: " + ", ".join(f"{k} {v}" for k, v in row.items() if " " in k))
    return {"rows": out, "source": f"Lite0 @ {side} patch features of {train.source}, random subsets"}


def one_small(params: dict[str, Any]) -> dict[str, Any]:
    """A 10-image model of another backbone: forward against in-process and ZeroMQ infer (PNG in/out)."""
    from engine.api import Engine
    from service.serve import ServeConfig

    backbone, side = params["backbone"], int(params["side"])
    with scratch_dir("bench-small-") as tmp:
        config = ServeConfig.of(data_root=Path(tmp) / "data", device="cpu", torch_threads=params.get("threads"),
                                zmq_endpoint="tcp://127.0.0.1:*", zmq_events=None, log_level="WARNING",
                                **backbone_kwargs(backbone, side, Path(tmp)))
        engine = Engine(config.engine)
        try:
            train = AugmentedImages(int(params["small_fit_images"]), source_side=side)
            fit = engine.fit_ok(ROLE, "roi", MM, [train[i] for i in range(len(train))])
            engine.calibrate_ng(ROLE, "roi", MM, list(fit.ok_scores) or [1.0])
            files = bottle_test("broken_large")
            rgb = read_rgb(files[0], side) if files else synthetic_rgb(side, 3)
            png = png_bytes(rgb)
            with _zmq_door(engine, config) as (endpoint, client_class), \
                    client_class(endpoint, timeout=300) as client:
                calls = {"forward": lambda: engine.extractor([rgb]),
                         "in-process": lambda: engine.infer(ROLE, "roi", MM, png, heatmap="png"),
                         "ZeroMQ": lambda: client.infer(ROLE, "roi", MM, png, heatmap="png")}
                times = round_robin(calls, params["small_budget_s"], 5, 100)
            return {"fit_images": len(train), "coreset_size": fit.coreset_size, "input_size": side,
                    "random_init_weights": backbone == "dinov2_vits14",
                    "doors": {k: stats(v) for k, v in times.items()}}
        finally:
            engine.close()

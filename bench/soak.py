"""Load and soak: many infers through both doors of one ``python -m service`` process.

Starts the real server as a subprocess (both doors on loopback, a temporary data root), fits and
calibrates two ROIs, warms up, then runs ``--zmq-infers`` infers from ``--clients`` concurrent
ZeroMQ clients plus ``--rest-infers`` over REST, while ``--refits`` refits (and recalibrations) of
ROI ``a`` run spread over it (one, halfway, by default). Prints latency percentiles per door,
throughput, errors by code, and the server's resident memory (/proc/<pid>/status VmRSS) from
warm-up to end.

A refit carries the calibration over (``CALIB_REFIT_RECALIBRATION``, on by default), so no error is
expected at any time, the refit included. Exit status 0 when no request failed and memory grew
< ``--max-growth`` percent from warm-up to the first refit and from 2 s after it to the end (the
step across the first refit, a new model in and the old one out, is reported, not judged).

    .venv/bin/python bench/soak.py                       # 10 000 ZeroMQ + 1 000 REST infers, ~5-10 min on 2 cores
    .venv/bin/python bench/soak.py --zmq-infers 400 --rest-infers 40 --warmup 40    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run as a script from anywhere

from ipc import EngineClient, RemoteError  # noqa: E402
from service.child import ServiceProcess  # noqa: E402

ROLE, MM = "soak", 0.1


def _images(side: int, n: int, seed: int) -> list[bytes]:
    """PNG crops of one textured part: OK ones (noise only) and a few with a bright defect."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8), (0, 0), 2)
    out = []
    for i in range(n):
        img = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
        if i % 5 == 4:
            c = rng.integers(side // 4, 3 * side // 4, 2)
            cv2.circle(img, (int(c[0]), int(c[1])), max(2, side // 16), (255, 255, 255), -1)
        out.append(cv2.imencode(".png", img)[1].tobytes())
    return out


def _start(root: Path, args: argparse.Namespace) -> ServiceProcess:
    """``python -m service`` with both doors."""
    env = {"BACKEND_HTTP_ENABLED": "true", "BACKEND_INPUT_SIZE": str(args.input_size),
           "BACKEND_BACKBONE": args.backbone, "BACKEND_DEVICE": "cpu", "BACKEND_ZMQ_WORKERS": str(args.workers),
           "BACKEND_LOG_LEVEL": "WARNING"}
    if args.torch_threads:
        env["BACKEND_TORCH_THREADS"] = str(args.torch_threads)
    env.update(item.split("=", 1) for item in args.env)
    return ServiceProcess(root, root / "serve.log", env)


@dataclass
class Tally:
    """Thread-safe latencies and error codes of one door."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ms: float, code: str | None) -> None:
        with self.lock:
            self.latencies_ms.append(ms)
            if code is not None:
                self.errors[code] += 1


class Gap:
    """From the first refit's start to the end of the last one's recalibration (``first_end``:
    of the first one's)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.first_end: float | None = None


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    server = _start(root, args)
    try:
        return _soak(server, args)
    finally:
        server.stop()


def _soak(server: ServiceProcess, args: argparse.Namespace) -> dict[str, Any]:
    pool = _images(args.side, 40, seed=1)
    with EngineClient(server.zmq_endpoint, timeout=600, retries=0) as admin:
        for roi, seed in (("a", 2), ("b", 3)):
            fit = admin.call("fit_ok", {"role_id": ROLE, "roi_id": roi, "mm_per_px": MM,
                                        "images": _images(args.side, args.fit_images, seed)})
            admin.call("calibrate_ng", {"role_id": ROLE, "roi_id": roi, "mm_per_px": MM,
                                        "ok_scores": list(fit["ok_scores"])})
    zmq_tally, rest_tally, gap = Tally(), Tally(), Gap()
    done = [0]
    done_lock = threading.Lock()
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(args.sample_every):
            samples.append((time.monotonic() - t0, server.rss))

    def zmq_client(k: int, total: int, tally: Tally) -> None:
        n = total // args.clients + (1 if k < total % args.clients else 0)
        with EngineClient(server.zmq_endpoint, timeout=120, retries=0) as client:
            for i in range(n):
                roi = "ab"[(i + k) % 2]
                start = time.perf_counter()
                code = None
                try:
                    client.call("infer", {"role_id": ROLE, "roi_id": roi, "mm_per_px": MM,
                                          "image": pool[(i * 7 + k) % 40]})
                except RemoteError as exc:
                    code = exc.code
                except Exception as exc:  # noqa: BLE001 - a timeout or a broken client counts as an error
                    code = type(exc).__name__
                tally.add((time.perf_counter() - start) * 1e3, code)
                with done_lock:
                    done[0] += 1

    def rest_client(total: int, tally: Tally) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as web:
            for i in range(total):
                roi = "ab"[i % 2]
                start = time.perf_counter()
                code = None
                try:
                    r = web.post("/infer", data={"role_id": ROLE, "roi_id": roi, "mm_per_px": str(MM)},
                                 files={"image": ("roi.png", pool[(i * 3) % 40], "image/png")})
                    if r.status_code != 200:
                        code = str(r.json().get("code", r.status_code))
                except Exception as exc:  # noqa: BLE001
                    code = type(exc).__name__
                tally.add((time.perf_counter() - start) * 1e3, code)

    refit: dict[str, Any] = {"fit_s": [], "at_s": [], "model_version": []}

    def refitter() -> None:
        images = _images(args.side, args.fit_images, 4)
        for j in range(1, args.refits + 1):
            while True:
                with done_lock:
                    if done[0] >= args.zmq_infers * j // (args.refits + 1):
                        break
                time.sleep(0.05)
            with EngineClient(server.zmq_endpoint, timeout=600, retries=0) as admin:
                began = time.monotonic()
                if gap.start is None:
                    gap.start = began
                fit = admin.call("fit_ok", {"role_id": ROLE, "roi_id": "a", "mm_per_px": MM,
                                            "images": images})
                refit["fit_s"].append(round(time.monotonic() - began, 2))
                admin.call("calibrate_ng", {"role_id": ROLE, "roi_id": "a", "mm_per_px": MM,
                                            "ok_scores": list(fit["ok_scores"])})
                gap.end = time.monotonic()
                if gap.first_end is None:
                    gap.first_end = gap.end
                refit["at_s"].append(round(began - t0, 1))
                refit["model_version"].append(fit["model_version"])

    # warm-up with the same concurrency as the run: every worker thread's buffers exist before the baseline
    warm, warm_tally = [args.warmup * 10 // 11, args.warmup // 11], Tally()
    threads = [threading.Thread(target=zmq_client, args=(k, warm[0], warm_tally)) for k in range(args.clients)]
    threads.append(threading.Thread(target=rest_client, args=(warm[1], warm_tally)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if warm_tally.errors:
        raise SystemExit(f"errors during warm-up: {dict(warm_tally.errors)}")
    done[0] = 0
    rss_start = server.rss
    samples: list[tuple[float, int]] = [(0.0, rss_start)]
    t0 = time.monotonic()

    threads = [threading.Thread(target=zmq_client, args=(k, args.zmq_infers, zmq_tally)) for k in range(args.clients)]
    threads += [threading.Thread(target=rest_client, args=(args.rest_infers, rest_tally)),
                threading.Thread(target=refitter)]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    stop_sampling.set()
    sampler.join()
    rss_end = server.rss
    samples.append((wall, rss_end))
    assert gap.start is not None and gap.end is not None and gap.first_end is not None
    before_refit = [r for t, r in samples if t < gap.start - t0]
    after_refit = [r for t, r in samples if t > gap.first_end - t0 + 2.0]
    # judged on the stretches without a model change: warm-up to the first refit, and 2 s after
    # it to the end (with --refits 2 or more, a refit that leaks shows there). The step across the
    # first refit (a new model loaded, the old one released) is reported, not judged
    growth = 100.0 * (rss_end - rss_start) / rss_start
    steady = [100.0 * (before_refit[-1] - rss_start) / rss_start if before_refit else 0.0,
              100.0 * (rss_end - after_refit[0]) / after_refit[0] if after_refit else 0.0]
    total = len(zmq_tally.latencies_ms) + len(rest_tally.latencies_ms)
    return {
        "settings": {"zmq_infers": args.zmq_infers, "clients": args.clients, "rest_infers": args.rest_infers,
                     "side": args.side, "input_size": args.input_size, "backbone": args.backbone,
                     "workers": args.workers, "warmup": args.warmup, "cpus": os.cpu_count()},
        "wall_s": round(wall, 1),
        "throughput_per_s": round(total / wall, 1),
        "zmq_ms": {k: round(v, 1) for k, v in _percentiles(zmq_tally.latencies_ms).items()},
        "rest_ms": {k: round(v, 1) for k, v in _percentiles(rest_tally.latencies_ms).items()},
        "requests": {"zmq": len(zmq_tally.latencies_ms), "rest": len(rest_tally.latencies_ms)},
        "errors": dict(zmq_tally.errors + rest_tally.errors),
        "refit": refit,
        "rss_mib": {"after_warmup": round(rss_start / 2**20, 1), "peak": round(max(r for _, r in samples) / 2**20, 1),
                    "end": round(rss_end / 2**20, 1), "growth_pct": round(growth, 2),
                    "steady_growth_pct": [round(g, 2) for g in steady],
                    "before_refit": round(before_refit[-1] / 2**20, 1) if before_refit else None,
                    "after_refit_first": round(after_refit[0] / 2**20, 1) if after_refit else None,
                    "samples": len(samples)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zmq-infers", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4, help="concurrent ZeroMQ clients")
    parser.add_argument("--rest-infers", type=int, default=1_000)
    parser.add_argument("--side", type=int, default=128, help="ROI side in pixels of the images sent")
    parser.add_argument("--input-size", type=int, default=128, help="BACKEND_INPUT_SIZE of the server")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=4, help="BACKEND_ZMQ_WORKERS")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a further setting of the server, e.g. PATCHCORE_IVF_MIN_ROWS=1000 (repeatable)")
    parser.add_argument("--fit-images", type=int, default=12)
    parser.add_argument("--refits", type=int, default=1, help="refits of ROI a, spread over the run")
    parser.add_argument("--warmup", type=int, default=300, help="infers before the memory baseline")
    parser.add_argument("--sample-every", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--max-growth", type=float, default=5.0,
                        help="allowed RSS growth, percent, before the first refit and from 2 s after it to the end")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    report = run(args)
    ok = not report["errors"] and max(report["rss_mib"]["steady_growth_pct"]) < args.max_growth
    report["verdict"] = "PASS" if ok else "FAIL"
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        s, r = report["settings"], report["rss_mib"]
        print(f"soak: {s['zmq_infers']} ZeroMQ infers from {s['clients']} clients + {s['rest_infers']} REST infers, "
              f"ROI {s['side']} px, input {s['input_size']} px, {s['backbone']}, {s['cpus']} CPUs")
        print(f"  wall {report['wall_s']} s, {report['throughput_per_s']} infers/s")
        print(f"  ZeroMQ latency ms: {report['zmq_ms']}")
        print(f"  REST   latency ms: {report['rest_ms']}")
        print(f"  refits of ROI a: {report['refit']}")
        print(f"  errors: {report['errors'] or 'none'}")
        print(f"  server RSS MiB: after warm-up {r['after_warmup']}, just before the refit {r['before_refit']}, "
              f"2 s after it {r['after_refit_first']}, peak {r['peak']}, end {r['end']} "
              f"({r['growth_pct']:+.2f} % since warm-up; judged: {r['steady_growth_pct'][0]:+.2f} % before the "
              f"first refit, {r['steady_growth_pct'][1]:+.2f} % from 2 s after it to the end)")
        print(f"  verdict: {report['verdict']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

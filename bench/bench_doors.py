"""Latency of one ``infer`` through each door: in-process, ZeroMQ, REST.

Trains a small model (MVTec bottle OK images when available, else synthetic ones), calibrates it,
then times the same 448x448 PNG through ``Engine.infer``, ``ipc.client.EngineClient.infer`` and
``POST /infer`` on loopback, and prints p50/p99 per door.

    .venv/bin/python bench/bench_doors.py [--n 100] [--warmup 10] [--fit-images 8]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import httpx
import numpy as np
import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run as a script from anywhere

from bench.suite.common import BOTTLE  # noqa: E402
from engine.api import Engine  # noqa: E402
from engine.settings import Settings  # noqa: E402
from http_compat.server import HttpServer  # noqa: E402

SIDE = 448
MM = 0.05
ROLE, ROI = "bench", "roi"


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _images(n: int, probe_kind: str) -> tuple[list[bytes], bytes, str]:
    """(training PNGs, the timed PNG, where they came from), all SIDE x SIDE."""
    files = sorted((BOTTLE / "train" / "good").glob("*.png"))
    if len(files) > n:
        def load(p: Path) -> bytes:
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            return _png(cv2.resize(img, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
        probe = sorted((BOTTLE / "test" / ("broken_large" if probe_kind == "ng" else "good")).glob("*.png"))[0]
        return [load(p) for p in files[:n]], load(probe), "MVTec bottle"
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8), (0, 0), 3)
    train = [_png(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)) for _ in range(n)]
    probe = base.copy()
    if probe_kind == "ng":
        cv2.circle(probe, (SIDE // 2, SIDE // 2), 20, (255, 255, 255), -1)
    return train, _png(probe), "synthetic (MVTec bottle not found)"


def _time_round_robin(doors: dict[str, Callable[[], object]], n: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call for each door, calling the doors in turn so they share machine noise."""
    for call in doors.values():
        for _ in range(warmup):
            call()
    out: dict[str, list[float]] = {name: [] for name in doors}
    for _ in range(n):
        for name, call in doors.items():
            t0 = time.perf_counter()
            call()
            out[name].append((time.perf_counter() - t0) * 1000.0)
    return out


def _row(name: str, ms: list[float], base: float | None) -> str:
    ms = sorted(ms)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    extra = "" if base is None else f"   ({p50 - base:+7.2f} ms p50 vs in-process)"
    return f"{name:<12} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms{extra}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="timed calls per door")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--fit-images", type=int, default=8)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--heatmap", default="png", choices=["png", "uint8", "float32", "none"])
    ap.add_argument("--probe", choices=["ng", "ok"], default="ng",
                    help="time a defective part (regions and contours in the reply) or a good one")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # the engine logs every infer at info; printing those would be part of what is timed
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    train, probe, source = _images(args.fit_images, args.probe)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_root=Path(tmp), backbone=args.backbone, input_size=SIDE,
                            http_host="127.0.0.1", http_port=0, zmq_endpoint="tcp://127.0.0.1:*",
                            zmq_events=None)
        engine = Engine(settings)
        try:
            t0 = time.perf_counter()
            fit = engine.fit_ok(ROLE, ROI, MM, train)
            engine.calibrate_ng(ROLE, ROI, MM, fit.ok_scores)
            print(f"model: {args.backbone} at {SIDE}x{SIDE}, {len(train)} {source} images, "
                  f"coreset {fit.coreset_size}/{fit.n_embeddings}, fit+calibrate {time.perf_counter() - t0:.1f} s; "
                  f"probe={args.probe} ({len(probe) // 1024} KiB PNG), heatmap={args.heatmap}; "
                  f"{args.n} timed calls per door, in turn, after {args.warmup} warm-up")

            with contextlib.ExitStack() as stack:
                doors: dict[str, Callable[[], object]] = {
                    "in-process": lambda: engine.infer(ROLE, ROI, MM, probe, heatmap=args.heatmap),
                }
                notes = []
                zmq_call = _zmq_door(stack, engine, settings, probe, args.heatmap)
                if isinstance(zmq_call, str):
                    notes.append(f"{'ZeroMQ':<12} {zmq_call}")
                else:
                    doors["ZeroMQ"] = zmq_call
                doors["REST"] = _rest_door(stack, engine, settings, probe, args.heatmap)
                times = _time_round_robin(doors, args.n, args.warmup)
            base = statistics.median(times["in-process"])
            for name, ms in times.items():
                print(_row(name, ms, None if name == "in-process" else base))
            for note in notes:
                print(note)
        finally:
            engine.close()
    return 0


def _zmq_door(stack: contextlib.ExitStack, engine: Engine, settings: Settings, probe: bytes,
              heatmap: str) -> Callable[[], object] | str:
    """A call through ipc.client.EngineClient, or why there is none."""
    try:
        from ipc.client import EngineClient
        from ipc.server import IpcServer
    except ImportError as exc:
        return f"not available yet ({exc})"
    server = IpcServer(engine, settings)
    server.start()
    stack.callback(server.stop)
    client = stack.enter_context(EngineClient(server.endpoint, timeout=60))
    return lambda: client.infer(ROLE, ROI, MM, probe, heatmap=heatmap)  # type: ignore[arg-type]


def _rest_door(stack: contextlib.ExitStack, engine: Engine, settings: Settings, probe: bytes,
               heatmap: str) -> Callable[[], object]:
    """A multipart POST /infer on a kept-alive connection, as the GUI sends it."""
    server = HttpServer(engine, settings)
    server.start()
    stack.callback(server.stop)
    http = stack.enter_context(httpx.Client(base_url=server.url, timeout=60))
    fields = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM), "heatmap": heatmap}

    def call() -> object:
        r = http.post("/infer", data=fields, files={"image": ("roi.png", probe, "image/png")})
        r.raise_for_status()
        return r.json()

    return call


if __name__ == "__main__":
    raise SystemExit(main())

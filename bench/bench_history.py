"""What the inspection history costs: ROI latency with history on vs off, history query times,
and what a killed process loses.

    .venv/bin/python bench/bench_history.py [--train 200] [--n 10000] [--prefill 0] [--side 448]

(a) One model fitted on ``--train`` bottle OK images (EfficientNet-Lite0, its default 224 px
    input), served by two engines in this process on the same data root: history on (recording,
    thumbnails, drift) and off. ``--n`` inspections on each, interleaved one by one (the order
    alternates), the same bottle test images (``--side`` px PNG ROIs) on both; p50 / p90 of the
    ``infer`` call's wall time per engine, and their ratio. ``--prefill K`` first writes K copies
    of one real inspection's record (times spread over the last day) so that a shorter timed run
    still meets a full history (the per-ROI bound and its pruning at work).
(b) Query times of the ``history`` op on the ROI's ``--n`` records (median / max of 20 calls).
(c) A child process infers in a loop with the history on and is killed with SIGKILL; the
    inspections it reported done against the records found on disk.

A script, not a test. Other processes on the same cores inflate every figure; the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.suite.common import BOTTLE, cpu_model  # noqa: E402
from engine.api import Engine  # noqa: E402
from engine.evaluate import list_test, list_train  # noqa: E402
from engine.history import InspectionHistory, InspectionRecord  # noqa: E402
from engine.settings import Settings  # noqa: E402

MM = 0.1
ROLE, ROI = "line", "cap"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _png(path: Path, side: int) -> bytes:
    image = cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), (side, side), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".png", image)[1].tobytes()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _settings(root: Path, history: bool, threads: int | None) -> Settings:
    return Settings(data_root=root, backbone="efficientnet_lite0", device="cpu", history_enabled=history,
                    torch_threads=threads)


def _fit(engine: Engine, n_train: int, side: int) -> None:
    start = time.perf_counter()
    images = [_png(p, side) for p in list_train(BOTTLE, n_train)]
    fit = engine.fit_ok(ROLE, ROI, MM, images)
    engine.calibrate_ng(ROLE, ROI, MM, list(fit.ok_scores))
    print(f"fit: {fit.n_images} images, {fit.coreset_size} memory rows, {time.perf_counter() - start:.1f} s")


def prefill(on: Engine, png: bytes, count: int) -> None:
    """``count`` records of the ROI, copies of one real inspection's, written before the timed run."""
    if count <= 0:
        return
    on.infer(ROLE, ROI, MM, png, heatmap="none")
    on.monitor.flush(30.0)
    (model,) = on.monitor.history(ROLE, ROI, limit=1, thumbnails=True).items
    history = InspectionHistory(on.data_root / "history.sqlite", flush_interval_s=0.2)
    now = time.time()
    for i in range(count):
        history.record(InspectionRecord(
            time=now - 86_400 + i * 86_400 / count, recipe_id="", role_id=ROLE, roi_id=ROI,
            model_version=model.model_version, score=model.score, threshold=model.threshold, decision=model.decision,
            n_regions=model.n_regions, area_mm2=model.area_mm2, max_area_mm2=model.max_area_mm2,
            request_id=f"prefill-{i}", operator_id=None, boxes="", image_h=model.image_shape[0],
            image_w=model.image_shape[1], thumbnail=model.thumbnail_jpeg, heatmap=model.heatmap_png))
    history.flush(120.0)
    history.close()
    print(f"prefill: {count} records written before the timed run")


def latency(on: Engine, off: Engine, rois: list[bytes], n: int) -> None:
    times: dict[str, list[float]] = {"on": [], "off": []}
    for engine in (on, off):                       # warm-up: model load, first calls
        for png in rois[:5]:
            engine.infer(ROLE, ROI, MM, png, heatmap="none")
    for i in range(n):
        png = rois[i % len(rois)]
        order = (("on", on), ("off", off)) if i % 2 == 0 else (("off", off), ("on", on))
        for name, engine in order:
            start = time.perf_counter()
            engine.infer(ROLE, ROI, MM, png, heatmap="png", operator_id="bench")
            times[name].append((time.perf_counter() - start) * 1000.0)
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1}/{n} inspections each, load {_load()}", file=sys.stderr)
    on.monitor.flush(30.0)
    p50_on, p50_off = _pct(times["on"], 50), _pct(times["off"], 50)
    print(f"(a) infer wall time, {n} interleaved inspections per engine (heatmap png):")
    for name in ("off", "on"):
        print(f"    history {name:>3}: p50 {_pct(times[name], 50):7.2f} ms   p90 {_pct(times[name], 90):7.2f} ms   "
              f"mean {statistics.fmean(times[name]):7.2f} ms")
    print(f"    p50 ratio on/off: {p50_on / p50_off:.4f} ({(p50_on / p50_off - 1) * 100:+.2f} %)")
    dropped = on.monitor.history(ROLE, ROI, limit=1).dropped
    print(f"    records in the history: {_count(on)} (dropped {dropped})")


def _count(engine: Engine) -> int:
    """Records of the ROI on disk (a history page holds at most 1 000)."""
    with sqlite3.connect(engine.data_root / "history.sqlite") as db:
        return int(db.execute("SELECT COUNT(*) FROM inspections WHERE roi_id = ?", (ROI,)).fetchone()[0])


def queries(engine: Engine) -> None:
    newest = engine.monitor.history(ROLE, ROI, limit=1000).items
    middle = newest[-1].time
    cases = {
        "last 100": {"limit": 100},
        "last 100 + thumbnails": {"limit": 100, "thumbnails": True},
        "1000 in a time range": {"since": middle - 1e9, "until": middle, "limit": 1000},
        "decision ok, 500": {"decision": "ok", "limit": 500},
        "1000 newest (a full page)": {"limit": 1000},
    }
    print(f"(b) history op on {_count(engine)} records (20 calls each):")
    for label, kwargs in cases.items():
        spent = []
        for _ in range(20):
            start = time.perf_counter()
            res = engine.monitor.history(ROLE, ROI, **kwargs)   # type: ignore[arg-type]
            spent.append((time.perf_counter() - start) * 1000.0)
        print(f"    {label:<24} {res.n:>6} rows   median {statistics.median(spent):7.2f} ms   max {max(spent):7.2f} ms")
    size = sum(path.stat().st_size for path in engine.data_root.glob("history.sqlite*"))   # with the WAL
    print(f"    database: {size / 1e6:.1f} MB ({size / max(len(newest), 1) / 1024:.1f} KiB a record, thumbnails on)")


_CHILD = """
import sys, time
from pathlib import Path
from engine.api import Engine
from engine.settings import Settings
import logging, structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
root, png = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()
engine = Engine(Settings(data_root=root, backbone="efficientnet_lite0", device="cpu"))
engine.infer("line", "cap", 0.1, png, heatmap="none")
print("ready", flush=True)
done = 0
while True:
    engine.infer("line", "cap", 0.1, png, heatmap="png")
    done += 1
    print(done, time.time(), flush=True)
"""


def kill_test(source_root: Path, png: bytes, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(source_root / "models", root / "models")
        (Path(tmp) / "roi.png").write_bytes(png)
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(Path(tmp) / "roi.png")],
                                 cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        deadline, last = time.monotonic() + seconds, (0, 0.0)
        while time.monotonic() < deadline:
            parts = child.stdout.readline().split()
            last = (int(parts[0]), float(parts[1]))
        os.kill(child.pid, signal.SIGKILL)
        killed_at = time.time()
        child.wait()
        for line in child.stdout:                 # what it printed before it died
            parts = line.split()
            if len(parts) == 2:
                last = (int(parts[0]), float(parts[1]))
        with sqlite3.connect(root / "history.sqlite") as db:
            stored, newest = db.execute("SELECT COUNT(*), MAX(time) FROM inspections").fetchone()
        lost = last[0] - stored
        print(f"(c) SIGKILL after {seconds:.0f} s: {last[0]} inspections reported done, {stored} records on disk, "
              f"{lost} lost; the newest record is {killed_at - (newest or killed_at):.2f} s older than the kill "
              f"(flush interval 1 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200, help="OK images of the fit")
    parser.add_argument("--n", type=int, default=10_000, help="inspections per engine")
    parser.add_argument("--prefill", type=int, default=0, help="records written before the timed run")
    parser.add_argument("--side", type=int, default=448, help="ROI side sent, pixels")
    parser.add_argument("--kill-after", type=float, default=8.0, help="seconds before the SIGKILL of (c)")
    parser.add_argument("--threads", type=int, default=None, help="torch / faiss threads")
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}; load {_load()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        on, off = Engine(_settings(root, True, args.threads)), Engine(_settings(root, False, args.threads))
        try:
            _fit(off, args.train, args.side)
            rois = [_png(item.path, args.side) for item in list_test(BOTTLE)]
            prefill(on, rois[0], args.prefill)
            latency(on, off, rois, args.n)
            queries(on)
        finally:
            on.close()
            off.close()
        kill_test(root, rois[0], args.kill_after)
    print(f"load after: {_load()}")


if __name__ == "__main__":
    main()

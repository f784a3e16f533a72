"""add_ok against a full fit on real data, side by side in one run.

    .venv/bin/python bench/bench_lifecycle.py [--data DIR] [--input-size S] [--threads N]

MVTec AD bottle: (a) ``fit_ok`` on all 209 train images; (b) ``fit_ok`` on the first 100, then
``add_ok`` of the other 109 in 3 calls (37, 36, 36). Both models score the 83 test images
(uncalibrated, float32 maps); printed: image AUROC, pixel AUROC (maps and masks at 256 px, as
``python -m engine evaluate``), memory sizes, and each add_ok's wall time as a fraction of the
209-image fit's wall time. Acceptance: image AUROC equal, pixel AUROC within 0.003, each add_ok
at most 30 % of the full fit.

A script, not a test. Other processes on the same cores inflate every figure; the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.suite.common import BOTTLE, cpu_model  # noqa: E402
from engine.api import Engine  # noqa: E402
from engine.evaluate import TestImage, list_test, list_train  # noqa: E402
from engine.metrics import auroc  # noqa: E402
from engine.settings import Settings  # noqa: E402

ROLE, MM, FIRST, CALLS, PIXEL_SIDE = "bench", 1.0, 100, 3, 256


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _quality(engine: Engine, roi: str, tests: Sequence[TestImage]) -> tuple[float, float]:
    """(image AUROC, pixel AUROC) of one model on the test images."""
    maps = np.empty((len(tests), PIXEL_SIDE, PIXEL_SIDE), dtype=np.float32)
    masks = np.zeros((len(tests), PIXEL_SIDE, PIXEL_SIDE), dtype=bool)
    scores = []
    for i, item in enumerate(tests):
        result = engine.infer(ROLE, roi, MM, item.path.read_bytes(), allow_uncalibrated=True, heatmap="float32")
        raw = result.heatmap_raw
        assert raw is not None
        amap = np.frombuffer(raw.data, dtype=np.float32).reshape(raw.shape)
        maps[i] = cv2.resize(amap, (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_AREA)
        if item.mask_path is not None:
            mask = cv2.imread(str(item.mask_path), cv2.IMREAD_GRAYSCALE)
            masks[i] = cv2.resize(mask, (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_NEAREST) > 0
        scores.append(result.score)
    labels = np.array([item.label for item in tests])
    return auroc(np.array(scores), labels), auroc(maps, masks)


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=BOTTLE, help="MVTec-layout bottle folder")
    parser.add_argument("--input-size", type=int, default=224, help="backbone input side")
    parser.add_argument("--threads", type=int, default=None, help="torch / faiss threads")
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"machine: {cpu_model()} | {platform.platform()} | cpu_count={os.cpu_count()} | "
          f"torch {torch.__version__} | python {platform.python_version()}")
    print(f"load average before: {_load()}")
    if not args.data.is_dir():
        print(f"bottle data not found at {args.data}: nothing to measure")
        return
    train = [p.read_bytes() for p in list_train(args.data)]
    tests = list_test(args.data)
    chunks = np.array_split(np.arange(FIRST, len(train)), CALLS)
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        engine = Engine(Settings(data_root=Path(tmp), backbone="efficientnet_lite0", input_size=args.input_size,
                                 torch_threads=args.threads))
        try:
            full, full_s = _timed(engine.fit_ok, ROLE, "full", MM, train)
            stages = ", ".join(f"{k} {v / 1000:.2f}" for k, v in full.timings_ms.items())
            print(f"\n(a) fit_ok on all {len(train)}: {full_s:.2f} s wall; coreset {full.coreset_size} rows; "
                  f"stages s: {stages}")
            part, part_s = _timed(engine.fit_ok, ROLE, "grown", MM, train[:FIRST])
            print(f"(b) fit_ok on the first {FIRST}: {part_s:.2f} s wall; coreset {part.coreset_size} rows")
            for chunk in chunks:
                added, seconds = _timed(engine.lifecycle.add_ok, ROLE, "grown", [train[i] for i in chunk])
                stages = ", ".join(f"{k} {v / 1000:.2f}" for k, v in added.timings_ms.items())
                print(f"    add_ok of {len(chunk)}: {seconds:.2f} s wall = {100 * seconds / full_s:.1f} % of (a); "
                      f"+{added.rows_added} rows -> {added.coreset_size}; radius {added.covering_radius:.4f}; "
                      f"stages s: {stages}")
            full_q = _quality(engine, "full", tests)
            grown_q = _quality(engine, "grown", tests)
        finally:
            engine.close()
    print(f"\n{'model':<28} {'image AUROC':>12} {'pixel AUROC':>12}")
    print(f"{'(a) fit on 209':<28} {full_q[0]:12.6f} {full_q[1]:12.6f}")
    print(f"{'(b) fit 100 + add_ok 3x':<28} {grown_q[0]:12.6f} {grown_q[1]:12.6f}")
    print(f"difference (b - a): image {grown_q[0] - full_q[0]:+.6f}, pixel {grown_q[1] - full_q[1]:+.6f}")
    print(f"\nload average after: {_load()}")


if __name__ == "__main__":
    main()

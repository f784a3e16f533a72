"""Engine speed on real data: fit stages and infer stages.

    .venv/bin/python bench/bench_engine.py [--data DIR] [--threads N]

(a) fit of MVTec AD bottle's 209 train images at 224 px through ``Engine.fit_ok``, by stage
    (FitResult.timings_ms: decode / extract / coreset / index / ok_scores / save);
(b) ``Engine.infer`` ms/image by stage, median over the 83 bottle test images (float32 heatmap).

The coreset against exact greedy is measured by the suite: ``python bench/run_all.py --only coreset``.

A script, not a test. Other processes on the same cores inflate every figure; the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.suite.common import BOTTLE, cpu_model  # noqa: E402
from engine.api import Engine  # noqa: E402
from engine.evaluate import list_test, list_train  # noqa: E402
from engine.settings import Settings  # noqa: E402

RATIO = 0.1


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BOTTLE, help="MVTec-layout bottle folder")
    parser.add_argument("--threads", type=int, default=None, help="torch / faiss threads")
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_start = time.perf_counter()
    import faiss

    print(f"machine: {cpu_model()} | {platform.platform()} | cpu_count={os.cpu_count()} | "
          f"torch threads={torch.get_num_threads()} | faiss threads={faiss.omp_get_max_threads()} | "
          f"torch {torch.__version__} | faiss {faiss.__version__} | numpy {np.__version__} | "
          f"python {platform.python_version()}")
    print(f"load average before: {_load()}")
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy > 0.5:
        print(f"WARNING: load average {busy:.1f} before start: other processes share these "
              f"{os.cpu_count()} cores, and oversubscribed OpenMP threads stall; min columns are the "
              "less disturbed figures")
    if not args.data.is_dir():
        print(f"bottle data not found at {args.data}: nothing to measure")
        return

    train = list_train(args.data)
    tests = list_test(args.data)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        engine = Engine(Settings(data_root=Path(tmp), backbone="efficientnet_lite0", input_size=224,
                                 coreset_ratio=RATIO, torch_threads=args.threads))

        print(f"\n(a) fit_ok on {len(train)} bottle train images (900x900 PNG bytes) at 224 px, "
              f"{engine.backbone_info.name}, batch {engine.extractor.batch_size}")
        fit, seconds = _timed(engine.fit_ok, "bench", "bottle", 1.0, [p.read_bytes() for p in train])
        for stage, ms in fit.timings_ms.items():
            note = f"  ({ms / len(fit.ok_scores):.1f} ms x {len(fit.ok_scores)} leave-out images)" \
                if stage == "ok_scores" and fit.ok_scores else ""
            note = note or (f"  ({ms / len(train):.1f} ms/image)" if stage in ("decode", "extract") else "")
            print(f"  {stage:<14} {ms / 1000:7.2f} s{note}")
        print(f"  {'total':<14} {sum(fit.timings_ms.values()) / 1000:7.2f} s (wall {seconds:.2f} s); "
              f"{fit.n_embeddings} patches -> coreset {fit.coreset_size}, tokens {fit.token_shape}")

        payloads = [t.path.read_bytes() for t in tests]
        engine.infer("bench", "bottle", 1.0, payloads[0], allow_uncalibrated=True, heatmap="float32")
        timings = [engine.infer("bench", "bottle", 1.0, data, allow_uncalibrated=True,
                                heatmap="float32").timings_ms for data in payloads]
        engine.close()

    print(f"\n(b) infer on the {len(tests)} bottle test images (900x900 PNG bytes, uncalibrated, "
          "float32 heatmap), ms/image, after one warm-up call")
    print(f"  {'stage':<11} {'median':>8} {'min':>8} {'p90':>8}")
    for stage in timings[0]:
        values = sorted(t[stage] for t in timings)
        p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
        print(f"  {stage:<11} {statistics.median(values):8.1f} {values[0]:8.1f} {p90:8.1f}")
    print(f"\ntotal bench time {time.perf_counter() - bench_start:.0f} s; load average after: {_load()}")


if __name__ == "__main__":
    main()

"""What the ZeroMQ door adds to an ``infer``: the same call in process and through a loopback socket.

    .venv/bin/python bench/bench_ipc.py [--calls 50] [--size 448] [--data DIR]

Fits a small model on real MVTec bottle images in a temporary data root, then times ``infer``
on one size x size image: encoded PNG vs raw pixel buffer, heatmap "none" vs "png", directly
(``Engine.infer``) and through ``EngineClient`` -> ``IpcServer`` (tcp://127.0.0.1). Calls are
interleaved (direct, door, direct, door, ...) so drift hits both columns alike. Target: the
door adds <= 2 ms at p50.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.suite.common import BOTTLE  # noqa: E402
from engine.api import Engine  # noqa: E402
from engine.settings import Settings  # noqa: E402
from ipc import EngineClient, IpcServer  # noqa: E402


def _load(path: Path, size: int) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"cannot read {path}")
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)   # H W 3, BGR


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _pcts(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), float(np.percentile(ms, 99))


def _time_pair(direct: Callable[[], Any], door: Callable[[], Any], calls: int,
               warmup: int = 5) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        direct()
        door()
    d_ms: list[float] = []
    z_ms: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        direct()
        t1 = time.perf_counter()
        door()
        t2 = time.perf_counter()
        d_ms.append((t1 - t0) * 1e3)
        z_ms.append((t2 - t1) * 1e3)
    return d_ms, z_ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--size", type=int, default=448, help="side of the ROI image sent to infer")
    ap.add_argument("--input-size", type=int, default=224, help="backbone input size (Settings.input_size)")
    ap.add_argument("--fit-images", type=int, default=8)
    ap.add_argument("--data", type=Path, default=BOTTLE, help="MVTec AD bottle folder")
    args = ap.parse_args(argv)
    # the engine logs every infer; keep the table readable
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.basicConfig(level=logging.WARNING)

    train = sorted((args.data / "train" / "good").glob("*.png"))[: args.fit_images]
    tests = sorted((args.data / "test" / "broken_large").glob("*.png"))[:1]
    if not train or not tests:
        print(f"MVTec bottle images not found under {args.data}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_ipc_") as root:
        settings = Settings(data_root=Path(root), backbone="efficientnet_lite0", input_size=args.input_size,
                            coreset_ratio=0.1, zmq_endpoint="tcp://127.0.0.1:*", zmq_workers=2)
        engine = Engine(settings)
        server = IpcServer(engine, settings)
        server.start()
        try:
            client = EngineClient(server.endpoint, timeout=60, long_timeout=1800)
            with client:
                role, roi, mmpp = "bench", "roi", 0.1
                t0 = time.perf_counter()
                fit = client.fit_ok(role, roi, mmpp, [_png(_load(p, args.size)) for p in train])
                print(f"fit: {fit.n_images} images of {args.size}x{args.size} at input {fit.input_size}, "
                      f"coreset {fit.coreset_size}, {time.perf_counter() - t0:.1f} s")
                client.calibrate_ng(role, roi, mmpp, list(fit.ok_scores))

                img = _load(tests[0], args.size)
                forms: dict[str, Any] = {"png": _png(img), "raw": np.ascontiguousarray(img[:, :, ::-1])}  # RGB
                print(f"image: {tests[0].name} {args.size}x{args.size}x3, PNG {len(forms['png']) / 1024:.0f} KiB, "
                      f"raw {img.nbytes / 1024:.0f} KiB; {args.calls} calls each, interleaved; ms")
                print(f"{'image':<6}{'heatmap':<9}{'direct p50':>11}{'p99':>8}{'zmq p50':>10}{'p99':>8}"
                      f"{'added p50':>11}{'added p99':>11}")
                for form, image in forms.items():
                    for heatmap in ("none", "png"):
                        kw = dict(role_id=role, roi_id=roi, mm_per_px=mmpp, image=image, heatmap=heatmap)
                        d, z = _time_pair(partial(engine.infer, **kw), partial(client.infer, **kw), args.calls)
                        (d50, d99), (z50, z99) = _pcts(d), _pcts(z)
                        print(f"{form:<6}{heatmap:<9}{d50:>11.2f}{d99:>8.2f}{z50:>10.2f}{z99:>8.2f}"
                              f"{z50 - d50:>11.2f}{z99 - d99:>11.2f}")
        finally:
            server.stop()
            engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

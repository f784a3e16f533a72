"""Coreset selection: time and peak memory against bank size, and the comparison with exact greedy.

Banks are synthetic float32 features: ``CLUSTERS`` Gaussian clusters with unit-normal centres,
per-cluster spread 0.05..0.5 and Zipf-like sizes (patch features are clustered, not uniform).
``engine.coreset.greedy_coreset`` runs with the engine's default settings (random projection to
``coreset_projection_dim`` columns, chunks of ``coreset_chunk_size`` rows).

* scaling: one child process per (rows, dims): time of one selection at ``ratio`` and the peak
  RSS it adds above the bank itself (sampled; tracemalloc does not see torch), plus the child's
  ru_maxrss.
* target: 200 000 x 384 at 10 %: the engine's time (best of ``repeats``); then, on a random
  subset of ``subset`` rows where exact greedy is feasible, both the engine's selection and a
  naive exact greedy k-center in numpy on the full dimensions, run in full: time ratio and
  covering radius (full dimensions) ratio. The exact time on the full bank is also estimated
  from ``probe_picks`` timed picks (its per-pick cost is constant: one N x D mat-vec). The same
  subset comparison is repeated on real features: EfficientNet-Lite0 patch features (152 dims)
  of ``real_images`` bottle train images at 224 px (784 patches each).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.suite.common import RssSampler, mib, peak_rss_bytes, rss_bytes, run_child, say

CLUSTERS = 1000
FULL: dict[str, Any] = {
    "sizes": [10_000, 100_000, 200_000, 1_000_000], "dims": [152, 384], "ratio": 0.1,
    "target": {"n": 200_000, "d": 384, "ratio": 0.1, "subset": 50_000, "probe_picks": 200, "repeats": 2,
               "real_images": 64},
    "timeout_s": 600,
}
QUICK: dict[str, Any] = {
    **FULL, "sizes": [10_000, 100_000], "dims": [152, 384],
    "target": {"n": 200_000, "d": 384, "ratio": 0.1, "subset": 10_000, "probe_picks": 30, "repeats": 1,
               "real_images": 13},
    "timeout_s": 240,
}
SECTION = "coreset"


def run(params: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for d in params["dims"]:
        for n in params["sizes"]:
            say(SECTION, f"greedy_coreset on {n} x {d} at {params['ratio']:.0%}")
            out = run_child("coreset:one_bank", {"n": n, "d": d, "ratio": params["ratio"],
                                                "threads": params.get("threads")}, timeout=params["timeout_s"])
            out.update(n=n, d=d)
            if "error" in out:
                say(SECTION, f"{n} x {d} failed: {out['error']}")
            else:
                say(SECTION, f"{n} x {d}: {out['seconds']:.2f} s, +{out['peak_extra_rss_mib']} MiB")
            rows.append(out)
    t = params["target"]
    say(SECTION, f"target: {t['n']} x {t['d']} at {t['ratio']:.0%}, exact greedy on a {t['subset']}-row subset")
    target = run_child("coreset:target", {**t, "threads": params.get("threads")}, timeout=params["timeout_s"])
    if "error" in target:
        say(SECTION, f"target failed: {target['error']}")
    return {"ratio": params["ratio"], "rows": rows, "target": target, "settings": _defaults()}


def _defaults() -> dict[str, int]:
    from engine.settings import Settings

    fields = Settings.model_fields  # the defaults, whatever the environment says
    return {"projection_dim": int(fields["coreset_projection_dim"].default),
            "chunk_size": int(fields["coreset_chunk_size"].default)}


def synthetic(n: int, d: int, clusters: int = CLUSTERS, seed: int = 0) -> np.ndarray:
    """(n, d) float32 clustered features, built in blocks (no (n, d) float64 temporary)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    spread = rng.uniform(0.05, 0.5, clusters).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1)
    member = rng.choice(clusters, size=n, p=weights / weights.sum())
    x = np.empty((n, d), dtype=np.float32)
    block = 65_536
    for start in range(0, n, block):
        m = member[start : start + block]
        part = rng.standard_normal((len(m), d), dtype=np.float32)
        part *= spread[m, None]
        part += centres[m]
        x[start : start + block] = part
    return x


def _approx(x: np.ndarray, k: int) -> np.ndarray:
    import torch

    from engine.coreset import greedy_coreset

    s = _defaults()
    return greedy_coreset(torch.from_numpy(x), k, projection_dim=s["projection_dim"], seed=0,
                          chunk_size=s["chunk_size"]).numpy()


def exact_greedy(x: np.ndarray, k: int, first: int) -> np.ndarray:
    """Naive exact greedy k-center on x (N, D) float32, full dimensions: indices (k,) in pick order."""
    sq = np.einsum("nd,nd->n", x, x)                                   # N
    min_d = np.maximum(sq + sq[first] - 2.0 * (x @ x[first]), 0.0)
    min_d[first] = -np.inf
    picks = np.empty(k, dtype=np.int64)
    picks[0] = first
    for i in range(1, k):
        j = int(np.argmax(min_d))
        picks[i] = j
        np.minimum(min_d, sq + sq[j] - 2.0 * (x @ x[j]), out=min_d)
        min_d[j] = -np.inf
    return picks


def one_bank(params: dict[str, Any]) -> dict[str, Any]:
    n, d = int(params["n"]), int(params["d"])
    k = max(1, round(params["ratio"] * n))
    t0 = time.perf_counter()
    x = synthetic(n, d)
    gen_s = time.perf_counter() - t0
    _approx(x[:2000].copy(), 200)                 # first-call set-up outside the timing
    before = rss_bytes()
    with RssSampler(0.01) as sampler:
        t0 = time.perf_counter()
        picks = _approx(x, k)
        seconds = time.perf_counter() - t0
    return {
        "k": k, "kept": int(len(picks)), "generate_s": round(gen_s, 2), "seconds": round(seconds, 3),
        "us_per_kept_row": round(1e6 * seconds / k, 2), "bank_mib": mib(x.nbytes), "rss_before_mib": mib(before),
        "peak_extra_rss_mib": mib(sampler.peak_delta), "process_peak_rss_mib": mib(peak_rss_bytes()),
    }


def target(params: dict[str, Any]) -> dict[str, Any]:
    import torch

    from engine.coreset import covering_radius

    n, d, ratio = int(params["n"]), int(params["d"]), float(params["ratio"])
    k = max(1, round(ratio * n))
    x = synthetic(n, d)
    rng = np.random.default_rng(1)
    _approx(x[:2000].copy(), 200)

    approx_s = []
    for _ in range(int(params["repeats"])):
        t0 = time.perf_counter()
        _approx(x, k)
        approx_s.append(time.perf_counter() - t0)
    probe = min(int(params["probe_picks"]), k)
    t0 = time.perf_counter()
    exact_greedy(x, probe, int(rng.integers(n)))
    probe_s = time.perf_counter() - t0
    exact_full_est = probe_s / probe * k
    say(SECTION, f"target: approx {min(approx_s):.2f} s on {n} x {d}; exact estimated {exact_full_est:.0f} s")

    rows = np.sort(rng.choice(n, size=min(int(params["subset"]), n), replace=False))
    xs = np.ascontiguousarray(x[rows])
    del x
    ks = max(1, round(ratio * len(xs)))
    sub_approx_s = []
    for _ in range(int(params["repeats"])):
        t0 = time.perf_counter()
        picks_a = _approx(xs, ks)
        sub_approx_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    picks_e = exact_greedy(xs, ks, int(rng.integers(len(xs))))
    sub_exact_s = time.perf_counter() - t0
    xst = torch.from_numpy(xs)
    r_a = covering_radius(xst, torch.from_numpy(picks_a))
    r_e = covering_radius(xst, torch.from_numpy(picks_e))
    say(SECTION, f"target subset {len(xs)}: approx {min(sub_approx_s):.2f} s, exact {sub_exact_s:.1f} s, "
                 f"radius {r_a:.3f} / {r_e:.3f}")
    sub_rows = len(xs)
    del xs, xst
    real = _real_subset(int(params.get("real_images") or 0), ratio)
    return {
        "real_subset": real,
        "n": n, "d": d, "ratio": ratio, "k": k, "approx_s": round(min(approx_s), 3),
        "approx_runs_s": [round(v, 3) for v in approx_s],
        "exact_probe_picks": probe, "exact_ms_per_pick": round(1000 * probe_s / probe, 3),
        "exact_full_estimated_s": round(exact_full_est, 1),
        "speedup_full_estimated": round(exact_full_est / min(approx_s), 1),
        "subset": {"rows": sub_rows, "k": ks, "approx_s": round(min(sub_approx_s), 3),
                   "exact_s": round(sub_exact_s, 3), "speedup": round(sub_exact_s / min(sub_approx_s), 1),
                   "radius_approx": round(r_a, 5), "radius_exact": round(r_e, 5),
                   "radius_ratio": round(r_a / r_e, 4)},
    }


def _real_subset(n_images: int, ratio: float) -> dict[str, Any] | None:
    """Engine coreset vs exact greedy on real bottle patch features (Lite0 @ 224): time and radius."""
    if n_images < 1:
        return None
    import torch

    from bench.suite.common import AugmentedImages, scratch_dir
    from engine.api import Engine
    from engine.coreset import covering_radius
    from engine.settings import Settings

    images = AugmentedImages(n_images, source_side=224)
    if images.source == "synthetic":
        return {"error": "bottle data not found"}
    with scratch_dir("bench-coreset-") as tmp:
        engine = Engine(Settings(data_root=tmp, backbone="efficientnet_lite0", input_size=224, device="cpu"))
        feats = engine.extractor([images[i] for i in range(n_images)])        # N h w D
        engine.close()
    x = np.ascontiguousarray(feats.reshape(-1, feats.shape[-1]))
    k = max(1, round(ratio * len(x)))
    t0 = time.perf_counter()
    picks_a = _approx(x, k)
    approx_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    picks_e = exact_greedy(x, k, int(np.random.default_rng(2).integers(len(x))))
    exact_s = time.perf_counter() - t0
    xt = torch.from_numpy(x)
    r_a, r_e = covering_radius(xt, torch.from_numpy(picks_a)), covering_radius(xt, torch.from_numpy(picks_e))
    say(SECTION, f"real bottle features {x.shape}: approx {approx_s:.2f} s, exact {exact_s:.1f} s, "
                 f"radius {r_a:.3f} / {r_e:.3f}")
    return {"source": f"EfficientNet-Lite0 @ 224 features of {n_images} bottle train images", "rows": len(x),
            "d": int(x.shape[1]), "k": k, "approx_s": round(approx_s, 3), "exact_s": round(exact_s, 3),
            "speedup": round(exact_s / approx_s, 1), "radius_approx": round(r_a, 5), "radius_exact": round(r_e, 5),
            "radius_ratio": round(r_a / r_e, 4)}

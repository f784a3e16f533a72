"""Coreset selection: time and peak memory against bank size, and the comparison with exact greedy.

``engine.coreset.greedy_coreset`` runs with the engine's default settings (selection on the top
``coreset_projection_dim`` principal axes). Synthetic banks are float32 features made of
``CLUSTERS`` Gaussian clusters with unit-normal centres, per-cluster spread 0.05..0.5 and
Zipf-like sizes: isotropic noise in every dimension, the hard case for the engine's pruning
(real patch features keep their variance in few directions).

* scaling: one child process per (rows, dims) of synthetic features: time of one selection at
  ``ratio`` and the peak RSS it adds above the bank itself (sampled; tracemalloc does not see
  torch), plus the child's ru_maxrss.
* target, on real features: 384-dim patch features of ``real_384_images`` bottle train images at
  448 px (EfficientNet-Lite0 blocks of 80 + 112 channels at stride 16 and 192 at stride 32,
  3x3-averaged and upsampled to the stride-8 grid: 3136 patches an image, 200 704 for 64
  images). The engine's selection (best of ``repeats``) and a naive exact greedy k-center in
  numpy on the full dimensions run in full on the same bank: time ratio and covering radius
  (full dimensions) ratio.
* the same on synthetic 200 000 x 384: the engine's time; exact greedy's time estimated from
  ``probe_picks`` timed picks (its per-pick cost is constant: one N x D mat-vec), and both run
  in full on a random ``subset``-row subset for the radius.
* the same on the engine's default features: EfficientNet-Lite0 patch features (152 dims) of
  ``real_images`` bottle train images at 224 px (784 patches each), both run in full.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.suite.common import RssSampler, mib, peak_rss_bytes, rss_bytes, run_child, say

CLUSTERS = 1000
FULL: dict[str, Any] = {
    "sizes": [10_000, 100_000, 200_000, 600_000], "dims": [152], "ratio": 0.1,
    "target": {"n": 200_000, "d": 384, "ratio": 0.1, "subset": 50_000, "probe_picks": 200, "repeats": 2,
               "real_images": 64, "real_384_images": 64},
    # exact greedy (numpy, one thread) on the 200k x 384 real features alone took 586 s on a 2-core EPYC
    "timeout_s": 1200,
}
QUICK: dict[str, Any] = {
    **FULL, "sizes": [10_000, 100_000], "dims": [152, 384],
    "target": {"n": 200_000, "d": 384, "ratio": 0.1, "subset": 10_000, "probe_picks": 30, "repeats": 1,
               "real_images": 13, "real_384_images": 4},
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
    say(SECTION, f"target: real 384-dim features and {t['n']} x {t['d']} synthetic at {t['ratio']:.0%} "
                 "against exact greedy")
    target = run_child("coreset:target", {**t, "threads": params.get("threads")}, timeout=params["timeout_s"])
    if "error" in target:
        say(SECTION, f"target failed: {target['error']}")
    return {"ratio": params["ratio"], "rows": rows, "target": target, "settings": _defaults()}


def _defaults() -> dict[str, int]:
    from engine.settings import Settings

    fields = Settings.model_fields  # the defaults, whatever the environment says
    return {"projection_dim": int(fields["coreset_projection_dim"].default)}


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
    return greedy_coreset(torch.from_numpy(x), k, projection_dim=s["projection_dim"], seed=0).numpy()


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
    _approx(x[:10_000].copy(), 1000)                 # first-call set-up outside the timing
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
    _approx(x[:10_000].copy(), 1000)

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
    real_384 = _real_384(int(params.get("real_384_images") or 0), ratio, int(params["repeats"]))
    return {
        "real_384": real_384,
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
    from bench.suite.common import AugmentedImages, scratch_dir
    from engine.api import Engine
    from engine.settings import Settings

    images = AugmentedImages(n_images, source_side=224)
    if images.source == "synthetic":
        return {"error": "bottle data not found"}
    with scratch_dir("bench-coreset-") as tmp:
        engine = Engine(Settings(data_root=tmp, backbone="efficientnet_lite0", input_size=224, device="cpu"))
        feats = engine.extractor([images[i] for i in range(n_images)])        # N h w D
        engine.close()
    x = np.ascontiguousarray(feats.reshape(-1, feats.shape[-1]))
    out = against_exact(x, ratio, repeats=1, exact_seed=2)
    say(SECTION, f"real bottle features {x.shape}: approx {out['approx_s']:.2f} s, exact {out['exact_s']:.1f} s, "
                 f"radius {out['radius_approx']:.3f} / {out['radius_exact']:.3f}")
    return {"source": f"EfficientNet-Lite0 @ 224 features of {n_images} bottle train images", **out}


def against_exact(x: np.ndarray, ratio: float, *, repeats: int, exact_seed: int) -> dict[str, Any]:
    """The engine's selection (best of ``repeats``) and exact greedy, both in full on x: times and radii."""
    import torch

    from engine.coreset import covering_radius

    k = max(1, round(ratio * len(x)))
    _approx(x[:10_000].copy(), min(k, 1000))
    approx_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        picks_a = _approx(x, k)
        approx_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    picks_e = exact_greedy(x, k, int(np.random.default_rng(exact_seed).integers(len(x))))
    exact_s = time.perf_counter() - t0
    xt = torch.from_numpy(x)
    r_a, r_e = covering_radius(xt, torch.from_numpy(picks_a)), covering_radius(xt, torch.from_numpy(picks_e))
    return {"rows": len(x), "d": int(x.shape[1]), "k": k, "approx_s": round(min(approx_s), 3),
            "approx_runs_s": [round(v, 3) for v in approx_s], "exact_s": round(exact_s, 3),
            "speedup": round(exact_s / min(approx_s), 1), "radius_approx": round(r_a, 5),
            "radius_exact": round(r_e, 5), "radius_ratio": round(r_a / r_e, 4)}


def real_384_features(n_images: int) -> tuple[np.ndarray, str]:
    """(n_images * 3136, 384) float32 patch features of bottle train images at 448 px, and their source.

    EfficientNet-Lite0's last blocks with 80, 112 (stride 16) and 192 (stride 32) channels, each
    3x3-averaged and upsampled to the stride-8 grid, as the engine aggregates its own features.
    """
    import torch
    import torch.nn.functional as F

    from bench.suite.common import AugmentedImages
    from engine.backbones.efficientnet_lite import load_efficientnet_lite
    from engine.images import resize_square

    side = 448
    model = load_efficientnet_lite("efficientnet_lite0", side)
    info = model.info
    with torch.inference_mode():
        probe = model.block_features(torch.zeros(1, 3, 32, 32), range(16))
        channels = [int(f.shape[1]) for f in probe]
        blocks = [max(i for i, c in enumerate(channels) if c == want) for want in (80, 112, 192)]
        images = AugmentedImages(n_images, source_side=side)
        mean = torch.tensor(info.mean).view(1, 3, 1, 1)
        std = torch.tensor(info.std).view(1, 3, 1, 1)
        grid = side // info.stride
        out = []
        for start in range(0, n_images, 8):
            batch = np.stack([resize_square(images[i], side) for i in range(start, min(n_images, start + 8))])
            x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() - mean) / std
            maps = [F.interpolate(F.avg_pool2d(f, 3, stride=1, padding=1), size=(grid, grid), mode="bilinear",
                                  align_corners=False) for f in model.block_features(x, blocks)]
            out.append(torch.cat(maps, 1).permute(0, 2, 3, 1).reshape(-1, sum(channels[b] for b in blocks)).numpy())
    source = (f"EfficientNet-Lite0 blocks {blocks} (80+112+192 channels) @ {side} px of {n_images} "
              f"{'bottle train' if images.source != 'synthetic' else 'synthetic'} images")
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32), source


def _real_384(n_images: int, ratio: float, repeats: int) -> dict[str, Any] | None:
    """Engine coreset vs exact greedy, both in full, on real 384-dim patch features."""
    if n_images < 1:
        return None
    x, source = real_384_features(n_images)
    if "synthetic" in source:
        return {"error": "bottle data not found"}
    out = against_exact(x, ratio, repeats=repeats, exact_seed=3)
    say(SECTION, f"real 384-dim features {x.shape}: engine {out['approx_s']:.2f} s, exact {out['exact_s']:.1f} s, "
                 f"radius {out['radius_approx']:.3f} / {out['radius_exact']:.3f}")
    return {"source": source, **out}

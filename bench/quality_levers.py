"""Screening of detection-quality levers on an MVTec-layout category, several variants per process.

The protocol (``python -m engine evaluate``) fits and scores through the engine for one recipe
at a time. This script screens many variants in one process, with the engine's own pieces
(``Backbone.forward`` with a ``FeatureLayout``, ``greedy_coreset``, faiss, ``anomaly_map``,
``engine.metrics``): features are extracted once per (side, layout, augmentation), then every
coreset share, smoothing and image-score rule is scored from them. It also screens levers the
engine does not offer (rotation / flip augmentation of the OK images, image-score rules other
than a percentile, test-time flips), to decide whether they are worth building.

    python bench/quality_levers.py ../shared/data/mvtec_ad/screw --side 224 --levels 8+16,4+8+16 \\
        --aggregations 1,3 --ratios 0.1,0.01 [--augment none|rot4|flip|rot8] [--tta] [--max-train N]

One JSON line per variant on stdout: image AUROC under each score rule (``p99``, ``p99.9``,
``max`` of the full-size map; ``top100ppm``: mean of its top 0.01 %), pixel AUROC and PRO on
256 x 256 maps, as the protocol computes them, memory rows, coreset seconds and kNN ms per image.
Figures of one variant are close to, not equal to, the protocol's for the same recipe: the engine
folds BatchNorms, thins large banks on fewer principal axes and may search an inverted file;
this script searches a flat index.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.anomaly_map import anomaly_map  # noqa: E402
from engine.backbones import FeatureLayout  # noqa: E402
from engine.backbones.efficientnet_lite import load_efficientnet_lite  # noqa: E402
from engine.coreset import greedy_coreset  # noqa: E402
from engine.evaluate import list_test, list_train  # noqa: E402
from engine.images import decode_image, resize_square  # noqa: E402
from engine.knn import configure_faiss  # noqa: E402
from engine.metrics import auroc, pro_auc  # noqa: E402

_PIXEL_SIDE = 256


def _read(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes(), 1 << 30)


def _augment(images: list[np.ndarray], mode: str) -> list[np.ndarray]:
    """The OK images plus their 90/180/270 degree turns (rot4), mirror images (flip), or both (rot8)."""
    out = list(images)
    if mode in ("rot4", "rot8"):
        out += [np.ascontiguousarray(np.rot90(im, k)) for k in (1, 2, 3) for im in images]
    if mode in ("flip", "rot8"):
        out += [np.ascontiguousarray(im[:, ::-1]) for im in list(out)]
    return out


def _features(model: torch.nn.Module, images: list[np.ndarray], layout: FeatureLayout) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(im[None]), layout).numpy() for im in images])  # N h w D


def _test_set(category: Path) -> tuple[list[np.ndarray], list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Test images (RGB as read), their sizes, 256 x 256 masks and labels."""
    images, sizes, masks, labels = [], [], [], []
    for item in list_test(category):
        rgb = _read(item.path)
        images.append(rgb)
        sizes.append(rgb.shape[:2])
        mask = np.zeros((_PIXEL_SIDE, _PIXEL_SIDE), bool)
        if item.mask_path is not None:
            raw = cv2.imread(str(item.mask_path), cv2.IMREAD_GRAYSCALE)
            mask = cv2.resize(raw, (_PIXEL_SIDE, _PIXEL_SIDE), interpolation=cv2.INTER_NEAREST) > 0
        masks.append(mask)
        labels.append(item.label)
    return images, sizes, np.stack(masks), np.array(labels)


def _rules(amap: np.ndarray) -> dict[str, float]:
    flat = amap.ravel()
    top = max(1, flat.size // 10_000)
    return {"p99": float(np.percentile(flat, 99)), "p99.9": float(np.percentile(flat, 99.9)),
            "max": float(flat.max()), "top100ppm": float(np.partition(flat, -top)[-top:].mean())}


def _patch_distances(index: faiss.Index, feats: np.ndarray) -> np.ndarray:
    n, h, w, d = feats.shape
    d2, _ = index.search(np.ascontiguousarray(feats.reshape(-1, d)), 1)
    return np.sqrt(np.maximum(d2[:, 0], 0)).reshape(n, h, w)


def _score(patches: np.ndarray, flipped: np.ndarray | None, sizes: list[tuple[int, int]], sigma: float,
           masks: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """Image AUROC per rule, pixel AUROC and PRO from (T, h, w) patch distances."""
    rules: dict[str, list[float]] = {}
    maps = np.empty((len(sizes), _PIXEL_SIDE, _PIXEL_SIDE), np.float32)
    for i, (height, width) in enumerate(sizes):
        dist = patches[i] if flipped is None else 0.5 * (patches[i] + flipped[i][:, ::-1])
        amap = anomaly_map(dist, height, width, sigma)
        for name, value in _rules(amap).items():
            rules.setdefault(name, []).append(value)
        maps[i] = cv2.resize(amap, (_PIXEL_SIDE, _PIXEL_SIDE), interpolation=cv2.INTER_AREA)
    return {"image_auroc": {k: round(auroc(np.array(v), labels), 4) for k, v in rules.items()},
            "pixel_auroc": round(auroc(maps, masks), 4), "pro": round(pro_auc(maps, masks), 4)}


def _variants(args: argparse.Namespace, model: torch.nn.Module, train: list[np.ndarray],
              test: tuple[list[np.ndarray], list[tuple[int, int]], np.ndarray, np.ndarray]) -> None:
    images, sizes, masks, labels = test
    resized = [resize_square(im, args.side) for im in images]
    for levels in args.levels.split(","):
        for aggregation in (int(a) for a in args.aggregations.split(",")):
            layout = FeatureLayout(tuple(int(v) for v in levels.split("+")), aggregation)
            t0 = time.perf_counter()
            feats = _features(model, train, layout)
            test_feats = _features(model, resized, layout)
            flip_feats = _features(model, [np.ascontiguousarray(im[:, ::-1]) for im in resized], layout) \
                if args.tta else None
            extract_s = time.perf_counter() - t0
            flat = feats.reshape(-1, feats.shape[-1])
            for ratio in (float(r) for r in args.ratios.split(",")):
                t0 = time.perf_counter()
                keep = greedy_coreset(torch.from_numpy(flat), max(1, round(ratio * len(flat))), projection_dim=192)
                index = faiss.IndexFlatL2(flat.shape[1])
                index.add(np.ascontiguousarray(flat[keep.numpy()]))
                coreset_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                patches = _patch_distances(index, test_feats)
                knn_ms = (time.perf_counter() - t0) * 1000 / len(resized)
                flipped = _patch_distances(index, flip_feats) if flip_feats is not None else None
                for sigma in (float(s) for s in args.sigmas.split(",")):
                    row = {"category": args.category.name, "side": args.side, "levels": levels,
                           "aggregation": aggregation, "augment": args.augment, "tta_flip": args.tta,
                           "ratio": ratio, "sigma": sigma, "n_train": len(train), "memory_rows": index.ntotal,
                           **_score(patches, flipped, sizes, sigma, masks, labels),
                           "extract_s": round(extract_s, 1), "coreset_s": round(coreset_s, 1),
                           "knn_ms": round(knn_ms, 1)}
                    print(json.dumps(row), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("category", type=Path)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--levels", default="8+16", help="comma-separated layouts, strides joined by +")
    parser.add_argument("--aggregations", default="3")
    parser.add_argument("--ratios", default="0.1")
    parser.add_argument("--sigmas", default="4")
    parser.add_argument("--augment", default="none", choices=["none", "rot4", "flip", "rot8"])
    parser.add_argument("--tta", action="store_true", help="also score the mirrored test image, average the maps")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (1 resists a busy CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    configure_faiss(args.threads)
    model = load_efficientnet_lite(args.backbone, args.side)
    train = _augment([resize_square(_read(p), args.side) for p in list_train(args.category, args.max_train)],
                     args.augment)
    _variants(args, model, train, _test_set(args.category))
    return 0


if __name__ == "__main__":
    sys.exit(main())

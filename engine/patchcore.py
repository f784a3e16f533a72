"""PatchCore's memory: build it from training features, score new features against it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from engine.anomaly_map import anomaly_map, masked_percentile
from engine.coreset import greedy_coreset
from engine.knn import Distance, IndexChoice, TorchBank, build_index, build_search_index, knn_distances

__all__ = ["Memory", "build_memory", "leave_out_scores", "patch_scores"]


@dataclass(frozen=True)
class Memory:
    bank: np.ndarray        # (M, D) float32 rows kept
    sources: np.ndarray     # (M,) index of the training image each row came from
    index: faiss.Index
    choice: IndexChoice


def build_memory(
    features: np.ndarray, ratio: float, keep_all: bool, distance: Distance, *,
    projection_dim: int, seed: int, device: str, ivf_min_rows: int = 100_000,
) -> Memory:
    """features (N, h, w, D) -> memory of about ``ratio * N * h * w`` rows (all with keep_all)."""
    n, h, w, d = features.shape
    flat = features.reshape(-1, d)                                   # N*h*w D
    sources = np.repeat(np.arange(n), h * w)
    if keep_all:
        keep = np.arange(len(flat))
    else:
        k = max(1, int(round(ratio * len(flat))))
        x = torch.from_numpy(flat).to(device)
        if distance == "cosine":
            x = torch.nn.functional.normalize(x, dim=1)
        keep = greedy_coreset(x, k, projection_dim=projection_dim, seed=seed).cpu().numpy()
    bank = np.ascontiguousarray(flat[keep])
    probes = None
    if len(bank) >= ivf_min_rows:
        # recall is measured on patches the memory did not keep: they stand for unseen parts
        rest = np.setdiff1d(np.arange(len(flat)), keep)
        rng = np.random.default_rng(seed)
        probes = flat[rng.choice(rest, size=min(len(rest), 2000), replace=False)] if len(rest) else None
    index, choice = build_search_index(bank, distance, ivf_min_rows=ivf_min_rows, probe_queries=probes, seed=seed)
    return Memory(bank, sources[keep], index, choice)


def patch_scores(index: faiss.Index | TorchBank, features: np.ndarray, distance: Distance, k: int) -> np.ndarray:
    """features (h, w, D) -> (h, w) distance of each patch to the memory (faiss or torch bank)."""
    h, w, d = features.shape
    flat = features.reshape(-1, d)
    if isinstance(index, TorchBank):
        return index.distances(flat, k).reshape(h, w)
    return knn_distances(index, flat, distance, k).reshape(h, w)


def leave_out_scores(
    features: np.ndarray, memory: Memory, image_sizes: Sequence[tuple[int, int]], scored: Sequence[int],
    distance: Distance, k: int, sigma: float, percentile: float, folds: int,
) -> dict[int, float]:
    """Image scores of training images ``scored``, each against the memory without its own fold.

    Image i belongs to fold ``i % folds``; it is scored like an inference (whole image, no mask)
    against an index of the memory rows that came from other folds, so the scores estimate
    what unseen OK parts will score. Needs at least two training images.
    """
    n = features.shape[0]
    folds = min(folds, n)
    if folds < 2:
        return {}
    fold_of = memory.sources % folds
    out: dict[int, float] = {}
    for fold in range(folds):
        members = [i for i in scored if i % folds == fold]
        rows = memory.bank[fold_of != fold]
        if not members or len(rows) == 0:
            continue
        index = build_index(rows, distance)
        for i in members:
            height, width = image_sizes[i]
            amap = anomaly_map(patch_scores(index, features[i], distance, k), height, width, sigma)
            out[i] = masked_percentile(amap, None, percentile)
    return out

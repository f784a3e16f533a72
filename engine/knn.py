"""Nearest-neighbour distances from patch features to a memory bank, with faiss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

__all__ = [
    "Distance",
    "IndexChoice",
    "TorchBank",
    "build_index",
    "build_search_index",
    "configure_faiss",
    "deserialize_index",
    "knn_distances",
    "serialize_index",
    "set_nprobe",
]

Distance = Literal["l2", "cosine"]


def configure_faiss(threads: int | None = None) -> None:
    """Process-wide faiss settings; call once at start-up, never at import."""
    # faiss skips BLAS below this many queries; one ROI has 784-3000 queries, and the BLAS path
    # is 3-9x faster for them (measured on faiss-cpu 1.15.1, see PERF_NOTES).
    faiss.cvar.distance_compute_blas_threshold = 20
    if threads is not None:
        faiss.omp_set_num_threads(threads)


def _prepare(x: np.ndarray, distance: Distance) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if distance == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    return x


def build_index(bank: np.ndarray, distance: Distance) -> faiss.Index:
    """A flat (exact) index over bank (M, D)."""
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"bank must be (M, D) with M > 0, got {bank.shape}")
    dim = bank.shape[1]
    index = faiss.IndexFlatL2(dim) if distance == "l2" else faiss.IndexFlatIP(dim)
    index.add(_prepare(bank, distance))
    return index


@dataclass(frozen=True)
class IndexChoice:
    """Which index a memory got, and for IVF the probe count and its measured recall."""

    kind: Literal["flat", "ivf"]
    nlist: int = 0
    nprobe: int = 0
    recall: float = 1.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {"kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe, "recall": self.recall}


def build_search_index(
    bank: np.ndarray, distance: Distance, *, ivf_min_rows: int, probe_queries: np.ndarray | None,
    target_recall: float = 0.99, seed: int = 0,
) -> tuple[faiss.Index, IndexChoice]:
    """The serving index for a memory bank (M, D): flat (exact) below ``ivf_min_rows`` rows,
    above it an inverted-file index whose probe count is the smallest power of two that finds
    the exact nearest neighbour for ``target_recall`` of ``probe_queries`` (held-out patches).
    """
    if len(bank) < ivf_min_rows or probe_queries is None or len(probe_queries) == 0:
        return build_index(bank, distance), IndexChoice("flat")
    prepared = _prepare(bank, distance)
    dim = prepared.shape[1]
    nlist = max(1, int(4 * np.sqrt(len(bank))))
    metric = faiss.METRIC_L2 if distance == "l2" else faiss.METRIC_INNER_PRODUCT
    quantizer = faiss.IndexFlatL2(dim) if distance == "l2" else faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
    rng = np.random.default_rng(seed)
    train = prepared[rng.choice(len(prepared), size=min(len(prepared), 64 * nlist), replace=False)]
    index.train(train)
    index.add(prepared)
    exact = knn_distances(build_index(bank, distance), probe_queries, distance, 1)
    # slack for rounding: the flat index's BLAS path (|q|^2 + |b|^2 - 2 q.b) loses precision on
    # near-duplicate patches, where IVF's direct distances are the more exact ones
    slack = exact * 1e-3 + 1e-3 * float(np.mean(exact))
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        found = knn_distances(index, probe_queries, distance, 1)
        recall = float(np.mean(found <= exact + slack))   # found the nearest neighbour (or a tie)
        if recall >= target_recall or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    return index, IndexChoice("ivf", nlist=nlist, nprobe=nprobe, recall=round(recall, 5))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Restore the probe count of an IVF index read back from bytes."""
    if nprobe > 0:
        faiss.extract_index_ivf(index).nprobe = nprobe


def knn_distances(index: faiss.Index, queries: np.ndarray, distance: Distance, k: int = 1) -> np.ndarray:
    """(Q,) distance of each query (Q, D) to the bank: mean over its k nearest neighbours.

    l2: Euclidean distance. cosine: 1 - cosine similarity.
    """
    k = min(k, index.ntotal)
    sims, _ = index.search(_prepare(queries, distance), k)
    if distance == "l2":
        dist = np.sqrt(np.maximum(sims, 0.0))  # faiss L2 indexes return squared distances
    else:
        dist = 1.0 - sims                      # inner product of unit vectors = cosine
    return dist.mean(axis=1).astype(np.float32)


def serialize_index(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize_index(data: bytes) -> faiss.Index:
    # from bytes rather than faiss.read_index(path): the latter fails on non-ASCII paths on Windows
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


class TorchBank:
    """Exact kNN by matrix product on a torch device: the GPU path (faiss-cpu has no GPU).

    Same distances as the flat faiss index: l2 Euclidean, cosine 1 - similarity.
    """

    def __init__(self, bank: np.ndarray, distance: Distance, device: str) -> None:
        import torch

        self.distance = distance
        self.device = torch.device(device)
        self.bank = torch.from_numpy(_prepare(bank, distance)).to(self.device)       # M D
        self.bank_sq = (self.bank * self.bank).sum(1)                                  # M
        self.ntotal = int(self.bank.shape[0])

    def distances(self, queries: np.ndarray, k: int = 1) -> np.ndarray:
        """(Q,) mean distance of each query (Q, D) to its k nearest bank rows."""
        import torch

        k = min(k, self.ntotal)
        with torch.inference_mode():
            q = torch.from_numpy(_prepare(queries, self.distance)).to(self.device)    # Q D
            dots = q @ self.bank.T                                                      # Q M
            if self.distance == "l2":
                d2 = (q * q).sum(1, keepdim=True) + self.bank_sq[None, :] - 2.0 * dots
                dist = torch.topk(d2, k, dim=1, largest=False).values.clamp_min_(0).sqrt_()
            else:
                dist = 1.0 - torch.topk(dots, k, dim=1).values
            return dist.mean(1).float().cpu().numpy()

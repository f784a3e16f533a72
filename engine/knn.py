"""Nearest-neighbour basics: exact (flat) faiss indexes, their bytes, and the torch bank for CUDA.

The serving search of large memories (approximate, then exact where it matters) is in
``engine.search``.
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np

from engine.threads import use_faiss_threads

__all__ = [
    "Distance",
    "TorchBank",
    "build_index",
    "configure_faiss",
    "deserialize_index",
    "knn_distances",
    "prepare_rows",
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


def prepare_rows(x: np.ndarray, distance: Distance) -> np.ndarray:
    """(N, D) float32 C-contiguous rows as the indexes hold them: unit length for cosine."""
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
    index.add(prepare_rows(bank, distance))
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Restore the probe count of an IVF index read back from bytes."""
    if nprobe > 0:
        faiss.extract_index_ivf(index).nprobe = nprobe


def knn_distances(index: faiss.Index, queries: np.ndarray, distance: Distance, k: int = 1) -> np.ndarray:
    """(Q,) distance of each query (Q, D) to the bank: mean over its k nearest neighbours.

    l2: Euclidean distance. cosine: 1 - cosine similarity.
    """
    use_faiss_threads()
    k = min(k, index.ntotal)
    sims, _ = index.search(prepare_rows(queries, distance), k)
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
        self.bank = torch.from_numpy(prepare_rows(bank, distance)).to(self.device)       # M D
        self.bank_sq = (self.bank * self.bank).sum(1)                                  # M
        self.ntotal = int(self.bank.shape[0])

    def distances(self, queries: np.ndarray, k: int = 1) -> np.ndarray:
        """(Q,) mean distance of each query (Q, D) to its k nearest bank rows."""
        import torch

        k = min(k, self.ntotal)
        with torch.inference_mode():
            q = torch.from_numpy(prepare_rows(queries, self.distance)).to(self.device)    # Q D
            dots = q @ self.bank.T                                                      # Q M
            if self.distance == "l2":
                d2 = (q * q).sum(1, keepdim=True) + self.bank_sq[None, :] - 2.0 * dots
                dist = torch.topk(d2, k, dim=1, largest=False).values.clamp_min_(0).sqrt_()
            else:
                dist = 1.0 - torch.topk(dots, k, dim=1).values
            return dist.mean(1).float().cpu().numpy()

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q,) distance to the nearest bank row and (Q,) its row id."""
        import torch

        with torch.inference_mode():
            q = torch.from_numpy(prepare_rows(queries, self.distance)).to(self.device)    # Q D
            dots = q @ self.bank.T                                                      # Q M
            if self.distance == "l2":
                d2 = (q * q).sum(1, keepdim=True) + self.bank_sq[None, :] - 2.0 * dots
                best, ids = torch.min(d2, dim=1)
                dist = best.clamp_min_(0).sqrt_()
            else:
                best, ids = torch.max(dots, dim=1)
                dist = 1.0 - best
            return dist.float().cpu().numpy(), ids.cpu().numpy().astype(np.int64)

"""Nearest-neighbour distances from patch features to a memory bank, with faiss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

__all__ = [
    "Distance",
    "IndexChoice",
    "MemorySearch",
    "TorchBank",
    "build_index",
    "build_search_index",
    "configure_faiss",
    "deserialize_index",
    "keep_rows",
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


def keep_rows(rows: np.ndarray, total: int) -> faiss.IDSelector:
    """A faiss selector that lets a search see only bank rows where ``rows`` (total,) is true."""
    bits = np.packbits(np.asarray(rows, dtype=bool)[:total], bitorder="little")
    selector = faiss.IDSelectorBitmap(total, faiss.swig_ptr(bits))
    selector.bits_owner = bits              # the selector reads the array: keep it alive with it
    return selector


class MemorySearch:
    """1-NN (k-NN) search of patch features in a memory's index, approximate or exact.

    ``search`` is exact on a flat index and approximate on an IVF one (``nprobe`` lists per
    query, passed per call so concurrent searches never share index state). ``exact`` re-scores
    queries exactly on an IVF index by pruning: a query's k nearest rows are within ``reach``
    (its k-th approximate distance, an upper bound), so only the lists whose ball (centroid,
    largest member distance) comes within ``reach`` of the query can hold them, and faiss scans
    just those (``search_preassigned``). On the engine's patch memories that is ~4 % of the
    rows (bottle, 60k rows, 1024 lists), against 100 % for a flat search.
    """

    def __init__(self, index: faiss.Index, distance: Distance, k: int, nprobe: int = 0) -> None:
        self.index = index
        self.distance = distance
        self.k = max(1, min(int(k), index.ntotal))
        self.ivf = _ivf_of(index)
        self.nprobe = max(1, int(nprobe)) if self.ivf is not None else 0
        self._centroids: np.ndarray | None = None
        self._centroid_sq: np.ndarray | None = None
        self._radius: np.ndarray | None = None
        if self.ivf is not None:
            self._centroids, self._radius = _list_balls(self.ivf)
            self._centroid_sq = np.einsum("ld,ld->l", self._centroids, self._centroids)

    @property
    def approximate(self) -> bool:
        return self.ivf is not None

    def search(self, queries: np.ndarray, selector: faiss.IDSelector | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q,) mean distance to the k nearest rows found, and (Q,) the k-th of them (its reach)."""
        params = None
        if self.ivf is not None:
            params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.ivf.nlist), sel=selector)
        elif selector is not None:
            params = faiss.SearchParameters(sel=selector)
        raw, _ = self.index.search(_prepare(queries, self.distance), self.k, params=params)
        return self._finish(raw)

    def exact(self, queries: np.ndarray, reach: np.ndarray, selector: faiss.IDSelector | None = None) -> np.ndarray:
        """(Q,) exact mean distance to the k nearest rows, given each query's ``reach`` (Q,) (an
        upper bound of its k-th nearest distance, such as ``search``'s second result)."""
        if self.ivf is None:
            return self.search(queries, selector)[0]
        x = _prepare(queries, self.distance)                                     # Q D
        n = len(x)
        rows, lists = np.nonzero(self._candidate_lists(x, reach))                 # pairs (query, list)
        counts = np.bincount(rows, minlength=n)
        width = max(1, int(counts.max(initial=0)))
        # each query's candidate lists first, then -1 (lists faiss skips)
        assign = np.full((n, width), -1, dtype=np.int64)
        assign[rows, np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]] = lists
        params = faiss.SearchParametersIVF(nprobe=width, sel=selector)
        raw = np.empty((n, self.k), dtype=np.float32)
        labels = np.empty((n, self.k), dtype=np.int64)
        coarse = np.zeros((n, width), dtype=np.float32)       # unused by flat inverted lists
        self.ivf.search_preassigned_c(n, faiss.swig_ptr(x), self.k, faiss.swig_ptr(assign), faiss.swig_ptr(coarse),
                                      faiss.swig_ptr(raw), faiss.swig_ptr(labels), False, params)
        return self._finish(raw)[0]

    def _candidate_lists(self, x: np.ndarray, reach: np.ndarray) -> np.ndarray:
        """(Q, nlist) bool: lists whose ball comes within reach of each query (Euclidean)."""
        assert self._centroids is not None and self._radius is not None and self._centroid_sq is not None
        r = np.asarray(reach, dtype=np.float64)
        if self.distance == "cosine":
            r = np.sqrt(np.maximum(2.0 * r, 0.0))        # unit vectors: |q - b|^2 = 2 (1 - cos)
        q_sq = np.einsum("qd,qd->q", x, x)
        d2 = q_sq[:, None] + self._centroid_sq[None, :] - 2.0 * (x @ self._centroids.T)   # Q nlist
        # |q - b| >= |q - c| - radius: a list can hold a row within r only if |q - c| <= r + radius.
        # The slack covers float32 rounding of |q|^2 + |c|^2 - 2 q.c and of the faiss distances.
        bound = r[:, None] * (1 + 1e-4) + self._radius[None, :] + 1e-4
        slack = 1e-5 * (q_sq[:, None] + self._centroid_sq[None, :])
        return d2 <= bound * bound + slack

    def _finish(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.distance == "l2":
            dist = np.sqrt(np.maximum(raw, 0.0))         # faiss L2 indexes return squared distances
        else:
            dist = 1.0 - raw                             # inner product of unit vectors = cosine
        return dist.mean(axis=1).astype(np.float32), dist[:, -1].astype(np.float32)


def _ivf_of(index: faiss.Index) -> faiss.IndexIVFFlat | None:
    """The inverted-file index inside ``index``; None for a flat one.

    Raises:
        ValueError: an inverted-file index that does not store raw rows (not IndexIVFFlat).
    """
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:                                 # not an IVF index
        return None
    if not isinstance(ivf, faiss.IndexIVFFlat):
        raise ValueError(f"unsupported inverted-file index {type(ivf).__name__}: IndexIVFFlat expected")
    return ivf


def _list_balls(ivf: faiss.IndexIVF) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (nlist, D) and, per list, the largest distance of a member to its centroid."""
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)   # nlist D
    radius = np.zeros(ivf.nlist, dtype=np.float32)
    lists = ivf.invlists
    dim = ivf.d
    for i in range(ivf.nlist):
        size = lists.list_size(i)
        if size == 0:
            continue
        # flat inverted lists store the raw float32 rows; the view lives only in this loop
        codes = faiss.rev_swig_ptr(lists.get_codes(i), size * dim * 4)
        rows = np.frombuffer(codes, dtype=np.float32).reshape(size, dim)
        offset = rows - centroids[i]
        radius[i] = np.sqrt(np.einsum("nd,nd->n", offset, offset).max())
    return centroids, radius


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

"""Nearest-neighbour search of patch features in a memory: approximate, and exact on demand.

Large memories get a *projected* inverted-file index. Each row ``x`` is stored by its
coordinates ``w(x) = (P (x - mu), |R (x - mu)|)``: its first ``axes`` principal coordinates,
and the length of what is left (the residual). ``P`` and ``R`` split an orthonormal basis, so
for any query ``q`` and row ``b``::

    |w(q) - w(b)|^2 = |P(q - b)|^2 + (|R(q - mu)| - |R(b - mu)|)^2 <= |q - b|^2

(reverse triangle inequality on the residual): distances between coordinates are lower bounds
of the true distances, in ``axes + 1`` dimensions instead of D. The memory rows themselves
(the model's embeddings) give the true distances.

* ``search`` (approximate): the ``candidates`` rows nearest in coordinates (``nprobe`` lists
  probed), then their true distances; the best of those is a true distance to a real row, so
  it is never below the exact nearest-neighbour distance (the property ``engine.refine``
  builds on).
* ``exact``: given a reach (an upper bound of the k-th nearest distance, e.g. ``search``'s),
  only rows whose coordinate distance is within reach can be closer. A list whose ball (centre,
  largest member distance) stays out of every query's reach is skipped; the lists are grouped
  in blocks of neighbouring lists, and one matrix product per block (a reach per query, over
  the lists of the block some query needs) gives the rows within reach, whose true distances
  decide. Outlying patches reach many blocks: the blocks of one search are shared out over
  worker threads.

Measured on bottle features (Lite0, 152 dims, 2-core EPYC): 32 axes keep 94 % of the
variance. At 65 542 rows (448 px), the patches refinement re-scores in a defective ROI pass the
lower bound for ~600-740 rows each (~200 in a good one), against 65 542 for a flat search.

The C exact scan of a large memory also holds the rows within reach to a second bound before
their true distance: the next principal axes past ``axes`` (the PCA stores them all) split the
residual, ``|R(x - mu)|^2 = |E(x - mu)|^2 + |R'(x - mu)|^2``, so the same argument on ``E``'s
coordinates and the shorter residual ``R'`` gives a tighter lower bound (``_FINER_ROWS``).

Memories kept before this layout (plain ``IndexIVFFlat`` over the rows) are searched the same
way with coordinates equal to the rows; flat indexes are exact and ``exact`` is ``search``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import cached_property, partial
from typing import Literal, TypeVar

import faiss
import numpy as np

from engine import ivfscan
from engine.knn import Distance, build_index, knn_distances, prepare_rows
from engine.refine import DEFAULT_MARGIN
from engine.threads import InTurn, SizedPool, use_faiss_threads

__all__ = ["AXES", "IndexChoice", "MemorySearch", "RowFilter", "build_search_index", "configure_exact_workers",
           "keep_rows"]

AXES = 31                     # principal coordinates of the projected index (plus the residual: 32)
_CANDIDATES = 8               # rows per query whose true distance the approximate search takes
_MAX_PROBES = 16              # the recall tuning stops here: exactness comes from refinement anyway
_ROWS_PER_BLOCK = 1024        # memory rows per block of the exact search
_SHARED_WORK = 500_000        # row comparisons of one exact search above which its blocks are shared out (~0.6 ms)
_MIN_LISTS, _MAX_LISTS = 16, 4096
_ORTHONORMAL = 1e-5           # a PCA's float32 axes are orthonormal to ~1e-6
# memory rows from which the C exact scan takes the second bound: its queries' projection on twice
# the axes costs more than the true distances it saves below (bottle Lite0 defective ROI, exact step on
# two workers, in turns: 8 477 rows 3.81 -> 3.94 ms, 59 741 rows 3.95 -> 3.48, 65 542 rows 21.8 -> 19.5)
_FINER_ROWS = 32_768
_NATIVE_MAX_K = 64             # the C scans' largest k (engine/_ivfscan.c); faiss and numpy above it
# pieces of one C approximate scan (ranges of queries): each piece re-reads every centroid and scans
# lists fewer of its patches share; in the engine, switched per request (2-core EPYC, 784 patches at
# 224 px): kNN stage 4.26 -> 4.05 ms defective at 16 386 rows, 7.42 -> 7.18 ms at 59 741 rows, good
# ROIs -0.17 ms, against 8 pieces; 2 704 and 3 136 patches (416 and 448 px) within noise
_QUERY_PIECES = 2
_QUERIES_PER_PIECE = 64        # the fewest queries in a piece of a C approximate scan
_QUERY_WORK = 2_000            # row comparisons a query's approximate scan counts as, for sharing it out


@dataclass(frozen=True)
class IndexChoice:
    """Which index a memory got; for inverted files the probe count and its measured recall, and
    the refinement's first-level margin once the fit has measured it (``engine.refine.margin_for``)."""

    kind: Literal["flat", "ivf", "projected_ivf"]
    nlist: int = 0
    nprobe: int = 0
    recall: float = 1.0
    axes: int = 0
    candidates: int = 0
    margin: float | None = None

    def as_dict(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {"kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe,
                                             "recall": self.recall}
        if self.kind == "projected_ivf":
            out.update(axes=self.axes, candidates=self.candidates, exact="refined")
        if self.margin is not None and self.kind != "flat":
            out["margin"] = self.margin
        return out


@dataclass(frozen=True)
class RowFilter:
    """The memory rows a search may return: a bool mask and the faiss selector reading it."""

    rows: np.ndarray                # (M,) bool
    selector: faiss.IDSelector
    bits: np.ndarray                # the packed mask the selector reads: kept alive with it


def keep_rows(rows: np.ndarray) -> RowFilter:
    """A filter that lets searches see only the memory rows where ``rows`` (M,) is true."""
    mask = np.asarray(rows, dtype=bool)
    bits = np.packbits(mask, bitorder="little")
    return RowFilter(mask, faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), bits)


def build_search_index(
    bank: np.ndarray, distance: Distance, *, ivf_min_rows: int, probe_queries: np.ndarray | None,
    target_recall: float = 0.85, axes: int = AXES, seed: int = 0,
) -> tuple[faiss.Index, IndexChoice]:
    """The serving index for a memory bank (M, D): flat below ``ivf_min_rows`` rows; above it a
    projected inverted file whose probe count is the smallest power of two (at most 16) for
    which the approximate search finds the exact nearest neighbour for ``target_recall`` of
    ``probe_queries`` (patches the memory left out). Exactness where it matters comes from
    ``engine.refine``, so the target only trades approximate against exact work: on bottle Lite0
    memories of 60k-65k rows, 85 % takes 2 probes where 90 % took 4, and the kNN stage of the 83
    test ROIs came out 2.5-5 % shorter (the same scores and regions); at 8k-16k rows both pick 1-2.
    """
    if len(bank) < ivf_min_rows or probe_queries is None or len(probe_queries) == 0:
        return build_index(bank, distance), IndexChoice("flat")
    prepared = prepare_rows(bank, distance)
    axes = min(axes, prepared.shape[1] - 1)
    # 4 sqrt(M) lists, and at least 39 training rows per list (below that faiss warns)
    nlist = int(np.clip(min(round(4 * math.sqrt(len(bank))), len(bank) // 39), _MIN_LISTS, _MAX_LISTS))
    index = _projected_ivf(prepared, axes, nlist, seed)
    exact = knn_distances(build_index(bank, distance), probe_queries, distance, 1)
    # slack for rounding: the flat index's BLAS path (|q|^2 + |b|^2 - 2 q.b) loses precision on
    # near-duplicate patches, where the direct distances here are the more exact ones
    slack = exact * 1e-3 + 1e-3 * float(np.mean(exact))
    search = MemorySearch(index, bank, distance, 1)
    nprobe, recall = 1, 0.0
    while True:
        found = search.search(probe_queries, nprobe=nprobe)[0]
        recall = float(np.mean(found <= exact + slack))
        if recall >= target_recall or nprobe >= min(nlist, _MAX_PROBES):
            break
        nprobe = min(nlist, _MAX_PROBES, nprobe * 2)
    return index, IndexChoice("projected_ivf", nlist=nlist, nprobe=nprobe, recall=round(recall, 5), axes=axes,
                              candidates=_CANDIDATES)


def _projected_ivf(prepared: np.ndarray, axes: int, nlist: int, seed: int) -> faiss.Index:
    """An ``IndexPreTransform(PCAMatrix(D, axes + 1), IndexIVFFlat(axes + 1))`` holding the
    coordinates ``w`` of the rows. The transform stores the mean and the principal axes; its
    last output is replaced by the residual length, so the index is searched through
    :class:`MemorySearch`, never through its own ``search``."""
    n, dim = prepared.shape
    pca = faiss.PCAMatrix(dim, axes + 1)
    rng = np.random.default_rng(seed)
    sample = prepared[rng.choice(n, size=min(n, 65_536), replace=False)]
    pca.train(sample)
    projection = _Projection.of(pca, axes)
    coords = projection(prepared)                                                # M axes+1
    quantizer = faiss.IndexFlatL2(axes + 1)
    ivf = faiss.IndexIVFFlat(quantizer, axes + 1, nlist, faiss.METRIC_L2)
    ivf.cp.seed = seed
    ivf.train(coords[rng.choice(n, size=min(n, 64 * nlist), replace=False)])
    ivf.add(coords)
    index = faiss.IndexPreTransform(pca, ivf)
    index.ntotal = ivf.ntotal           # rows went straight into the inner index
    index.is_trained = True
    _keep_alive(index, pca, ivf, quantizer)
    return index


def _keep_alive(owner: faiss.Index, *parts: object) -> None:
    # faiss's Python objects do not own the C++ objects they are given: keep them with the owner
    owner.referenced_objects = list(parts)


@dataclass(frozen=True)
class _Projection:
    """x (N, D) -> coordinates (N, axes + 1): principal coordinates, then the residual length."""

    mean: np.ndarray        # (D,) float64
    axes: np.ndarray        # (axes, D) float64, orthonormal rows
    # (<= EXT_AXES, D) float64: the principal axes after these, for the C exact scan's second bound
    finer: np.ndarray | None = None

    @classmethod
    def of(cls, pca: faiss.PCAMatrix, axes: int) -> _Projection:
        dim = pca.d_in
        matrix = faiss.vector_to_array(pca.A).reshape(pca.d_out, dim)[:axes]
        if pca.eigen_power != 0 or pca.random_rotation:
            raise ValueError("the projected index needs an orthonormal PCA (no whitening, no rotation)")
        return cls(faiss.vector_to_array(pca.mean).astype(np.float64), matrix.astype(np.float64),
                   _finer_axes(pca, matrix.astype(np.float64)))

    @cached_property
    def native(self) -> ivfscan.Projector:
        """The same projection in C (where the scans are built)."""
        return ivfscan.Projector.of(self.mean, self.axes)

    @cached_property
    def _native_finer(self) -> ivfscan.Projector:
        return ivfscan.Projector.of(self.mean, np.vstack([self.axes, self.finer]))

    def split(self, x: np.ndarray) -> tuple[np.ndarray, ivfscan.Finer]:
        """Precise coordinates of ``x`` in C (the same as ``self(x, native=True)``) and its
        coordinates for the exact scan's second bound (``finer`` axes; not None)."""
        return self._native_finer.split(x, len(self.axes))

    def exact_projector(self, finer: bool) -> ivfscan.Projector:
        """The C projector of the exact scan's coordinates (on ``len(axes)`` of its axes); with
        ``finer``, its axes run on into the second bound's."""
        return self._native_finer if finer else self.native

    def __call__(self, x: np.ndarray, *, precise: bool = True, native: bool = False) -> np.ndarray:
        """Coordinates of ``x``; ``precise=False`` computes them in float32 (~2x faster, ~1e-4
        off for the bottle features): enough to pick candidates, not for the lower bounds that
        exact search relies on. ``native``: in C, for the searches the C scans serve (precise, the
        same coordinates bit for bit; 809 patches in the engine's process: numpy 0.60-0.77 ms,
        C 0.40-0.52 ms; rough, projected by each piece of the scan beside the others)."""
        if native:
            return self.native(x, precise=precise)
        dtype = np.float64 if precise else np.float32
        centred = np.asarray(x, dtype=dtype) - self.mean.astype(dtype, copy=False)   # N D
        principal = centred @ self.axes.T.astype(dtype, copy=False)                  # N axes
        rest = np.einsum("nd,nd->n", centred, centred) - np.einsum("na,na->n", principal, principal)
        coords = np.empty((len(centred), self.axes.shape[0] + 1), dtype=np.float32)
        coords[:, :-1] = principal
        coords[:, -1] = np.sqrt(np.maximum(rest, 0.0))
        return coords


class MemorySearch:
    """k-NN distances of patch features to one memory: ``search`` (approximate on an inverted
    file, exact on a flat index) and ``exact`` (always exact). Read-only once built: safe to
    share between threads (probe counts and filters are passed per call).

    Args:
        index: the memory's faiss index (flat, ``IndexIVFFlat``, or the projected layout).
        bank: (M, D) the memory rows, in the order of the index's ids.
        distance, k: as the model was fitted.
        nprobe: lists probed by ``search`` (inverted files); 0 = the index's own.
        candidates: rows per query whose true distance ``search`` takes (projected layout).
        margin: first-level margin of the exact refinement of this memory's approximate maps.
        native: searches of inverted files by the C scans (``engine.ivfscan``); None = where built.
    """

    def __init__(self, index: faiss.Index, bank: np.ndarray, distance: Distance, k: int, *, nprobe: int = 0,
                 candidates: int = _CANDIDATES, margin: float = DEFAULT_MARGIN, native: bool | None = None) -> None:
        self.index = index
        self.distance = distance
        self.ivf, self.projection = _inverted_file(index)
        self.k = max(1, min(int(k), index.ntotal))
        # 0: the probe count stored in the index itself (models written before it was in the manifest)
        self.nprobe = int(nprobe) if nprobe > 0 else (self.ivf.nprobe if self.ivf is not None else 1)
        self.candidates = max(self.k, int(candidates))
        self.margin = float(margin)
        if self.ivf is not None:
            # true distances come from the rows themselves (a flat index holds its own copy)
            self._blocks = _Blocks.of(self.ivf, prepare_rows(bank, distance))
            native = ivfscan.AVAILABLE if native is None else native
            if native and not ivfscan.AVAILABLE:
                raise ValueError("the C scans (engine._ivfscan) were not built")
            self._tiled = self._blocks.tiled() if native and self.k <= _NATIVE_MAX_K else None
            if self._tiled is not None:     # the numpy path's matrices are not used (7.7 MiB at 60k rows)
                self._blocks = replace(self._blocks, columns=())
                finer = self.projection is not None and self.projection.finer is not None
                if finer and len(self._tiled.bank) >= _FINER_ROWS:
                    self._tiled = self._tiled.with_finer(self.projection.split(self._tiled.bank)[1])

    @property
    def approximate(self) -> bool:
        return self.ivf is not None

    def search(self, queries: np.ndarray, only: RowFilter | None = None, *,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q,) mean distance to the k nearest rows found, and (Q,) the k-th of them (a reach).
        ``nprobe`` overrides the lists probed for this call."""
        x = prepare_rows(queries, self.distance)
        if self.projection is not None and self._tiled is not None:
            probes = min(nprobe or self.nprobe, self._tiled.lists)      # lists left empty are not among them
            shown = None if only is None else only.rows[self._blocks.ids]
            if ivfscan.HELPERS:
                squared = self._tiled.approximate_shared(x, self.projection.native, probes, self.candidates, self.k,
                                                         shown)[0]
            else:       # each piece projects its own patches (in C, beside the other pieces)
                squared = _shared_queries(lambda part: self._tiled.approximate(
                    self.projection(x[part], precise=False, native=True), x[part], probes, self.candidates, self.k,
                    shown),
                    len(x), self.k)
            return self._finish(self._fill_missing(x, squared, np.isinf(squared[:, -1]), only))
        use_faiss_threads()
        selector = only.selector if only is not None else None
        if self.ivf is None:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            raw, _ = self.index.search(x, self.k, params=params)
            return self._finish(_squared_l2(raw, self.distance))
        params = faiss.SearchParametersIVF(nprobe=min(nprobe or self.nprobe, self.ivf.nlist), sel=selector)
        if self.projection is None:
            raw, ids = self.ivf.search(x, self.k, params=params)
            squared = _squared_l2(raw, self.distance)
        else:
            _, ids = self.ivf.search(self.projection(x, precise=False), self.candidates, params=params)
            squared = np.sort(self._true_sq(x, ids), axis=1)[:, : self.k]
        return self._finish(self._fill_missing(x, squared, np.count_nonzero(ids >= 0, axis=1) < self.k, only))

    def exact(self, queries: np.ndarray, reach: np.ndarray, only: RowFilter | None = None) -> np.ndarray:
        """(Q,) exact mean distance to the k nearest rows, given each query's ``reach`` (Q,): an
        upper bound of its k-th nearest distance, such as ``search``'s second result."""
        if self.ivf is None:
            return self.search(queries, only)[0]
        x = prepare_rows(queries, self.distance)
        reach_sq = np.square(_as_l2(np.asarray(reach, dtype=np.float64), self.distance))
        # slack for float32 rounding in the faiss and numpy distances: a row kept in vain costs a
        # distance, a row wrongly dropped would cost exactness
        reach_sq = (reach_sq * (1 + 1e-3) + 1e-4).astype(np.float32)
        if self._tiled is not None:
            shown = None if only is None else only.rows[self._blocks.ids]       # by position
            projector = None if self.projection is None else \
                self.projection.exact_projector(self._tiled.finer_panels is not None)
            return self._finish(_exact_scan(self._tiled, projector, x, reach_sq, self.k, shown))[0]
        use_faiss_threads()
        coords = x if self.projection is None else self.projection(x)
        allowed = only.rows if only is not None else None
        return self._finish(self._blocks.nearest(x, coords, reach_sq, self.k, allowed))[0]

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q,) exact distance to the nearest memory row and (Q,) that row's id (an explanation's
        extra search: a few queries, so an inverted file is searched by brute force)."""
        use_faiss_threads()
        x = prepare_rows(queries, self.distance)
        if self.ivf is None:
            raw, ids = self.index.search(x, 1)
            squared = _squared_l2(raw, self.distance)
        else:
            squared, at = faiss.knn(x, self._blocks.bank, 1)
            ids = self._blocks.ids[at]
        return self._finish(squared)[0], ids[:, 0].astype(np.int64)

    def _fill_missing(self, x: np.ndarray, squared: np.ndarray, short: np.ndarray,
                      only: RowFilter | None) -> np.ndarray:
        """``squared`` (Q, k), with the queries ``short`` (Q,) bool, whose probed lists held fewer
        than k rows the search may return (lists left empty, or rows a filter hides), searched over
        every such row. Without it they would get an infinite distance: no upper bound for the
        exact step, and a map poisoned by 0 x inf."""
        missing = np.flatnonzero(short)
        if missing.size == 0:
            return squared
        use_faiss_threads()
        rows = self._blocks.bank if only is None else self._blocks.bank[only.rows[self._blocks.ids]]
        found = np.full((len(missing), self.k), np.inf, dtype=np.float32)
        if len(rows):
            nearest, _ = faiss.knn(np.ascontiguousarray(x[missing]), rows, min(self.k, len(rows)))
            found[:, : nearest.shape[1]] = nearest
        squared = np.array(squared, dtype=np.float32)
        squared[missing] = found
        return squared

    def _true_sq(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(Q, C) true squared distances to the rows ``ids`` (Q, C); +inf where an id is -1."""
        at = np.ascontiguousarray(self._blocks.position[np.maximum(ids, 0)])
        out = np.empty(ids.shape, dtype=np.float32)
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(self._blocks.bank),
                                faiss.swig_ptr(at), x.shape[1], len(x), ids.shape[1])
        out[ids < 0] = np.inf
        return out

    def _finish(self, squared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Squared Euclidean distances (Q, k), ascending -> (Q,) mean and (Q,) k-th distance."""
        squared = np.maximum(squared, 0.0)
        dist = np.sqrt(squared) if self.distance == "l2" else squared / 2.0   # unit vectors: 1 - cos = |q-b|^2 / 2
        if dist.shape[1] == 1:      # one neighbour: its distance is the mean (a reduction fewer per search)
            return dist[:, 0].astype(np.float32), dist[:, 0].astype(np.float32)
        return dist.mean(axis=1).astype(np.float32), dist[:, -1].astype(np.float32)


def _squared_l2(raw: np.ndarray, distance: Distance) -> np.ndarray:
    """faiss results -> squared Euclidean distances (cosine indexes hold unit vectors and return
    inner products: |q - b|^2 = 2 - 2 q.b)."""
    return raw if distance == "l2" else 2.0 - 2.0 * raw


def _as_l2(dist: np.ndarray, distance: Distance) -> np.ndarray:
    return dist if distance == "l2" else np.sqrt(np.maximum(2.0 * dist, 0.0))


def _finer_axes(pca: faiss.PCAMatrix, axes: np.ndarray) -> np.ndarray | None:
    """The PCA's principal axes after ``axes`` (A, D), at most ``EXT_AXES`` of them; None where it
    holds no more, or where they are not orthonormal with ``axes`` (the bound relies on it)."""
    dim, count = pca.d_in, len(axes)
    full = faiss.vector_to_array(pca.PCAMat)
    if full.size != dim * dim or count >= dim:
        return None
    finer = full.reshape(dim, dim)[count : count + ivfscan.EXT_AXES].astype(np.float64)
    basis = np.vstack([axes, finer])
    if np.abs(basis @ basis.T - np.eye(len(basis))).max() > _ORTHONORMAL:
        return None
    return finer


def _inverted_file(index: faiss.Index) -> tuple[faiss.IndexIVFFlat | None, _Projection | None]:
    """The inverted file of an index and, for the projected layout, its projection."""
    index = faiss.downcast_index(index)
    projection = None
    if isinstance(index, faiss.IndexPreTransform):
        pca = faiss.downcast_VectorTransform(index.chain.at(index.chain.size() - 1))
        inner = faiss.downcast_index(index.index)
        if index.chain.size() != 1 or not isinstance(pca, faiss.PCAMatrix) or inner.d != pca.d_out:
            raise ValueError("unsupported pre-transformed index: not the engine's projected layout")
        projection = _Projection.of(pca, pca.d_out - 1)
        index = inner
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:                                 # not an inverted file: flat
        return None, None
    if not isinstance(ivf, faiss.IndexIVFFlat):
        raise ValueError(f"unsupported inverted-file index {type(ivf).__name__}: IndexIVFFlat expected")
    return ivf, projection


def _k_smallest(query: np.ndarray, values: np.ndarray, n: int, k: int) -> np.ndarray:
    """(n, k) the k smallest ``values`` of each query (pairs (query[i], values[i])), ascending."""
    out = np.full((n, k), np.inf, dtype=np.float32)
    if k == 1:                              # the usual case: one radix sort and a segmented min
        order = np.argsort(query, kind="stable")
        grouped = query[order]
        present = np.flatnonzero(np.bincount(grouped, minlength=n))
        out[present, 0] = np.minimum.reduceat(values[order], np.searchsorted(grouped, present))
        return out
    order = np.lexsort((values, query))
    query, values = query[order], values[order]
    rank = np.arange(len(query)) - np.searchsorted(query, np.arange(n))[query]
    keep = rank < k
    out[query[keep], rank[keep]] = values[keep]
    return out


@dataclass(frozen=True)
class _Blocks:
    """The rows of an inverted file regrouped into blocks of neighbouring lists, for exact search.

    Rows are kept at positions in block order, each list's rows together: position p is memory
    row ``ids[p]`` (``position`` maps back), and ``bank`` holds the true rows in that order, so
    the true distances of one block's rows within reach read neighbouring rows instead of rows
    spread over the whole memory (the pair distances of a 448 px defective ROI's exact step,
    660 000 pairs over 65 542 rows, one thread: 17.0 -> 12.3 ms).

    Each list has a ball (centre, largest member distance, as one matrix ``list_side``): a query
    needs a list only if its ball comes within the query's reach. Block b holds the lists
    ``block_lists[b]:block_lists[b + 1]`` (positions ``start[b]:start[b + 1]``); its rows are the
    columns of ``(2 w, -|w|^2, 1)``, and a query ``(q, 1, r - |q|^2)`` has the inner product
    ``r - |q - w|^2`` with each, so one matrix product per block and a sign test give exactly the
    rows within squared reach ``r``, with a different reach per query. The product takes, of the
    block, only the lists some query of the search needs: all of them when an outlying patch
    (a defect) reaches the block, a few when only patches near the memory do.

    Measured on bottle Lite0 models (2-core EPYC, one thread, the exact step of the patches one
    ROI's refinement re-scores), against faiss's range search on whole blocks with the queries
    near the memory going list by list through faiss's pre-assigned range search: 416 px
    (8 477 rows) good ROI 4.4-4.6 -> 2.6-2.7 ms, defective 9.6-9.9 -> 9.0; 224 px defective
    6.1 -> 4.9 ms; 448 px (65 542 rows) defective 60-61 -> 54 ms. numpy's product and
    ``flatnonzero`` cost ~1 ns per row compared; faiss's range search spent ~3 ns more per row
    collecting its results, and its list by list scan ~14 ns per row.
    """

    columns: tuple[np.ndarray, ...]    # (d + 2, rows of block b) float32 per block: its augmented rows
    norm_sq: np.ndarray     # (B,) largest |w|^2 of each block (for the rounding slack)
    ids: np.ndarray         # (M,) int64 memory row at each position
    position: np.ndarray    # (M,) int64 position of each memory row
    bank: np.ndarray        # (M, D) float32 the true rows, by position
    start: np.ndarray       # (B + 1,) first position of each block
    list_start: np.ndarray  # (L + 1,) first position of each non-empty list, lists in block order
    block_lists: np.ndarray  # (B + 1,) first list of each block
    list_side: np.ndarray   # (d + 3, L) float32: each list's ball as (-2 centre, -2 radius, |centre|^2 - radius^2, 1)
    list_centroids: np.ndarray  # (L, d) float32 each list's quantizer centroid

    @classmethod
    def of(cls, ivf: faiss.IndexIVFFlat, bank: np.ndarray) -> _Blocks:
        """The blocks of ``ivf``, whose ids are the rows of ``bank`` (M, D)."""
        coords, ids, lists = _inverted_rows(ivf)
        if len(ids) != len(bank) or not np.array_equal(np.sort(ids), np.arange(len(bank))):
            raise ValueError("the inverted file's ids are not the memory's rows")
        count = int(np.clip(len(coords) // _ROWS_PER_BLOCK, 1, ivf.nlist))
        centroids = np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), dtype=np.float32)
        if count > 1:     # neighbouring lists go to the same block: k-means on the list centroids
            kmeans = faiss.Kmeans(centroids.shape[1], count, niter=10, seed=0, verbose=False,
                                  min_points_per_centroid=1)
            kmeans.train(centroids)
            group = kmeans.index.search(centroids, 1)[1][:, 0]
        else:
            group = np.zeros(ivf.nlist, dtype=np.int64)
        order = np.lexsort((lists, group[lists]))              # by block, then by list (rows keep their order)
        coords, ids, lists = coords[order], ids[order], lists[order]
        _, block = np.unique(group[lists], return_inverse=True)  # blocks without rows are dropped
        start = np.searchsorted(block, np.arange(block.max() + 2))
        list_start = np.r_[np.flatnonzero(np.r_[True, lists[1:] != lists[:-1]]), len(lists)]
        sq = np.einsum("nd,nd->n", coords, coords)
        rows = np.concatenate([2.0 * coords, -sq[:, None], np.ones((len(coords), 1), np.float32)], axis=1)
        columns = tuple(np.ascontiguousarray(rows[s:e].T, dtype=np.float32)
                        for s, e in itertools.pairwise(start.tolist()))
        balls = [_ball(coords[s:e]) for s, e in itertools.pairwise(list_start.tolist())]
        centre = np.stack([c for c, _ in balls]).astype(np.float32)
        radius = np.array([r for _, r in balls], dtype=np.float32)
        centre_sq = np.einsum("ld,ld->l", centre, centre)
        list_side = np.concatenate([-2.0 * centre, -2.0 * radius[:, None],
                                    (centre_sq * (1 - 1e-5) - radius * radius)[:, None],
                                    np.ones((len(radius), 1), np.float32)], axis=1)
        position = np.empty_like(ids)
        position[ids] = np.arange(len(ids))
        return cls(columns, np.maximum.reduceat(sq, start[:-1]), ids, position, np.ascontiguousarray(bank[ids]),
                   start, list_start, np.searchsorted(list_start, start), np.ascontiguousarray(list_side.T),
                   centroids[lists[list_start[:-1]]])

    def tiled(self) -> ivfscan.TiledLists:
        """The same lists in panels for the C scans (coordinates, centres and radii read back
        from the blocks' columns and balls, which hold them times 2 or -2: exact in float32)."""
        dims = self.columns[0].shape[0] - 2
        coords = np.concatenate([block[:dims].T for block in self.columns]) / np.float32(2.0)
        centres = self.list_side[:dims].T / np.float32(-2.0)
        radius = self.list_side[dims] / np.float32(-2.0)
        return ivfscan.TiledLists.of(coords, self.list_start, centres, radius, self.bank, self.list_centroids)

    def _lists_needed(self, q: np.ndarray, q_sq: np.ndarray, reach_sq: np.ndarray) -> np.ndarray:
        """(Q, L) bool: the lists whose ball comes within each query's reach, ``|q - c| <= reach + r``,
        squared and in one product: (q, w, 1, |q|^2 - w^2) . (-2c, -2r, |c|^2 - r^2, 1) <= 0."""
        # rounding slack of |q|^2 + |c|^2 - 2 q.c in float32, relative to the norms
        within = np.sqrt(reach_sq) + 1e-3 * np.sqrt(q_sq) + 1e-4                               # Q
        query_side = np.concatenate([q, within[:, None], np.ones((len(q), 1), np.float32),
                                     (q_sq * (1 - 1e-5) - within * within)[:, None]], axis=1)    # Q d+3
        return query_side @ self.list_side <= 0.0

    def _columns(self, block: int, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Block ``block``'s augmented rows of the lists ``wanted`` (L,) bool, and their positions
        (None: the whole block, from ``start[block]`` on)."""
        first, end = self.block_lists[block], self.block_lists[block + 1]
        taken = first + np.flatnonzero(wanted[first:end])
        if len(taken) == end - first:
            return self.columns[block], None
        sizes = self.list_start[taken + 1] - self.list_start[taken]
        # the positions of the taken lists' rows, list after list
        positions = np.repeat(self.list_start[taken] - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())
        return self.columns[block][:, positions - self.start[block]], positions

    def nearest(self, x: np.ndarray, coords: np.ndarray, reach_sq: np.ndarray, k: int,
                allowed: np.ndarray | None) -> np.ndarray:
        """(Q, k) ascending squared true distances of queries ``x`` (Q, D) to their k nearest
        memory rows among those whose coordinate distance (``coords`` (Q, d)) is within
        ``reach_sq`` (Q,); +inf where fewer are. ``allowed`` (M,) bool hides rows.

        Each block's rows within reach get their true distances inside the block's task (cut to
        the nearest per query when k = 1), on the exact-search workers when there is enough work."""
        q = np.ascontiguousarray(coords, dtype=np.float32)
        q_sq = np.einsum("qd,qd->q", q, q)
        shown = allowed[self.ids] if allowed is not None else None                  # by position
        lists = self._lists_needed(q, q_sq, reach_sq)                                          # Q L
        wanted = lists.any(0)                                                                 # L
        need = np.logical_or.reduceat(lists, self.block_lists[:-1], axis=1)                    # Q B
        blocks = np.flatnonzero(need.any(0))
        # rows compared per block, largest first: the workers take them in turn
        sizes = np.diff(self.list_start) * wanted
        work = need[:, blocks].sum(0) * np.add.reduceat(sizes, self.block_lists[:-1])[blocks]
        order = np.argsort(-work, kind="stable")

        def search(block: int) -> tuple[np.ndarray, np.ndarray]:
            who = np.flatnonzero(need[:, block])
            columns, positions = self._columns(block, wanted)
            # rounding slack of the inner product in float32, relative to the norms
            limit = reach_sq[who] + 1e-5 * (q_sq[who] + self.norm_sq[block])
            augmented = np.concatenate([q[who], np.ones((len(who), 1), np.float32),
                                        (limit - q_sq[who])[:, None]], axis=1)            # n d+2
            within = np.flatnonzero(augmented @ columns >= 0.0)                            # row-major: by query
            query, found = np.divmod(within, columns.shape[1])
            rows = self.start[block] + found if positions is None else positions[found]
            if shown is not None:
                keep = shown[rows]
                query, rows = query[keep], rows[keep]
            true_sq = _pair_sq(x, self.bank, who[query], rows)
            # k = 1 (the usual case) keeps one pair per query here; k > 1 leaves it to _k_smallest
            return _nearest_per_query(who[query], true_sq) if k == 1 else (who[query].astype(np.int64), true_sq)

        parts = _exact_workers.map_balanced(search, blocks[order].tolist(), work[order].astype(np.float64))
        if not parts:
            return np.full((len(x), k), np.inf, dtype=np.float32)
        query = np.concatenate([part[0] for part in parts])
        return _k_smallest(query, np.concatenate([part[1] for part in parts]), len(x), k)


def _ball(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (the mean) and radius (the largest distance from it) of ``points`` (n, d), n >= 1."""
    centre = points.mean(0)
    offset = points - centre
    return centre, math.sqrt(float(np.einsum("nd,nd->n", offset, offset).max()))


def _pair_sq(x: np.ndarray, bank: np.ndarray, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(P,) squared distances between ``x[query[i]]`` and ``bank[rows[i]]``."""
    query = np.ascontiguousarray(query, dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty(len(query), dtype=np.float32)
    faiss.pairwise_indexed_L2sqr(x.shape[1], len(query), faiss.swig_ptr(x), faiss.swig_ptr(query),
                                 faiss.swig_ptr(bank), faiss.swig_ptr(rows), faiss.swig_ptr(out))
    return out


def _nearest_per_query(query: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's smallest value, as pairs (query, value); ``query`` must be grouped
    (nondecreasing), as a range search returns it."""
    if len(query) == 0:
        return query.astype(np.int64), values
    first = np.flatnonzero(np.r_[True, query[1:] != query[:-1]])
    return query[first].astype(np.int64), np.minimum.reduceat(values, first)


def _exact_scan(tiled: ivfscan.TiledLists, projector: ivfscan.Projector | None, x: np.ndarray,
                reach_sq: np.ndarray, k: int, shown: np.ndarray | None) -> np.ndarray:
    """(Q, k) the C exact scan of the queries ``x`` (coordinates from ``projector``; None = the
    rows themselves), by the caller and the extension's helper threads where it has them
    (``TiledLists.exact_shared``), else by the caller and the exact-search workers side by side
    (the C steps release the GIL). Each projects the next queries none has taken until all are
    projected, then takes the next panel of lists none has taken until all are, and their k
    nearest are merged. Taken a panel at a time, the threads end within one panel's work of each
    other, where ranges of lists dealt out in turn left one thread waiting up to a range's (a
    defective ROI's 335 patches at 59 741 rows: ranges took 0.55-1.2 ms, a panel of lists ~0.1)."""
    if ivfscan.HELPERS:
        return tiled.exact_shared(x, reach_sq, k, shown, projector)[0]
    n, coords, finer = len(x), x, None
    if projector is not None:
        at = tiled.dims - 1
        coords = np.empty((n, at + 1), dtype=np.float32)
        if at < projector.axes:
            finer = ivfscan.Finer.empty(n)
    progress, taken = np.zeros(2, dtype=np.int64), np.zeros(1, dtype=np.int64)

    def scan(_: int) -> np.ndarray:
        if projector is not None:
            projector.fill(x, coords, finer, progress)
        return tiled.exact(coords, x, reach_sq, k, shown, slice(0, tiled.lists), finer, taken)

    calls = _exact_workers.size
    # the work, as the numpy path counts it: every row against every query
    work = np.full(calls, n * tiled.bank.shape[0] / calls)
    parts = _exact_workers.map_balanced(scan, range(calls), work, faiss_inside=False)
    if k == 1:
        for part in parts[1:]:
            np.minimum(parts[0], part, out=parts[0])
        return parts[0]
    return np.sort(np.concatenate(parts, axis=1), axis=1)[:, :k]


def _shared_queries(scan: Callable[[slice], np.ndarray], n: int, k: int) -> np.ndarray:
    """(n, k) ``scan`` over slices of the n queries, taken in turn by the caller and the
    exact-search workers (the C scans release the GIL)."""
    if n == 0:
        return np.empty((0, k), dtype=np.float32)
    size = max(_QUERIES_PER_PIECE, -(-n // _QUERY_PIECES))
    pieces = [slice(start, min(n, start + size)) for start in range(0, n, size)]
    work = np.array([(p.stop - p.start) * _QUERY_WORK for p in pieces], dtype=np.float64)
    return np.concatenate(_exact_workers.map_balanced(scan, pieces, work, faiss_inside=False))


_T = TypeVar("_T")
_R = TypeVar("_R")


class _ExactWorkers:
    """Threads that share out the blocks of one exact search, each running faiss (the pair
    distances) on one thread; BLAS (the blocks' products) runs on one thread everywhere.

    OpenMP thread counts are per thread, so a worker's single-thread setting leaves the request
    threads alone. Blocks as the parallel grain beat faiss's own threads on one block at a time
    (bottle Lite0 @ 448, 65 542 rows, the range searches for one defective ROI's 933 re-scored
    patches on the 2-core EPYC: 71-89 ms on two workers, 112-178 ms with two OpenMP threads,
    124-147 ms with one; the whole inference, one and two workers in turns: 273 / 229 ms p50).
    """

    def __init__(self) -> None:
        self._pool = SizedPool("exact-search", 1, initializer=faiss.omp_set_num_threads, initargs=(1,))

    @property
    def size(self) -> int:
        """Threads a shared step may take: the caller and the workers."""
        return self._pool.size

    def configure(self, count: int) -> None:
        """A new count takes a new pool; searches in flight finish on the old one."""
        self._pool.resize(max(1, int(count)))

    def map_balanced(self, fn: Callable[[_T], _R], items: Sequence[_T], costs: np.ndarray, *,
                     faiss_inside: bool = True) -> list[_R]:
        """``fn`` over ``items`` (sorted by ``costs``, largest first): inline when there is little
        work, else taken in turn by the caller and the workers, each taking the next item when it
        is free (``engine.threads.InTurn``); results in the order of ``items``.

        Taken in turn rather than dealt out beforehand: a worker that starts late (its core just
        woke from idle) then costs only the items it did not take, where a dealt-out share made
        the whole search wait for it, and one that has not started by the end is not waited for.
        ``faiss_inside``: the items call faiss, which the caller's thread then runs on one OpenMP
        thread, as the workers do (the C scans do not call it)."""
        if self._pool.size == 1 or len(items) < 2 or float(np.sum(costs)) < _SHARED_WORK:
            return [fn(item) for item in items]
        turns = InTurn([partial(fn, item) for item in items])
        pool = self._pool.get()
        helpers = [pool.submit(turns.drain) for _ in range(min(self._pool.size, len(items)) - 1)]
        try:
            with _one_faiss_thread() if faiss_inside else nullcontext():
                turns.drain()
        finally:
            # every item is taken: a helper that has not started is called off, not waited for
            for future in helpers:
                if not future.cancel():
                    future.result()
        return turns.results


@contextmanager
def _one_faiss_thread() -> Iterator[None]:
    """faiss on one OpenMP thread in the calling thread inside the ``with`` (its count restored
    after), as on the workers: the caller takes items beside them."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


_exact_workers = _ExactWorkers()


def configure_exact_workers(count: int) -> None:
    """Threads that share one exact search (one per usable core is the engine's choice): the
    caller and ``count - 1`` workers, or helper threads of the C scans where it has them."""
    _exact_workers.configure(count)
    if ivfscan.AVAILABLE:       # the engine's C scans run here
        ivfscan.set_helpers(max(0, int(count) - 1))


def _inverted_rows(ivf: faiss.IndexIVFFlat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every stored vector (M, d), its id (M,) and its list (M,), copied out of the lists."""
    lists, dim = ivf.invlists, ivf.d
    coords, ids, owner = [], [], []
    for i in range(ivf.nlist):
        size = lists.list_size(i)
        if size == 0:
            continue
        coords.append(np.frombuffer(faiss.rev_swig_ptr(lists.get_codes(i), size * dim * 4), dtype=np.float32)
                      .reshape(size, dim).copy())
        ids.append(faiss.rev_swig_ptr(lists.get_ids(i), size).copy())
        owner.append(np.full(size, i, dtype=np.int64))
    return np.concatenate(coords), np.concatenate(ids).astype(np.int64), np.concatenate(owner)

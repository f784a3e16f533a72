"""Greedy k-center coreset selection (PatchCore's memory-bank thinning).

The selection is exact greedy k-center (each pick is the row farthest from every row picked so
far) on the features' top ``projection_dim`` principal axes; features with no more dimensions
than that are used as they are.

Why PCA rather than PatchCore's Gaussian random projection: patch features keep most of their
variance in few directions, and a covering radius is a worst case, so it suffers from every
distorted distance. Measured against exact greedy on the raw features (covering radius in full
dimensions, bench suite): on real 384-dim patch features (200 704 rows) 1.06x with 192 axes,
1.13x with 128; on Lite0's 152-dim bottle features 1.02x with 128 axes against 1.17x for a
random projection to 128 columns, 1.00x as they are.

Why cells: plain greedy costs one pass over all N rows per pick (N * k * p). On the CPU the rows
are first grouped into about 2 sqrt(N) k-means cells (drawn on the first 16 principal axes). By
the triangle inequality a pick ``c`` can bring no row of cell ``g`` closer when
``|c - centre_g| - radius_g >= R_g``, ``R_g`` being the largest distance from a row of ``g`` to
its nearest pick; most cells are skipped that way. Cells are updated lazily: a cell catches up
on the picks made since its last update (one matrix product over the picks the bound keeps)
only when its stale ``R_g``, an upper bound, is the largest of all. The cell then holding the
largest exact ``R_g`` holds the farthest row, so the picks are those of plain greedy. On CUDA
the plain loop (one mat-vec per pick) is fast and is used as it is.

The pruning works when rows are spread unevenly, as patch features are: 200 704 x 384 real
features at 10 % take ~2.5 s here (2-core EPYC) against ~140 s for plain greedy in numpy.
Isotropic noise is its worst case: 200 000 x 384 synthetic Gaussian clusters (bench suite) take
~15 s (15.1-16.7 s in the latest runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

__all__ = ["CoresetRule", "covering_radius", "greedy_cells", "greedy_coreset", "principal_axes", "project"]

# below this many rows the plain loop beats building cells
_MIN_ROWS_FOR_CELLS = 8192
# rows of a cell's catch-up product computed at once (bounds its temporary)
_CATCH_UP_BLOCK = 512
# rows used to estimate the principal axes
_PCA_SAMPLE_ROWS = 32_768
# principal axes the cells are drawn on: 16 rather than 32 made k-means and the row assignment
# ~4x cheaper for a slightly slower loop; measured here, whole selection: 597k x 96 real 20.5 ->
# 17.8 s, 200k x 152 real 6.5 -> 5.8 s, 200k x 192 synthetic clusters 9.5 -> 9.7 s
_CELL_AXES = 16


@dataclass(frozen=True)
class CoresetRule:
    """How many principal axes a bank is thinned on, by its size.

    Banks of up to ``exact_max_rows`` rows use ``projection_dim`` axes (features with no more
    dimensions are used as they are: exact greedy). Larger banks use at most
    ``large_projection_dim``: the loop's products shrink with the axes, and the covering radius
    grows only a little (measured on 200 000 EfficientNet-Lite0 bottle features at 224 px, 152
    dims: 1.08x exact greedy's with 96 axes, 1.14x with 64).
    """

    projection_dim: int | None = 192
    exact_max_rows: int = 200_000
    large_projection_dim: int = 96

    def axes(self, rows: int, dims: int) -> int | None:
        """Principal axes for a bank of (rows, dims); None = the features as they are."""
        wanted = self.projection_dim
        if rows > self.exact_max_rows:
            wanted = self.large_projection_dim if wanted is None else min(wanted, self.large_projection_dim)
        return wanted if wanted is not None and wanted < dims else None


def principal_axes(x: Tensor, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Mean (D,) and principal axes (D, D) of x (N, D), by decreasing variance, as columns.

    Estimated from at most 32 768 rows drawn with ``seed``.
    """
    n = x.shape[0]
    if n > _PCA_SAMPLE_ROWS:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        sample = x[torch.randperm(n, generator=gen)[:_PCA_SAMPLE_ROWS].to(x.device)]
    else:
        sample = x
    mean = sample.mean(0)
    centred = sample - mean
    _, vectors = torch.linalg.eigh((centred.T @ centred).double())     # ascending eigenvalues
    return mean, vectors.flip(1).to(x.dtype)


def project(x: Tensor, mean: Tensor, axes: Tensor) -> Tensor:
    """(N, D) -> (N, len(axes.T)) centred coordinates; no centred copy of x is made."""
    # centring keeps |a|^2 + |b|^2 - 2 a.b accurate in float32
    z = x @ axes
    z -= mean @ axes
    return z


def greedy_coreset(x: Tensor, k: int, *, projection_dim: int | None = 192, seed: int = 0) -> Tensor:
    """Row indices (k,) of the greedy k-center subset of x (N, D), sorted ascending.

    Args:
        x: (N, D) float features, on any device.
        k: number of rows to keep, 1..N.
        projection_dim: principal axes the selection runs on; None = the raw features.
        seed: seeds the PCA sample, the first pick and the cells.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if k == n:
        return torch.arange(n, device=x.device)
    z = x.float()
    dense = z.device.type != "cpu" or n < _MIN_ROWS_FOR_CELLS
    project_to = projection_dim if projection_dim is not None and projection_dim < z.shape[1] else None
    if project_to is not None or (not dense and z.shape[1] > _CELL_AXES):
        mean, axes = principal_axes(z, seed=seed)
    if project_to is not None:
        z = project(z, mean, axes[:, :project_to])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    if dense:
        picks = _greedy_dense(z.contiguous(), k, first)
    else:
        # cells are drawn on the first principal axes: k-means is then cheap, and rows close on
        # the main axes are what a cell should group
        if z.shape[1] <= _CELL_AXES:
            coarse = z
        elif project_to is not None:
            coarse = z[:, :_CELL_AXES]                  # z's columns are the principal axes
        else:
            coarse = project(z, mean, axes[:, :_CELL_AXES])
        picks = torch.from_numpy(greedy_cells(z.numpy(), k, first, partition=coarse.numpy(), seed=seed))
    return torch.sort(picks).values


def covering_radius(x: Tensor, selected: Tensor, *, block: int = 8192) -> float:
    """Largest distance from any row of x (N, D) to its nearest selected row."""
    centers = x[selected].float()
    c_sq = (centers * centers).sum(1)
    worst = 0.0
    for start in range(0, x.shape[0], block):
        q = x[start : start + block].float()
        d2 = (q * q).sum(1, keepdim=True) + c_sq[None, :] - 2.0 * q @ centers.T  # b k
        worst = max(worst, float(d2.min(1).values.clamp_min(0).max()))
    return math.sqrt(worst)


def _greedy_dense(z: Tensor, k: int, first: int) -> Tensor:
    """Plain greedy k-center on z (n, p) from row ``first``: indices (k,) in pick order."""
    sq = (z * z).sum(1)                                             # n
    min_d = (sq + sq[first] - 2.0 * torch.mv(z, z[first])).clamp_min_(0.0)
    picks = torch.empty(k, dtype=torch.long, device=z.device)
    picks[0] = first
    # picked rows go to -inf: with repeated rows every min_d can reach 0, and argmax would then
    # return an index already picked (duplicates in the coreset)
    min_d[first] = float("-inf")
    for i in range(1, k):
        j = torch.argmax(min_d)
        picks[i] = j
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: one mat-vec instead of an (n, p) temporary
        torch.minimum(min_d, sq + sq[j] - 2.0 * torch.mv(z, z[j]), out=min_d)
        min_d[j] = float("-inf")
    return picks


def greedy_cells(
    z: np.ndarray, k: int, first: int, *, partition: np.ndarray | None = None, seed: int = 0,
    n_cells: int | None = None,
) -> np.ndarray:
    """Greedy k-center on z (n, p) float32 from row ``first``, cell-pruned: indices (k,) in pick order.

    Picks the same rows as the plain loop (up to ties between equal distances); see the module
    docstring for the pruning rule. ``partition`` (n, q): the coordinates k-means groups the
    rows on (default z); any grouping keeps the selection exact, a good one makes it fast.
    """
    n, p = z.shape
    n_cells = n_cells or max(1, min(n // 64, round(2 * math.sqrt(n))))
    z = np.ascontiguousarray(z, dtype=np.float32)
    coarse = z if partition is None else np.ascontiguousarray(partition, dtype=np.float32)
    cells = _Cells(z, coarse, n_cells, seed)
    # the loop's products are small: one BLAS thread is as fast, and cannot stall spinning on a
    # core that another thread holds (multi-threaded, one run on a busy machine took 16 s, not 3).
    # The limit is process-wide: faiss searches of concurrent inferences also get one BLAS thread
    # until the loop ends.
    with threadpool_limits(1, user_api="blas"):
        return cells.order[_greedy_loop(cells, k, int(cells.position[first]))]


def _greedy_loop(cells: _Cells, k: int, j: int) -> np.ndarray:
    """greedy_cells on cells.rows from cell-sorted row j: cell-sorted indices (k,) in pick order.

    Each pick c is kept as ``(-2 c, |c|^2)`` and each row r as ``(r, 1)``: one product then
    gives ``|c - r|^2 - |r|^2`` (and, with ``(centre, 1)``, the distance test of a cell's ball)
    with no elementwise pass over the (picks, rows) block; the minimum runs down the picks axis,
    along contiguous rows. 597 408 x 96 real features at 10 %, with separate scaling and shifting
    passes against this way, alternating runs: 21.0 / 20.9 s -> 17.6 / 18.3 s (2-core EPYC, one
    BLAS thread).
    """
    p = cells.rows.shape[1]
    rows, sq, bounds = cells.augmented, cells.sq, cells.bounds
    min_d2 = np.maximum(sq + sq[j] - 2.0 * (cells.rows @ cells.rows[j]), 0.0)
    min_d2[j] = -np.inf                     # picked rows never win the argmax again
    worst = np.full(cells.count, -np.inf, dtype=np.float32)   # R_g^2: exact or an upper bound
    worst_row = bounds[:-1].copy()
    for g in np.flatnonzero(np.diff(bounds)):
        s, e = bounds[g], bounds[g + 1]
        a = int(np.argmax(min_d2[s:e]))
        worst_row[g], worst[g] = s + a, min_d2[s + a]
    picked = np.empty((k, p + 1), dtype=np.float32)            # (-2 c, |c|^2) of each pick
    picks = np.empty(k, dtype=np.int64)
    picks[0] = j
    picked[0, :p], picked[0, p] = -2.0 * cells.rows[j], sq[j]
    caught_up = np.ones(cells.count, dtype=np.int64)          # picks[:caught_up[g]] applied to g
    centroid, centroid_sq = cells.augmented_centroid, cells.centroid_sq
    # a little slack on the bound: distances carry float32 rounding, and a pick wrongly
    # skipped would change the selection while one wrongly kept only costs a product
    reach_pad = cells.radius * (1 + 1e-4) + 1e-6
    for t in range(1, k):
        while True:
            g = int(worst.argmax())
            since = int(caught_up[g])
            if since == t:
                break
            caught_up[g] = t
            reach = math.sqrt(max(float(worst[g]), 0.0)) * (1 + 1e-4) + reach_pad[g]
            start, end = bounds[g], bounds[g + 1]
            # picks within reach of the cell's ball: |c - centre|^2 - |centre|^2 from one product
            near = (picked[since:t] @ centroid[g] < reach * reach - centroid_sq[g]).nonzero()[0]
            if near.size:
                near += since
                seg = min_d2[start:end]
                for b in range(0, near.size, _CATCH_UP_BLOCK):
                    closest = (picked[near[b : b + _CATCH_UP_BLOCK]] @ rows[start:end].T).min(0)
                    closest += sq[start:end]
                    np.minimum(seg, closest, out=seg)
            a = start + int(min_d2[start:end].argmax())
            worst_row[g], worst[g] = a, min_d2[a]
        j = int(worst_row[g])
        picks[t] = j
        picked[t, :p], picked[t, p] = -2.0 * cells.rows[j], sq[j]
        min_d2[j] = -np.inf
    return picks


class _Cells:
    """Rows of z grouped by k-means cell (cell g is rows[bounds[g]:bounds[g + 1]]), with each
    cell's centroid and radius in z's coordinates."""

    def __init__(self, z: np.ndarray, coarse: np.ndarray, count: int, seed: int) -> None:
        n, p = z.shape
        kmeans = faiss.Kmeans(coarse.shape[1], count, niter=8, seed=seed, max_points_per_centroid=64,
                              verbose=False)
        kmeans.train(coarse)
        _, label = kmeans.index.search(coarse, 1)
        label = label[:, 0]
        self.order = np.argsort(label, kind="stable")               # cell-sorted row -> row
        self.position = np.empty(n, dtype=np.int64)                 # row -> cell-sorted row
        self.position[self.order] = np.arange(n)
        # rows stored as (r, 1) (see _greedy_loop); ``rows`` is a view of their first p columns
        self.augmented = np.ones((n, p + 1), dtype=np.float32)
        for s in range(0, n, 65_536):                             # no full-size temporary
            self.augmented[s : s + 65_536, :p] = z[self.order[s : s + 65_536]]
        self.rows = self.augmented[:, :p]
        self.count = count
        self.bounds = np.searchsorted(label[self.order], np.arange(count + 1))
        self.sq = np.einsum("nd,nd->n", self.rows, self.rows)
        self.centroid = np.zeros((count, p), dtype=np.float32)
        self.radius = np.zeros(count, dtype=np.float32)
        for g in np.flatnonzero(np.diff(self.bounds)):
            rows = self.rows[self.bounds[g] : self.bounds[g + 1]]
            self.centroid[g] = rows.mean(0)
            offset = rows - self.centroid[g]
            self.radius[g] = math.sqrt(float(np.einsum("nd,nd->n", offset, offset).max()))
        self.centroid_sq = np.einsum("gd,gd->g", self.centroid, self.centroid)
        self.augmented_centroid = np.concatenate([self.centroid, np.ones((count, 1), np.float32)], axis=1)

"""Greedy k-center coreset selection (PatchCore's memory-bank thinning).

Selection runs on a Gaussian random projection of the features (``projection_dim`` columns,
as in the PatchCore paper) with one running min-distance per row, so memory is O(N).

Banks larger than ``chunk_size`` rows are split into random chunks of about equal size, each
thinned greedily on its own with a share of ``k`` proportional to its size; the union covers
every row within the covering radius of its own chunk. Chunking turns the N * k cost of exact
greedy into ``chunk_size * k``, and a chunk of 8192 x 128 float32 (4 MiB) stays in the CPU's
cache for its whole greedy loop: 200 000 x 384 at 10 % takes ~2 s here, against ~2 min for
exact greedy.

The price is coverage: every chunk must cover the whole feature space with a fraction of the
centres. Measured against exact greedy (full dimensions), the covering radius is 1.23x on the
MVTec bottle bank (image and pixel AUROC unchanged) and up to 2.1x on synthetic data made of
~1000 tight clusters, where each chunk has fewer centres than clusters. A larger
``chunk_size`` (``PATCHCORE_CORESET_CHUNK``) tightens the radius at a proportional cost in time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["covering_radius", "greedy_coreset", "random_projection"]


def random_projection(x: Tensor, dim: int, *, seed: int = 0) -> Tensor:
    """(N, D) -> (N, dim) Gaussian random projection; x itself when D <= dim."""
    if x.shape[1] <= dim:
        return x
    gen = torch.Generator(device="cpu").manual_seed(seed)
    matrix = torch.randn(x.shape[1], dim, generator=gen) / math.sqrt(dim)
    return x @ matrix.to(device=x.device, dtype=x.dtype)


def greedy_coreset(
    x: Tensor,
    k: int,
    *,
    projection_dim: int | None = 128,
    seed: int = 0,
    chunk_size: int = 8192,
) -> Tensor:
    """Row indices (k,) of an approximate k-center greedy subset of x (N, D), sorted ascending.

    Args:
        x: (N, D) float features, on any device.
        k: number of rows to keep, 1..N.
        projection_dim: columns of the random projection used for selection; None = none.
        seed: seeds the projection, the chunk split and each chunk's first pick.
        chunk_size: most rows thinned together (see the module docstring).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if k == n:
        return torch.arange(n, device=x.device)
    z = x.float()
    if projection_dim is not None:
        z = random_projection(z, projection_dim, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_chunks = math.ceil(n / chunk_size)
    order = torch.randperm(n, generator=gen).to(x.device) if n_chunks > 1 else None
    chunks = torch.tensor_split(order, n_chunks) if order is not None else [None]
    shares = _split_k(k, [len(c) for c in chunks]) if order is not None else [k]
    parts = []
    for chunk, share in zip(chunks, shares, strict=True):
        if share == 0:
            continue
        zc = z if chunk is None else z[chunk].contiguous()
        first = int(torch.randint(zc.shape[0], (1,), generator=gen))
        picked = _greedy(zc, share, first)
        parts.append(picked if chunk is None else chunk[picked])
    return torch.sort(torch.cat(parts)).values


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


def _split_k(k: int, sizes: list[int]) -> list[int]:
    """Shares of k proportional to sizes (largest remainder first), each at most its size."""
    total = sum(sizes)
    raw = [k * s / total for s in sizes]
    shares = [min(int(r), s) for r, s in zip(raw, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    rest = k - sum(shares)
    while rest > 0:
        for i in order:
            if rest > 0 and shares[i] < sizes[i]:
                shares[i] += 1
                rest -= 1
    return shares


def _greedy(z: Tensor, k: int, first: int) -> Tensor:
    """Greedy k-center on z (n, p) from row ``first``: indices (k,) in pick order."""
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
